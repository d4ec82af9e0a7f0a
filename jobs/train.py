"""Train MG-MoE: `deepspeed jobs/train.py --deepspeed ds_configs/zero2.json [--data DIR] [--output DIR]`.

With no --data, trains on the embedded demo birds (generated on first use). Runs with the
DeepSpeed launcher (one or many nodes), torchrun, or plain `python jobs/train.py` (one rank).
`--init-from RUN_DIR` (or an exported .safetensors) starts from a trained model, and
`--freeze backbone,experts` keeps those parameter groups fixed in every stage.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install

from mgmoe_ds.config import DEFAULT_CONFIG_PATH, ConfigError, load_run_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", type=Path, default=DEFAULT_CONFIG_PATH, metavar="CONFIG",
                        help="DeepSpeed JSON with an 'mgmoe' block (default: ds_configs/zero2.json)")
    parser.add_argument("--data", default=None, help="dataset folder with manifest.json, or 'registry'")
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: runs/<timestamp>)")
    parser.add_argument("--resume", type=Path, default=None, help="continue the run in this run folder")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help="start from a trained model (a run folder or an exported .safetensors): backbone, experts, "
                             "router and the classes both label spaces share keep their weights")
    parser.add_argument("--freeze", default=None, metavar="GROUPS",
                        help="parameter groups no stage trains, comma-separated, e.g. backbone,experts")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the mgmoe block, e.g. --set moe.top_k=1 (repeatable)")
    parser.add_argument("--max-steps", type=int, default=None, help="checkpoint and stop after this many steps")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # as overrides of train.init_from / train.freeze: validated with the file and recorded in config.json
    if args.init_from is not None:
        args.overrides.append(f"train.init_from={json.dumps(args.init_from)}")
    if args.freeze is not None:
        args.overrides.append(f"train.freeze={json.dumps([g.strip() for g in args.freeze.split(',') if g.strip()])}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # validate the mgmoe block before any process group: a bad value is one line, exit 2
        load_run_config(args.deepspeed, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mgmoe_ds.backbone import BackboneError
    from mgmoe_ds.data import DataError
    from mgmoe_ds.train.trainer import TrainArgs, TrainingError, train
    from mgmoe_ds.experts import ExpertError
    from mgmoe_ds.train.distributed import WorldError
    from mgmoe_ds.train.transfer import TransferError
    from mgmoe_ds.distillation import TeacherError

    try:
        train(TrainArgs(deepspeed_config=args.deepspeed, data=args.data, output=args.output, resume=args.resume,
                        overrides=args.overrides, max_steps=args.max_steps))
    except (ConfigError, WorldError, TrainingError, DataError, BackboneError, ExpertError,
            TransferError, TeacherError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
