"""Pseudo-labels from a pair network: is this image the same species as that one?

The pair network embeds a backbone's pooled features with a small MLP ``g`` and scores a pair
``(x, y)`` as ``sigmoid(a * cos(g(x), g(y)) + b)``, with ``a = exp(log_scale) > 0`` and ``b``
learned: a higher similarity is always a higher score, so "the best-matching class" means the
same in the embedding as in the score. It is trained with binary cross-entropy on balanced
same / different species pairs drawn from the labelled images (with Gaussian noise on the
standardised features: a regulariser that matters when there are few labelled images), then
labels an unlabelled image with the class whose exemplars (the ``m`` labelled images nearest the
class mean in the embedding, or all of them when the class has fewer) it matches best on
average.

The pseudo-label's score is ``p_1 * (1 - p_2)``, with ``p_1`` that best mean pair score and
``p_2`` the runner-up class's: in [0, 1], high only for an image that matches one class and not
the next. ``p_1`` alone does not rank pseudo-labels: an image midway between two species
matches both, and on such images ``p_1`` is as close to 1 as on clean ones (0.99 against 1.00 on
the synthetic clusters of ``tests/test_pseudo_label.py``), while ``p_1 * (1 - p_2)`` puts them
below the clean ones.

Only torch: the features come in as plain tensors (``pseudo_label_data`` computes them with a
trained model and writes the pseudo-labelled shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHOD = "pair-network"  # the "method" of the pseudo records this module's labels are written with


class PairNetwork(nn.Module):
    """Same-species score of two feature vectors.

    Args:
        dim: the feature size (the backbone's pooled dimension).
        hidden: the MLP's hidden width.
        embed: the embedding size.
    """

    def __init__(self, dim: int, hidden: int = 128, embed: int = 64) -> None:
        super().__init__()
        # Features are standardised with the labelled set's statistics (set by train_pair_network):
        # a backbone's pooled features can sit far from zero, on scales the MLP would have to learn.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.embedding = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, embed))
        self.log_scale = nn.Parameter(torch.tensor(math.log(5.0)))  # a = exp(log_scale): cos in [-1, 1] -> +-5 logits
        self.bias = nn.Parameter(torch.zeros(()))

    def embed(self, features: Tensor) -> Tensor:
        """(N, dim) features -> (N, embed) unit vectors."""
        standard = (features.float() - self.feature_mean) / self.feature_std  # (N, dim)
        return F.normalize(self.embedding(standard), dim=-1)  # (N, embed)

    def logits_from_cosine(self, cosine: Tensor) -> Tensor:
        """Cosine similarities of embeddings (any shape) -> same-species logits (that shape)."""
        return self.log_scale.exp() * cosine + self.bias

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(N, dim) and (N, dim) -> (N,) same-species probabilities of the pairs ``(x[i], y[i])``."""
        cosine = (self.embed(x) * self.embed(y)).sum(-1)  # (N,)
        return torch.sigmoid(self.logits_from_cosine(cosine))


def _check_labelled(features: Tensor, labels: Tensor) -> None:
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}: expected (N, D) and (N,)")
    if int(labels.min()) < 0:
        raise ValueError(f"labels: {int(labels.min())}: expected class indices >= 0 (no unlabelled images)")


