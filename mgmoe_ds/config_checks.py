"""Range checks of the config's larger sections, each failure one line through the caller's ``check``.

``check(ok, key, value, accepted)`` is ``config._validate``'s: it raises a ``ConfigError`` naming
the file, ``mgmoe.<key>``, the value and what is accepted.
"""

from __future__ import annotations

import json
from typing import Any


def check_backbone_moe(b: Any, expert_parallel_size: int, check) -> None:
    key = "model.backbone_moe"
    check(len(b.blocks) >= 1, f"{key}.blocks", b.blocks, "at least one block index or name")
    check(len(set(map(str, b.blocks))) == len(b.blocks), f"{key}.blocks", b.blocks, "each block once")
    check(all(not isinstance(i, int) or i >= 0 for i in b.blocks), f"{key}.blocks", b.blocks,
          "block indices >= 0 or timm module paths")
    check(b.num_experts >= 2, f"{key}.num_experts", b.num_experts, "an integer >= 2")
    check(1 <= b.top_k <= b.num_experts, f"{key}.top_k", b.top_k, f"an integer from 1 to num_experts ({b.num_experts})")
    check(b.num_experts % expert_parallel_size == 0, f"{key}.num_experts", b.num_experts,
          f"a multiple of moe.expert_parallel_size ({expert_parallel_size}): every rank holds the same number")
    check(b.capacity_factor > 0, f"{key}.capacity_factor", b.capacity_factor, "a number > 0")
    check(b.eval_capacity_factor > 0, f"{key}.eval_capacity_factor", b.eval_capacity_factor, "a number > 0")
    check(b.min_capacity >= 1, f"{key}.min_capacity", b.min_capacity, "an integer >= 1")
    check(b.upcycle_noise >= 0, f"{key}.upcycle_noise", b.upcycle_noise, "a number >= 0")
    soft, hard = b.constraint.soft, b.constraint.hard
    if soft is not None:
        for name in ("importance_weight", "load_weight"):
            value = getattr(soft, name)
            check(value >= 0, f"{key}.constraint.soft.{name}", value, "a number >= 0")
    if hard is not None:
        # A threshold at or below the uniform share 1/E would mask experts of a perfectly balanced gate.
        check(1.0 / b.num_experts < hard.threshold <= 1, f"{key}.constraint.hard.threshold", hard.threshold,
              f"a share in (1/num_experts, 1] = ({1 / b.num_experts:.4g}, 1]")
        check(0 <= hard.momentum < 1, f"{key}.constraint.hard.momentum", hard.momentum, "a number in [0, 1)")


def check_pretrained(model: Any, check) -> None:
    """An offline checkpoint name must exist and fit ``model.backbone``; a file path passes."""
    from mgmoe_ds.offline_weights import OFFLINE_WEIGHTS, looks_like_offline_name

    if model.pretrained is None:
        return
    weights = OFFLINE_WEIGHTS.get(model.pretrained)
    if weights is None:
        check(not looks_like_offline_name(model.pretrained), "model.pretrained", model.pretrained,
              f"an offline checkpoint ({', '.join(json.dumps(n) for n in OFFLINE_WEIGHTS)}) or a weights file")
    else:
        check(model.backbone == weights.timm_arch, "model.backbone", model.backbone,
              f"{json.dumps(weights.timm_arch)}, the architecture of model.pretrained = {json.dumps(weights.name)}")


def check_box_task(box: Any, check) -> None:
    """``model.tasks.bbox`` (``config.BoxTaskConfig``)."""
    check(box.loss_weight >= 0, "model.tasks.bbox.loss_weight", box.loss_weight, "a number >= 0")
    for name in ("channels", "grid", "hidden"):
        check(getattr(box, name) >= 1, f"model.tasks.bbox.{name}", getattr(box, name), "an integer >= 1")


def check_mixing(data: Any, stages: list[Any], check) -> None:
    """``data.mixup`` / ``data.cutmix`` / ``data.mix_off_last_epochs`` (``config.DataConfig``): the last
    N epochs are counted back from the curriculum's end over stages measured in epochs."""
    for name in ("mixup", "cutmix"):
        check(getattr(data, name) >= 0, f"data.{name}", getattr(data, name), "a number >= 0 (Beta's alpha; 0: off)")
    off = data.mix_off_last_epochs
    check(off >= 0, "data.mix_off_last_epochs", off, "an integer >= 0")
    if off == 0 or (data.mixup == 0 and data.cutmix == 0):
        return
    epochs = 0
    for i in reversed(range(len(stages))):
        if epochs >= off:
            return
        if stages[i].epochs is None:
            check(False, "data.mix_off_last_epochs", off, f"at most {epochs}, the epochs after curriculum.stages[{i}], "
                  f"which is measured in steps (give it epochs to count it)")
        epochs += stages[i].epochs
    check(epochs > off, "data.mix_off_last_epochs", off,
          f"fewer than the curriculum's {epochs} epochs (at {off} no batch would be mixed)")


