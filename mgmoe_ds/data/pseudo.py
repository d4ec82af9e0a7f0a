"""Pseudo-labels in training shards: which ones a run trains on, and with which class.

A sample whose ``json`` carries ``"pseudo": {"label": L, "score": S, "method": "..."}`` (written
by a pseudo-labeller; ``L`` a class index of the dataset's class list, as ``cls`` is, ``S`` a
confidence in [0, 1]) trains with class ``L`` when ``S >= data.pseudo_min_score``; below it the
sample is left out and counted, apart from bad samples, so that the epoch log can say how many
were. A sample without a ``pseudo`` record is untouched. A kept sample is marked in its batch
(``"pseudo"`` True, :mod:`.stream`), and its losses on its label weigh ``data.pseudo_weight``
times a labelled sample's (``train.step.TrainStep.sample_weights``; default 1: as much).
"""

from __future__ import annotations

import json
import math
from typing import Callable, Iterator, Optional

PSEUDO_LABEL_KEY = "__pseudo_label__"  # the kept sample's pseudo-label, in its dataset's class indices


def pseudo_record(sample: dict, num_labels: int) -> Optional[tuple[int, float]]:
    """``(label, score)`` of the sample's ``json`` ``pseudo`` record, or None without one.

    Args:
        sample: a sample from :func:`mgmoe_ds.data.tar_reader.tar_samples`.
        num_labels: the size of the sample's dataset's class list (labels are checked against it).

    Raises:
        ValueError: a ``pseudo`` record without an integer label in range and a score in [0, 1].
    """
    data = sample.get("json")
    if data is None or b'"pseudo"' not in data:  # most samples: no JSON parse
        return None
    meta = json.loads(data)
    record = meta.get("pseudo") if isinstance(meta, dict) else None
    if record is None:
        return None
    label = record.get("label") if isinstance(record, dict) else None
    score = record.get("score") if isinstance(record, dict) else None
    if (not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_labels
            or not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score)
            or not 0 <= score <= 1):
        raise ValueError(f"{sample.get('__url__')}: {sample.get('__key__')}.json: pseudo = {record!r}: expected "
                         f"{{\"label\": a class index 0..{num_labels - 1}, \"score\": a number in [0, 1], ...}}")
    return label, float(score)


class PseudoLabelFilter:
    """A pipeline stage: keeps pseudo-labelled samples scored at or above ``min_score`` (each with its
    pseudo-label under :data:`PSEUDO_LABEL_KEY`) and counts those left out; ``take()`` returns the
    count since the last call, which the batching stage attaches to the next batch.

    Args:
        min_score: ``data.pseudo_min_score``.
        num_labels: the class-list size of a sample's dataset, by shard url.
        handler: the pipeline's error policy for a malformed ``pseudo`` record.
    """

    def __init__(self, min_score: float, num_labels: Callable[[str], int],
                 handler: Callable[[BaseException], bool]) -> None:
        self.min_score, self.num_labels, self.handler = min_score, num_labels, handler
        self.left_out = 0

    def take(self) -> int:
        left_out, self.left_out = self.left_out, 0
        return left_out

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                record = pseudo_record(sample, self.num_labels(sample.get("__url__")))
            except Exception as exn:  # a malformed record is a bad sample, as the handler decides
                if not self.handler(exn):
                    raise
                continue
            if record is None:
                yield sample
            elif record[1] >= self.min_score:
                yield dict(sample, **{PSEUDO_LABEL_KEY: record[0]})
            else:
                self.left_out += 1
