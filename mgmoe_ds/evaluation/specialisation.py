"""What each expert of a routed layer learned: its share of every species' routing mass, in numbers and words.

``class_expert_share`` pools the routing mass of each class's images into a (classes, experts)
table; ``layer_specialisation`` measures how concentrated that table is (utilisation, entropy,
mutual information, the classes each expert over-serves) and says per expert whether it
specialises; ``switch_off_words`` says what switching an expert off costs, against one binomial
standard error. Plain numpy and torch: the figures live in ``figures.py``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

SPECIALIST_LIFT = 2.0  # a class over-serves an expert when it sends it at least this times the expert's utilisation
SPECIALIST_Z = 3.0  # ... and that excess is at least this many chance standard errors (see layer_specialisation)
UNUSED_FRACTION = 0.01  # an expert is unused below this fraction of the uniform share 1 / E

ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]


def class_expert_share(labels: Tensor, expert_mass: Tensor, num_classes: int) -> Tensor:
    """Each class's share of its images' routing mass on each expert.

    The mass of a class's images is summed per expert, then the row is divided by its total, so an
    image with more routing mass (none of its choices dropped) counts for more. A class with no
    images, or whose images carry no routing mass at all, gets a zero row.

    Args:
        labels: (N,) int64 class of each image.
        expert_mass: (N, E) how much of image i went to expert e: for a token-level layer the
            fraction of its tokens' combine weight on e, for the head router its renormalised weight.
        num_classes: C, the number of rows (classes beyond the largest label get zero rows).

    Returns:
        (C, E) float64 table whose non-zero rows sum to 1.
    """
    if labels.dim() != 1 or expert_mass.dim() != 2 or labels.shape[0] != expert_mass.shape[0]:
        raise ValueError(f"class_expert_share: labels must be (N,) and expert_mass (N, E); got "
                         f"{tuple(labels.shape)} and {tuple(expert_mass.shape)}")
    mass = expert_mass.detach().to("cpu", torch.float64)  # (N, E)
    totals = torch.zeros(num_classes, mass.shape[1], dtype=torch.float64)  # (C, E)
    totals.index_add_(0, labels.detach().cpu().long(), mass)
    row_mass = totals.sum(dim=1, keepdim=True)  # (C, 1)
    return torch.where(row_mass > 0, totals / row_mass.clamp_min(1e-300), torch.zeros_like(totals))  # (C, E)


def _entropy(rows: np.ndarray) -> np.ndarray:
    """(..., E) distributions -> (...) entropy in nats, with 0 log 0 = 0."""
    logs = np.log(np.where(rows > 0, rows, 1.0))
    return -(rows * logs).sum(axis=-1)


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.1f}%"


def _name_list(names: Sequence[str], top: int) -> str:
    shown = ", ".join(names[:top])
    return shown + (", ..." if len(names) > top else "")


def layer_specialisation(share: ArrayLike, class_images: ArrayLike, class_names: Sequence[str],
                         expert_names: Sequence[str], *, top: int = 5) -> dict[str, Any]:
    """How much each expert of one routed layer specialises on some classes, in numbers and words.

    Classes are weighted by their image counts, so p(class) = images / all images (classes whose
    share row is zero carry no weight), p(expert | class) = ``share[c]``, and:

    - ``utilisation[e]`` = p(e) = sum_c p(c) share[c, e], the expert's share of all routing mass;
    - ``utilisation_spread``: max / min utilisation (``None`` when an expert gets nothing) and the
      coefficient of variation (population std / mean) over experts;
    - ``class_expert_entropy``: sum_c p(c) H(share[c]) in nats, and that divided by log E
      (1 = every class spread evenly over the experts, 0 = every class on one expert);
    - ``mutual_information`` = H(utilisation) - class_expert_entropy, in nats (log E at most);
    - ``top_classes[e]``: the ``top`` classes with the highest lift = share[c, e] / utilisation[e].

    The rule for "specialises": expert e specialises when at least one class is a *specialist
    class* of e, meaning its lift is at least ``SPECIALIST_LIFT`` (2) and its excess share is beyond
    chance, share[c, e] - u >= ``SPECIALIST_Z`` (3) * sqrt(u (1 - u) / images[c]) with u the
    expert's utilisation: a class's share is a mean over its images of values in [0, 1] with mean u
    if routing ignored the class, whose variance is at most u (1 - u), so the guard keeps the
    noisy rows of classes with a few images (at 1,000 classes, dozens reach lift 2 by chance) from
    making every expert a "specialist". With two experts at even utilisation lift 2 needs a class
    to send all its mass to one expert: the rule is strict for small E on purpose. An expert whose
    utilisation is below ``UNUSED_FRACTION`` (1%) of the uniform share 1 / E is called unused.

    Args:
        share: (C, E) output of ``class_expert_share``.
        class_images: (C,) images of each class in the evaluated split.
        class_names: C species names.
        expert_names: E expert names, used as keys and in the sentences ("expert <name> ...").
        top: classes listed per expert in ``top_classes`` and named in a sentence.

    Returns:
        A JSON-serialisable dict with the keys above and ``summary``: one sentence per expert.
    """
    table = np.asarray(torch.as_tensor(share, dtype=torch.float64))  # (C, E)
    images = np.asarray(torch.as_tensor(class_images, dtype=torch.float64))  # (C,)
    num_classes, num_experts = table.shape
    if images.shape != (num_classes,) or len(class_names) != num_classes or len(expert_names) != num_experts:
        raise ValueError(f"layer_specialisation: share is {table.shape}, but class_images has shape {images.shape}, "
                         f"{len(class_names)} class names and {len(expert_names)} expert names")
    counted = images * (table.sum(axis=1) > 0)  # (C,) classes with routing mass
    class_weight = counted / max(counted.sum(), 1e-300)  # (C,) p(class)
    utilisation = class_weight @ table  # (E,) p(expert)
    class_entropy = float(class_weight @ _entropy(table))
    log_e = math.log(num_experts) if num_experts > 1 else 0.0
    mutual_information = max(0.0, float(_entropy(utilisation)) - class_entropy) if counted.sum() > 0 else 0.0
    mean_use = float(utilisation.mean())
    lift = np.divide(table, utilisation, out=np.zeros_like(table), where=utilisation > 0)  # (C, E)
    # a class's share would be within a few standard errors of u if routing ignored the class
    chance = SPECIALIST_Z * np.sqrt(utilisation * (1 - utilisation) / np.maximum(images, 1.0)[:, None])  # (C, E)
    specialist = (lift >= SPECIALIST_LIFT) & (table - utilisation >= chance) & (counted[:, None] > 0)  # (C, E)

    top_classes: dict[str, list[dict[str, Any]]] = {}
    summary: list[str] = []
    for e, expert in enumerate(expert_names):
        # by lift, descending; ties by class index, as stable as the class list
        order = [c for c in np.argsort(-lift[:, e], kind="stable") if counted[c] > 0]
        top_classes[expert] = [{"species": class_names[c], "share": float(table[c, e]), "lift": float(lift[c, e]),
                                "images": int(images[c])} for c in order[:top]]
        summary.append(_expert_sentence(expert, utilisation[e], num_experts, lift[order, e] if order else [],
                                        [class_names[c] for c in order if specialist[c, e]],
                                        table[specialist[:, e], e], counted[specialist[:, e]], top))
    return {
        "utilisation": {expert: float(utilisation[e]) for e, expert in enumerate(expert_names)},
        "utilisation_spread": {
            "max_over_min": float(utilisation.max() / utilisation.min()) if utilisation.min() > 0 else None,
            "coefficient_of_variation": float(utilisation.std() / mean_use) if mean_use > 0 else 0.0,
        },
        "class_expert_entropy": {"nats": class_entropy, "normalised": class_entropy / log_e if log_e > 0 else 0.0},
        "mutual_information": mutual_information,
        "max_mutual_information": log_e,
        "top_classes": top_classes,
        "rule": (f"an expert specialises when some species sends it >= {SPECIALIST_LIFT:g}x its average share "
                 f"and {SPECIALIST_Z:g} chance standard errors above it; unused below "
                 f"{100 * UNUSED_FRACTION:g}% of the uniform share"),
        "summary": summary,
    }


def _expert_sentence(expert: str, utilisation: float, num_experts: int, lifts: Sequence[float],
                     specialist_names: list[str], specialist_share: np.ndarray, specialist_images: np.ndarray,
                     top: int) -> str:
    """One plain-English sentence about one expert (see ``layer_specialisation`` for the rules)."""
    uniform = 1.0 / num_experts
    if utilisation < UNUSED_FRACTION * uniform:
        return (f"expert {expert} is unused: it gets {100 * utilisation:.2f}% of the routing mass "
                f"(uniform would be {_percent(uniform)})")
    if specialist_names:
        pooled = float(specialist_images @ specialist_share / specialist_images.sum())  # image-weighted share
        count = len(specialist_names)
        return (f"expert {expert} specialises: {count} species ({_name_list(specialist_names, top)}) "
                f"send{'s' if count == 1 else ''} it {_percent(pooled)} of their routing mass, "
                f"{pooled / utilisation:.1f}x its average share ({_percent(utilisation)})")
    highest = float(lifts[0]) if len(lifts) else 0.0
    if highest < SPECIALIST_LIFT:
        return (f"expert {expert} is general: no species sends it more than {highest:.1f}x its average share "
                f"({_percent(utilisation)})")
    return (f"expert {expert} is general: the species that send it {SPECIALIST_LIFT:g}x its average share "
            f"({_percent(utilisation)}) or more (highest {highest:.1f}x) have too few images to tell from chance")


def binomial_standard_error(top1: float, images: int) -> float:
    """sqrt(p (1 - p) / n): one standard error of an accuracy ``top1`` measured on ``images`` images."""
    return math.sqrt(top1 * (1 - top1) / max(1, images))


def switch_off_words(baseline_top1: float, switched_off_top1: Mapping[str, float], standard_error: float) -> list[str]:
    """One sentence per expert on what switching it off does to top-1, in points.

    A change of at most one standard error is called a tie (the rule ``ablate.compare`` uses).

    Args:
        baseline_top1: top-1 (a fraction) with every expert on.
        switched_off_top1: {expert name: top-1 (a fraction) with that expert switched off}.
        standard_error: one binomial standard error of the baseline, a fraction (see
            ``binomial_standard_error``).

    Returns:
        Sentences such as "switching off expert 2 costs 4.1 points (SE 1.5)", in the mapping's order.
    """
    lines = []
    se_points = 100 * standard_error
    for expert, top1 in switched_off_top1.items():
        cost = 100 * (baseline_top1 - top1)  # points lost by switching the expert off
        if abs(cost) <= se_points:
            change = round(-cost, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
            lines.append(f"switching off expert {expert} is a tie: {change:+.1f} points, within one standard "
                         f"error (SE {se_points:.1f})")
        elif cost > 0:
            lines.append(f"switching off expert {expert} costs {cost:.1f} points (SE {se_points:.1f})")
        else:
            lines.append(f"switching off expert {expert} gains {-cost:.1f} points (SE {se_points:.1f})")
    return lines
