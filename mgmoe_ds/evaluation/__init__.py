"""Evaluation of a trained model: routing passes over a split, metrics, figures and the report.

``passes`` runs routing variants on shared backbone features, ``metrics`` scores them (accuracy,
long-tail buckets, confusions, FLOPs), ``figures`` draws the heatmap and t-SNE, ``loading`` sets
up a run for ``eval`` and ``ablate``, and ``report`` assembles ``mgmoe eval``'s report.
"""

from .loading import EvaluationArgs, LoadedRun, load_for_evaluation
from .metrics import accuracy_summary, confused_pairs, long_tail_buckets, pass_flops, router_flops
from .passes import ROUTED, PassResult, SplitOutputs, run_passes
from .report import EvalArgs, evaluate_model

__all__ = [
    "ROUTED", "EvalArgs", "EvaluationArgs", "LoadedRun", "PassResult", "SplitOutputs",
    "accuracy_summary", "confused_pairs", "evaluate_model", "load_for_evaluation", "long_tail_buckets",
    "pass_flops", "router_flops", "run_passes",
]
