"""``mgmoe eval`` for the backbone's token-level MoE layers: what each expert learned, and what it is worth.

For each MoE block: the class x expert share table (a figure, ``routing_<block>.png``), expert
utilisation, the classes each expert over-serves, a sentence per expert, and the top-1 accuracy
of the whole model with one expert of that block switched off (the gate renormalised over the
others), against one binomial standard error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from mgmoe_ds.evaluation.figures import plot_routing_share
from mgmoe_ds.evaluation.specialisation import (
    binomial_standard_error,
    class_expert_share,
    layer_specialisation,
    switch_off_words,
)
from mgmoe_ds.moe.routing import RoutingRequest

MAX_SWITCH_OFF = 16  # a block with more experts is switched off for its this many most used ones


def figure_name(layer: str) -> str:
    return f"routing_{layer.replace('.', '_')}.png"


def experts_to_switch_off(utilisation: Sequence[float], limit: int = MAX_SWITCH_OFF) -> list[int]:
    """Every expert, or the ``limit`` most used when there are more (the rest barely matter)."""
    order = sorted(range(len(utilisation)), key=lambda e: -utilisation[e])
    return sorted(order[:limit])


@torch.no_grad()
def switch_off_top1(model, loader, head_routing: RoutingRequest, plan: dict[str, list[int]], *,
                    device: torch.device, progress: bool = True) -> dict[str, dict[int, float]]:
    """Top-1 of the model with expert e of block ``layer`` switched off, for each pair in ``plan``.

    Each variant is a whole forward (the backbone changes), on the same images in the same order.
    """
    from tqdm.auto import tqdm

    num_experts = {name: layer.routed.num_experts for name, layer in model.token_moe_layers().items()}
    correct = {(layer, e): 0 for layer, experts in plan.items() for e in experts}
    total = 0
    model.eval()
    for batch in tqdm(loader, desc="switching experts off", disable=not progress or not correct, dynamic_ncols=True):
        images, labels = batch["images"].to(device, dtype=torch.float32), batch["labels"].to(device)
        for layer, expert in correct:
            allowed = torch.ones(num_experts[layer], dtype=torch.bool, device=device)
            allowed[expert] = False
            logits = model(images, routing={"moe": head_routing, layer: RoutingRequest(allowed_experts=allowed)}).logits
            correct[(layer, expert)] += int((logits.argmax(dim=-1) == labels).sum())
        total += int(labels.shape[0])
    result: dict[str, dict[int, float]] = {layer: {} for layer in plan}
    for (layer, expert), hits in correct.items():
        result[layer][expert] = hits / max(total, 1)
    return result


def hard_masked_experts(model) -> dict[str, list[int]]:
    """By block: the experts its hard constraint masks in evaluation (empty where it does not);
    ``model`` is in evaluation mode."""
    masked = {}
    for name, layer in model.token_moe_layers().items():
        allowed = layer.routing_mask()
        masked[name] = [] if allowed is None else torch.nonzero(~allowed.cpu()).flatten().tolist()
    return masked


def plan_switch_off(token_moe_mass: dict[str, Tensor]) -> dict[str, list[int]]:
    """Which experts of each block to switch off: by their measured utilisation; an expert no token
    reached (one the hard constraint masks, say) is left out: switching it off changes nothing."""
    plan = {}
    for name, mass in token_moe_mass.items():
        utilisation = (mass.sum(0) / mass.sum().clamp_min(1e-12)).tolist()  # (E,)
        plan[name] = [e for e in experts_to_switch_off(utilisation) if utilisation[e] > 0]
    return plan


def backbone_moe_report(token_moe_mass: dict[str, Tensor], labels: Tensor, class_names: Sequence[str],
                        routed_top1: float, switched_off: Optional[dict[str, dict[int, float]]],
                        out_dir: Path, masked: Optional[dict[str, list[int]]] = None) -> dict[str, Any]:
    """Per block: the specialisation analysis, the switch-off accuracies in words, its figure, and
    the experts the hard constraint masks in evaluation (``masked``, by block)."""
    num_classes = len(class_names)
    class_images = torch.bincount(labels, minlength=num_classes)  # (C,)
    standard_error = binomial_standard_error(routed_top1, int(labels.numel()))
    report = {}
    for name, mass in token_moe_mass.items():
        experts = [str(e) for e in range(mass.shape[1])]  # the sentences say "expert <id>"
        share = class_expert_share(labels, mass, num_classes)  # (C, E)
        layer = layer_specialisation(share, class_images, class_names, experts)
        layer["figure"] = figure_name(name)
        layer["masked_by_hard_constraint"] = list((masked or {}).get(name, []))
        plot_routing_share(share.numpy(), class_names, experts,
                           title=f"backbone MoE block {name}: share of each species' tokens per expert",
                           path=out_dir / layer["figure"])
        if switched_off and name in switched_off:
            off = {str(e): top1 for e, top1 in sorted(switched_off[name].items())}
            layer["switched_off_top1"] = off
            layer["switch_off_summary"] = switch_off_words(routed_top1, off, standard_error)
        report[name] = layer
    return report


def render_backbone_moe(section: dict[str, Any]) -> list[str]:
    """Markdown lines of the report's backbone MoE section."""
    if not section:
        return []
    lines = ["", "## Backbone MoE blocks", ""]
    for name, layer in section.items():
        entropy = layer["class_expert_entropy"]
        spread = layer["utilisation_spread"]
        ratio = spread["max_over_min"]
        lines += [f"### {name}", "",
                  f"Class-expert entropy {entropy['normalised']:.2f} of its maximum, mutual information "
                  f"{layer['mutual_information']:.3f} of at most {layer['max_mutual_information']:.3f} nats; "
                  f"utilisation max/min {'∞' if ratio is None or math.isinf(ratio) else f'{ratio:.2f}'}, "
                  f"coefficient of variation {spread['coefficient_of_variation']:.2f}.", ""]
        lines += [f"- {sentence}" for sentence in layer["summary"]]
        if layer.get("masked_by_hard_constraint"):
            ids = ", ".join(str(e) for e in layer["masked_by_hard_constraint"])
            lines += [f"- Masked by the hard constraint (over its threshold when training ended; evaluated "
                      f"without them, as trained): expert{'s' if len(layer['masked_by_hard_constraint']) > 1 else ''} "
                      f"{ids}."]
        if "switch_off_summary" in layer:
            lines += ["", "With one expert switched off:", ""]
            lines += [f"- {sentence}" for sentence in layer["switch_off_summary"]]
        lines += ["", f"![{name}]({layer['figure']})", ""]
    return lines
