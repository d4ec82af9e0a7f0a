"""The training side: distributed set-up and collectives, run state, checkpoints, the trainer."""