def sample_pairs(labels: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` balanced pairs of labelled images: the first half same species (two different
    images, unless the species has only one), the rest not.

    Args:
        labels: (N,) class indices; at least two classes present.
        count: pairs to draw.
        generator: the random source.

    Returns:
        ``(first, second, same)``: (count,) indices into ``labels`` and (count,) float targets.
    """
    present, class_of = labels.unique(return_inverse=True)  # (K,), (N,) class as an index into present
    if present.numel() < 2:
        raise ValueError(f"labels: only class {int(present[0])} present: a pair network needs two classes or more")
    order = torch.argsort(class_of, stable=True)  # (N,) images grouped by class
    sizes = torch.bincount(class_of, minlength=present.numel())  # (K,)
    starts = torch.cumsum(sizes, 0) - sizes  # (K,) each class's first position in order
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel())  # (N,) each image's position in order

    def member(classes: Tensor, avoid: Optional[Tensor] = None) -> Tensor:
        """(P,) classes -> (P,) a random image of each; not the image ``avoid`` names where the class has others."""
        size = sizes[classes]  # (P,)
        draw = torch.rand(classes.shape, generator=generator)  # (P,)
        if avoid is None:
            offsets = (draw * size).long()  # (P,)
        else:  # one of the size - 1 others: skip over the avoided image's own position
            offsets = (draw * (size - 1).clamp_min(1)).long()  # (P,)
            offsets = torch.where(size > 1, offsets + (offsets >= place[avoid] - starts[classes]).long(), 0)
        return order[starts[classes] + offsets.clamp_max(size - 1)]

    first = torch.randint(labels.numel(), (count,), generator=generator)  # (count,)
    positives = count // 2
    # Another class, uniform over the K - 1 others: shift by 1..K-1 around the circle.
    shift = torch.randint(1, present.numel(), (count - positives,), generator=generator)  # (count - positives,)
    second = torch.cat([member(class_of[first[:positives]], avoid=first[:positives]),
                        member((class_of[first[positives:]] + shift) % present.numel())])  # (count,)
    same = torch.cat([torch.ones(positives), torch.zeros(count - positives)])  # (count,)
    return first, second, same


def train_pair_network(
    features: Tensor,
    labels: Tensor,
    *,
    steps: int = 500,
    batch_pairs: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    hidden: int = 128,
    embed: int = 64,
    feature_noise: float = 0.5,
    progress: bool = False,
) -> PairNetwork:
    """Trains a :class:`PairNetwork` on same / different species pairs of labelled features.

    Args:
        features: (N, D) labelled images' pooled features.
        labels: (N,) their class indices (two classes or more).
        steps: optimiser steps.
        batch_pairs: pairs per step, half of them same species.
        lr: AdamW learning rate.
        seed: seeds the network's initialisation and the pairs (the caller's RNG is untouched).
        hidden: the MLP's hidden width.
        embed: the embedding size.
        feature_noise: standard deviation of the Gaussian noise added to the standardised
            features of each training pair (0: none).
        progress: show a tqdm bar of steps.

    Returns:
        The network, in eval mode, on the features' device.
    """
    from tqdm.auto import tqdm

    _check_labelled(features, labels)
    features, labels = features.float(), labels.long().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = PairNetwork(features.shape[1], hidden, embed).to(features.device)
    network.feature_mean.copy_(features.mean(0))
    network.feature_std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    bar = tqdm(range(steps), desc="pair network", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        first, second, same = sample_pairs(labels, batch_pairs, generator)  # (P,), (P,), (P,)
        # noise of feature_noise standard deviations: the embedding standardises with feature_std
        noise = feature_noise * torch.randn((2, batch_pairs, features.shape[1]), generator=generator)  # (2, P, D)
        noise = noise.to(features.device) * network.feature_std
        cosine = (network.embed(features[first.to(features.device)] + noise[0])
                  * network.embed(features[second.to(features.device)] + noise[1])).sum(-1)  # (P,)
        loss = F.binary_cross_entropy_with_logits(network.logits_from_cosine(cosine), same.to(features.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return network.eval()


def class_exemplars(embeddings: Tensor, labels: Tensor, num_classes: int, per_class: int) -> tuple[Tensor, Tensor]:
    """Each class's ``per_class`` labelled images nearest its mean embedding (all, when it has fewer).

    Args:
        embeddings: (N, E) unit embeddings of the labelled images.
        labels: (N,) their classes.
        num_classes: C; a class without images gets no exemplars.
        per_class: m.

    Returns:
        ``(indices, classes)``: (M,) indices into ``embeddings`` and (M,) the class of each, M <= C * m.
    """
    indices, classes = [], []
    for label in range(num_classes):
        members = (labels == label).nonzero().flatten()  # (n_c,)
        if members.numel() == 0:
            continue
        mean = F.normalize(embeddings[members].mean(0), dim=0)  # (E,)
        nearest = (embeddings[members] @ mean).argsort(descending=True)[:per_class]  # (min(n_c, m),)
        indices.append(members[nearest])
        classes.append(torch.full((nearest.numel(),), label, dtype=torch.long, device=labels.device))
    return torch.cat(indices), torch.cat(classes)


@torch.no_grad()
def class_match_scores(
    network: PairNetwork,
    labelled_features: Tensor,
    labelled_labels: Tensor,
    features: Tensor,
    *,
    exemplars_per_class: int = 10,
    num_classes: Optional[int] = None,
    chunk: int = 4096,
) -> Tensor:
    """Each image's mean pair score with each class's exemplars.

    Args:
        network: a trained :class:`PairNetwork`.
        labelled_features: (N, D) the labelled images' features.
        labelled_labels: (N,) their classes.
        features: (U, D) the images to score.
        exemplars_per_class: m, the exemplars of each class (:func:`class_exemplars`).
        num_classes: C; default ``labelled_labels.max() + 1``.
        chunk: images scored at a time (bounds the (chunk, C * m) pair score matrix).

    Returns:
        (U, C) mean pair scores in [0, 1], on the CPU; NaN for a class without labelled images.
    """
    _check_labelled(labelled_features, labelled_labels)
    if exemplars_per_class < 1:
        raise ValueError(f"exemplars_per_class = {exemplars_per_class}: expected an integer >= 1")
    device = network.feature_mean.device
    labelled_labels = labelled_labels.long().to(device)
    num_classes = int(labelled_labels.max()) + 1 if num_classes is None else num_classes
    labelled = network.embed(labelled_features.to(device))  # (N, E)
    indices, classes = class_exemplars(labelled, labelled_labels, num_classes, exemplars_per_class)  # (M,), (M,)
    exemplars = labelled[indices]  # (M, E)
    weights = torch.zeros(indices.numel(), num_classes, device=device)  # (M, C) one column per class
    weights[torch.arange(indices.numel(), device=device), classes] = 1.0
    missing = weights.sum(0) == 0  # (C,)
    weights /= weights.sum(0, keepdim=True).clamp_min(1.0)  # column means
    rows = [torch.zeros(0, num_classes)]
    for start in range(0, features.shape[0], chunk):
        embedded = network.embed(features[start:start + chunk].to(device))  # (B, E)
        pair_scores = torch.sigmoid(network.logits_from_cosine(embedded @ exemplars.T))  # (B, M)
        rows.append((pair_scores @ weights).masked_fill(missing, float("nan")).cpu())  # (B, C)
    return torch.cat(rows)


def pseudo_labels(
    network: PairNetwork,
    labelled_features: Tensor,
    labelled_labels: Tensor,
    unlabelled_features: Tensor,
    *,
    exemplars_per_class: int = 10,
    num_classes: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Labels each unlabelled image with the class whose exemplars it matches best on average.

    Args:
        network: a trained :class:`PairNetwork`.
        labelled_features: (N, D) the labelled images' features.
        labelled_labels: (N,) their classes.
        unlabelled_features: (U, D) the images to label.
        exemplars_per_class: m, the exemplars of each class (:func:`class_exemplars`).
        num_classes: C; default ``labelled_labels.max() + 1``. A class without labelled images is
            never predicted.

    Returns:
        ``(labels, scores)``: (U,) long class indices and (U,) float scores ``p_1 * (1 - p_2)`` in
        [0, 1] (the best and the runner-up class's mean pair scores; ``p_2`` is 0 with one class).
    """
    per_class = class_match_scores(network, labelled_features, labelled_labels, unlabelled_features,
                                   exemplars_per_class=exemplars_per_class, num_classes=num_classes)  # (U, C)
    ranked = per_class.nan_to_num(-1.0)  # (U, C) a class without exemplars ranks last
    if ranked.shape[1] < 2:
        ranked = torch.cat([ranked, torch.zeros(ranked.shape[0], 1)], 1)  # (U, 2) a runner-up scoring 0
    top = ranked.topk(2, dim=1)  # values, indices: (U, 2)
    best, runner_up = top.values[:, 0], top.values[:, 1].clamp_min(0.0)  # (U,), (U,)
    return top.indices[:, 0], (best * (1.0 - runner_up)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class PrecisionAtThreshold:
    """How pseudo-labels scored at or above a threshold fare against the truth."""

    threshold: float
    coverage: float  # share of the images scored >= threshold
    precision: Optional[float]  # share of those labelled correctly; None when none is
    kept: int  # images scored >= threshold

    def to_json(self) -> dict:
        return {"threshold": self.threshold, "coverage": round(self.coverage, 4),
                "precision": None if self.precision is None else round(self.precision, 4), "kept": self.kept}


def precision_coverage(pred: Tensor, scores: Tensor, truth: Tensor, thresholds: list[float]) -> list[PrecisionAtThreshold]:
    """Coverage and precision of pseudo-labels at each threshold.

    Args:
        pred: (U,) predicted classes.
        scores: (U,) their scores.
        truth: (U,) the true classes.
        thresholds: the score thresholds.

    Returns:
        One :class:`PrecisionAtThreshold` per threshold, in the given order.
    """
    if not pred.shape == scores.shape == truth.shape or pred.ndim != 1:
        raise ValueError(f"pred {tuple(pred.shape)}, scores {tuple(scores.shape)}, truth {tuple(truth.shape)}: "
                         f"expected three (U,) tensors")
    correct = pred.long() == truth.long()  # (U,)
    rows = []
    for threshold in thresholds:
        kept = scores >= threshold  # (U,)
        count = int(kept.sum())
        rows.append(PrecisionAtThreshold(
            threshold=float(threshold),
            coverage=count / max(1, pred.numel()),
            precision=float(correct[kept].float().mean()) if count else None,
            kept=count,
        ))
    return rows