def check_distill(distill: Any, check) -> None:
    """The ``distill`` block (``config.DistillConfig``); the teacher's files are read when training starts."""
    check(bool(distill.teacher), "distill.teacher", distill.teacher, "a run folder, an exported .safetensors file, "
          "or with distill.timm_model a weights file")
    check(0 <= distill.weight <= 1, "distill.weight", distill.weight, "a number in [0, 1] (the label's share)")
    check(0 <= distill.label_smoothing < 1, "distill.label_smoothing", distill.label_smoothing, "a number in [0, 1)")
    check(distill.temperature > 0, "distill.temperature", distill.temperature, "a number > 0")
    check(distill.img_size is None or distill.img_size >= 16, "distill.img_size", distill.img_size,
          "an integer >= 16, or null (model.img_size)")
    check(distill.img_size is None or distill.timm_model is not None, "distill.img_size", distill.img_size,
          "null unless distill.timm_model is set (a model of this product brings its own preprocessing)")


def check_fusion(fusion: Any, stages: list[Any], check) -> None:
    """``model.fusion`` (``config.FusionConfig``) and the stages that use it: a "fusion" stage needs
    the head, and no stage trains it before the first "fusion" stage (it is used from there on)."""
    if fusion is not None:
        check(fusion.hidden >= 1, "model.fusion.hidden", fusion.hidden, "an integer >= 1")
    first = next((i for i, stage in enumerate(stages) if stage.name == "fusion"), None)
    if first is not None:
        check(fusion is not None, "model.fusion", None, f"an object or true: curriculum.stages[{first}] is the "
              f"fusion stage, which trains it (set mgmoe.model.fusion, e.g. true)")
    for i, stage in enumerate(stages):
        lr = stage.lr.get("fusion", 0)
        check(fusion is not None or lr == 0, f"curriculum.stages[{i}].lr.fusion", lr,
              "0 or absent while mgmoe.model.fusion is null")
        check(lr == 0 or (first is not None and first <= i), f"curriculum.stages[{i}].lr.fusion", lr,
              "0 or absent in a stage before the first \"fusion\" stage (the head is used from that stage on)")


def check_clustering(cur: Any, check) -> None:
    """``curriculum.knn_neighbours`` / ``knn_agreement`` (``config.CurriculumConfig``), checked whatever
    ``curriculum.clustering`` is, so a value is never wrong silently until the method changes."""
    check(cur.knn_neighbours >= 1, "curriculum.knn_neighbours", cur.knn_neighbours, "an integer >= 1")
    check(0 < cur.knn_agreement <= 1, "curriculum.knn_agreement", cur.knn_agreement,
          "a share in (0, 1]: an image whose neighbours' majority holds less of its votes is an outlier")


def check_labels(data: Any, check) -> None:
    """``data.pseudo_min_score``, ``data.pseudo_weight`` and ``data.val_split`` (``config.DataConfig``):
    what the run takes as labels, and how much a pseudo-label counts."""
    check(0 <= data.pseudo_min_score <= 1, "data.pseudo_min_score", data.pseudo_min_score,
          "a score in [0, 1]: pseudo-labels scored below it are left out of training")
    check(0 <= data.pseudo_weight <= 1, "data.pseudo_weight", data.pseudo_weight,
          "a weight in [0, 1]: a pseudo-labelled image's loss relative to a labelled one's (1)")
    check(data.val_split != "unlabelled", "data.val_split", data.val_split,
          "a labelled split: the unlabelled split (mgmoe shards build --unlabelled) has no labels to validate on")


def check_routing(routing: str, stages: list[Any], check) -> None:
    """``moe.routing`` (``config.MoEConfig``): "cluster" routes through clusters, so some stage must
    compute them (a stage class with ``computes_clusters``; the stage names are checked before)."""
    from mgmoe_ds.curriculum import list_stages, stage_class  # the stage registry (no timm, no DeepSpeed)

    if routing != "cluster" or any(stage_class(stage.name).computes_clusters for stage in stages):
        return
    computing = ", ".join(json.dumps(n) for n in list_stages() if stage_class(n).computes_clusters)
    check(False, "moe.routing", routing, f"\"topk\", or a curriculum.stages with a stage that clusters the "
          f"training images ({computing}): \"cluster\" routes through the clusters")
