"""The typed run configuration: the ``"mgmoe"`` block of a DeepSpeed JSON file.

DeepSpeed ignores unknown top-level keys, so one JSON file carries both DeepSpeed's settings and
ours. This module reads only the ``"mgmoe"`` block, builds frozen dataclasses from it and rejects
unknown keys, wrong types and out-of-range values with one line that names the file, the key,
the value and what is accepted. The rest of the JSON goes to DeepSpeed untouched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from mgmoe_ds.config_checks import (check_backbone_moe, check_box_task, check_clustering, check_distill, check_fusion,
                                    check_labels, check_mixing, check_pretrained, check_routing)
from mgmoe_ds.typed_json import (CHECKS, SHORT_FORMS, ConfigError, apply_overrides, build_dataclass, fail,  # noqa: F401
                                 options_from_dict, parse_override)

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"
# The parameter groups every model has, by name: a stage trains some of them, each at its own lr.
# (``MGMoE.group_matcher`` says which parameter belongs to which.)
# "backbone_top": the backbone's blocks above the cache's cut (cache.depth); "backbone": the rest of it.
# "backbone_moe": the routers and experts of the token-level MoE layers inside the backbone.
# "box_tower": the box task's tower (model.tasks.bbox); "fusion": the fusion head (model.fusion).
PARAMETER_GROUPS = ("backbone", "backbone_top", "backbone_moe", "router", "fallback", "experts", "expert_heads",
                    "box_tower", "fusion")


@dataclass(frozen=True)
class ExpertSpec:
    name: str  # a name from mgmoe_ds.experts.list_experts()
    options: dict[str, Any] = field(default_factory=dict)  # create_expert keywords, checked at load (options_class)


def _default_experts() -> list[ExpertSpec]:
    return [ExpertSpec("mpsa"), ExpertSpec("pmg"), ExpertSpec("transfg"), ExpertSpec("pim")]


@dataclass(frozen=True)
class SoftConstraintConfig:
    importance_weight: float = 0.01  # weight of <layer>.importance: CV^2 of each expert's summed gate probability
    load_weight: float = 0.01  # weight of <layer>.load: GShard's load-balancing loss


@dataclass(frozen=True)
class HardConstraintConfig:
    threshold: float = 0.3  # an expert whose running share of the routing (mean top-K gate weight, before the mask) exceeds this is masked
    momentum: float = 0.9  # EMA momentum of the running share (weight of the old value)
    at_eval: bool = True  # evaluation, export and predict mask the experts training ended with masked


@dataclass(frozen=True)
class ConstraintConfig:
    soft: Optional[SoftConstraintConfig] = field(default_factory=SoftConstraintConfig)  # null: no auxiliary losses
    hard: Optional[HardConstraintConfig] = None  # null: no masking


@dataclass(frozen=True)
class BackboneMoEConfig:
    # Which blocks become MoE blocks: an integer counts the backbone's supported residual blocks in
    # forward order from 0 (ViT blocks; EfficientNet and ResNet bottleneck blocks across stages);
    # a string is the block's timm module path ("blocks.5.1", "layer3.2").
    blocks: list[Union[int, str]] = field(default_factory=list)
    num_experts: int = 8  # E per MoE block
    top_k: int = 2  # experts per token (or per image)
    granularity: Literal["token", "image"] = "token"  # a gate decision per token, or per image on pooled tokens
    capacity_factor: float = 1.25  # training capacity = factor * tokens * top_k / experts
    eval_capacity_factor: float = 2.0  # the same in evaluation
    min_capacity: int = 4  # lower bound on each expert's slots
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)  # soft and/or hard
    upcycle_noise: float = 0.01  # every expert starts as the block's dense layer plus noise of this relative std
    backend: Literal["auto", "padded", "grouped"] = "auto"  # batched expert matmul: grouped_mm where torch runs it, else padded bmm


@dataclass(frozen=True)
class BoxTaskConfig:
    loss_weight: float = 1.0  # weight of the "bbox" loss (complete-IoU); a stage's loss_weights may override it
    channels: int = 64  # channels the tower projects each backbone token to
    grid: int = 7  # the projected token map is pooled to grid x grid before the MLP
    hidden: int = 256  # width of the tower's MLP


@dataclass(frozen=True)
class TasksConfig:
    # A box tower on the shared backbone tokens, trained with complete-IoU beside the classes
    # (samples without a box are masked out of its loss); null: classes only.
    bbox: Optional[BoxTaskConfig] = None


@dataclass(frozen=True)
class FusionConfig:
    hidden: int = 64  # width of the fusion head's MLP, which corrects the router's weights per image


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vit_tiny_patch16_224"  # any timm model name
    pretrained: Optional[str] = None  # local weights file, "efficientnet-lite0/1/2" (offline packages), or None
    img_size: int = 224  # input resolution in pixels
    num_classes: Optional[int] = None  # None: taken from the dataset's manifest or the registry
    experts: list[ExpertSpec] = field(default_factory=_default_experts)  # one entry per expert
    backbone_options: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    backbone_moe: Optional[BackboneMoEConfig] = None  # token-level MoE blocks inside the backbone, or null
    tasks: TasksConfig = field(default_factory=TasksConfig)  # tasks beside the classes (the box)
    # A fusion head over the experts each image ran, trained by the "fusion" stage; null: none
    fusion: Optional[FusionConfig] = None


@dataclass(frozen=True)
class MoEConfig:
    top_k: int = 2  # experts per image, 1..num_experts
    capacity_factor: float = 1.25  # training capacity = factor * tokens * top_k / experts
    eval_capacity_factor: float = 2.0  # same, in evaluation
    min_capacity: int = 4  # lower bound on the capacity of each expert
    dropless: bool = False  # capacity = the largest load in the expert-parallel group: no drops
    noisy_gate_policy: Optional[Literal["jitter", "rsample"]] = None  # training-only router noise
    jitter_eps: float = 0.01  # multiplicative input jitter range for "jitter"
    batch_prioritized_routing: bool = False  # fill capacity in order of router confidence
    expert_parallel_size: int = 1  # P: experts are split over P ranks; must divide num_experts
    load_balance_weight: float = 0.01  # weight of the GShard load-balancing loss
    expert_loss_weight: float = 1.0  # weight of each expert's own CE on its own logits (<layer>.<expert>.standalone)
    z_loss_weight: float = 0.001  # weight of the router z-loss
    diversity_weight: float = 0.0  # weight of <layer>.diversity: -sum_i KL(p_i || p) over the experts an image ran
    drop_fallback: Literal["shared_head"] = "shared_head"  # what a token that lost every expert gets
    routing: Literal["topk", "cluster"] = "topk"  # "cluster": once clustered, Top-K among the cluster's teacher experts


@dataclass(frozen=True)
class DataConfig:
    dataset: Optional[str] = None  # dataset folder with manifest.json, "registry", or None for the demo
    num_workers: int = 2  # DataLoader workers per rank
    persistent_workers: bool = True  # keep the workers between epochs (no re-fork per pass)
    shuffle_buffer: int = 1000  # sample shuffle buffer size
    resampled: bool = False  # endless resampling of shards instead of finite epochs
    balance: Optional[Literal["class", "sqrt"]] = None  # resampling for long-tailed data
    val_split: str = "val"  # split used for validation statistics
    mixup: float = 0.0  # Mixup's alpha: lam ~ Beta(alpha, alpha) per training batch; 0: off
    cutmix: float = 0.0  # CutMix's alpha; 0: off. Both on: CutMix for half the batches, Mixup for the rest
    mix_off_last_epochs: int = 0  # no mixing in the curriculum's last N epochs (counted over its stages)
    pseudo_min_score: float = 0.0  # train on pseudo-labels (json "pseudo") scored >= this
    pseudo_weight: float = 1.0  # a pseudo-labelled image's weight in the losses on its label, in [0, 1] (a label's: 1)


@dataclass(frozen=True)
class StageConfig:
    name: str  # a registered stage: "warmup", "routing" (stage 1), "residual" (stage 2), ...
    epochs: Optional[int] = None  # length in epochs (exactly one of epochs/steps)
    steps: Optional[int] = None  # length in optimiser steps
    lr: dict[str, float] = field(default_factory=dict)  # absolute lr per parameter group (replaces the stage's defaults; 0 freezes)
    loss_weights: dict[str, float] = field(default_factory=dict)  # loss weights by name or glob pattern ("*.load_balance")


@dataclass(frozen=True)
class CurriculumConfig:
    stages: list[StageConfig] = field(
        default_factory=lambda: [
            StageConfig("warmup", epochs=1),
            StageConfig("routing", epochs=1),
            StageConfig("residual", epochs=1),
        ]
    )
    num_clusters: int = 8  # clusters of training samples for cluster-level routing
    teacher_temperature: float = 1.0  # softmax temperature of the cluster teacher
    # what the teacher grades an expert by on a cluster's validation images: the mean log-likelihood of
    # the true class, its mean probability, or the expert's accuracy
    teacher_score: Literal["log_likelihood", "probability", "accuracy"] = "log_likelihood"
    kl_weight: float = 1.0  # weight of KL(cluster teacher || router) in stage 1 (the teacher is the target)
    clustering: Literal["kmeans", "kmeans+knn"] = "kmeans"  # "kmeans+knn": refined by each image's neighbours
    knn_neighbours: int = 10  # "kmeans+knn": k, the nearest other training images whose k-means clusters vote
    knn_agreement: float = 0.5  # "kmeans+knn": an image whose majority has a smaller share of the votes is an outlier


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # seeds Python, NumPy and torch on every rank
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at stage ends
    max_bad_steps: int = 5  # consecutive NaN/inf losses before the run stops
    init_from: Optional[str] = None  # a run folder or exported .safetensors whose weights the run starts from
    freeze: list[str] = field(default_factory=list)  # parameter groups no stage trains, e.g. ["backbone", "experts"]


@dataclass(frozen=True)
class CacheConfig:
    mode: Literal["auto", "off"] = "auto"  # "auto": stages with a frozen backbone train from cached features
    views: int = 1  # 1: eval-transform features; N > 1: N augmented train-transform views per sample
    memory_limit_gb: float = 8.0  # per rank; a larger cache is memory-mapped files in RUN/feature_cache
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage dtype of the cached features
    dir: Optional[str] = None  # a folder shared by runs (sweeps): caches are memory-mapped there and reused by any run with the same key
    # None: the cache holds the backbone's outputs. N: it holds the activation after block N (timm
    # EfficientNet's model.blocks[N]) and the levels below it; the blocks above form the parameter
    # group "backbone_top", which stages may train from that cache (their BatchNorm statistics stay
    # frozen, as the rest of a backbone whose "backbone" group does not train).
    depth: Optional[int] = None


@dataclass(frozen=True)
class DistillConfig:
    teacher: str  # a run folder or `mgmoe export` file of this product, or (with timm_model) a local weights file
    timm_model: Optional[str] = None  # a timm classifier whose weights are `teacher`, for exactly the dataset's classes
    img_size: Optional[int] = None  # the timm teacher's input size; default model.img_size
    weight: float = 0.5  # lambda: the smoothed label's share of the target; the teacher's is 1 - lambda
    label_smoothing: float = 0.1  # smoothing of the label's one-hot
    cosine: bool = True  # add the loss "distill.cosine" = 1 - cos(target, prediction) (weight 1 unless set)
    temperature: float = 1.0  # softmax temperature of the teacher's logits


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: Optional[DistillConfig] = None  # teacher soft labels for the task loss; null: the labels alone

    @property
    def num_experts(self) -> int:
        return len(self.model.experts)


def _check_expert(spec: ExpertSpec, key: str, source: str) -> None:
    """The expert is registered and its options build its options dataclass."""
    from mgmoe_ds.experts import expert_class, list_experts  # here, not at the top: the registry imports timm

    if spec.name not in list_experts():
        raise fail(source, f"{key}.name", spec.name, f"a registered expert ({', '.join(list_experts())})")
    options_from_dict(expert_class(spec.name).options_class, spec.options, source, f"{key}.options")


SHORT_FORMS[ExpertSpec] = lambda value: {"name": value} if isinstance(value, str) else value  # "mpsa" = {"name": "mpsa"}
CHECKS[ExpertSpec] = _check_expert
SHORT_FORMS[BoxTaskConfig] = lambda value: {} if value is True else value  # "bbox": true = the defaults
SHORT_FORMS[FusionConfig] = lambda value: {} if value is True else value  # "fusion": true = the defaults


def _validate(config: RunConfig, source: str) -> None:
    """Range and cross-field checks; each failure is one line naming the key."""

    def check(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            raise fail(source, f"mgmoe.{key}", value, accepted)

    m, e = config.moe, config.num_experts
    check(e >= 1, "model.experts", [s.name for s in config.model.experts], "at least one expert")
    check(1 <= m.top_k <= e, "moe.top_k", m.top_k, f"an integer from 1 to the number of experts ({e})")
    check(m.capacity_factor > 0, "moe.capacity_factor", m.capacity_factor, "a number > 0")
    check(m.eval_capacity_factor > 0, "moe.eval_capacity_factor", m.eval_capacity_factor, "a number > 0")
    check(m.min_capacity >= 1, "moe.min_capacity", m.min_capacity, "an integer >= 1")
    check(0 <= m.jitter_eps < 1, "moe.jitter_eps", m.jitter_eps, "a number in [0, 1)")
    check(
        m.expert_parallel_size >= 1 and e % m.expert_parallel_size == 0,
        "moe.expert_parallel_size",
        m.expert_parallel_size,
        f"a positive divisor of the number of experts ({e})",
    )
    check(m.load_balance_weight >= 0, "moe.load_balance_weight", m.load_balance_weight, "a number >= 0")
    check(m.z_loss_weight >= 0, "moe.z_loss_weight", m.z_loss_weight, "a number >= 0")
    check(m.expert_loss_weight >= 0, "moe.expert_loss_weight", m.expert_loss_weight, "a number >= 0")
    check(m.diversity_weight >= 0, "moe.diversity_weight", m.diversity_weight, "a number >= 0")
    check(config.model.img_size >= 16, "model.img_size", config.model.img_size, "an integer >= 16")
    if config.model.backbone_moe is not None:
        check_backbone_moe(config.model.backbone_moe, m.expert_parallel_size, check)
    check_pretrained(config.model, check)
    rate = config.model.backbone_options.get("drop_path_rate", 0.0)
    check(isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1,
          "model.backbone_options.drop_path_rate", rate, "a number in [0, 1) (stochastic depth at the last block)")
    box = config.model.tasks.bbox
    if box is not None:
        check_box_task(box, check)
    check_fusion(config.model.fusion, config.curriculum.stages, check)
    if config.model.num_classes is not None:
        check(config.model.num_classes >= 2, "model.num_classes", config.model.num_classes, "an integer >= 2")
    check(config.data.num_workers >= 0, "data.num_workers", config.data.num_workers, "an integer >= 0")
    check(config.data.val_split != "test", "data.val_split", config.data.val_split,
          "a split other than test: the routing teacher and cluster routing are fitted on it, so test labels would "
          "tune the model; `mgmoe shards build` carves a validation split from train (--val-fraction)")
    check(config.data.shuffle_buffer >= 0, "data.shuffle_buffer", config.data.shuffle_buffer, "an integer >= 0")
    check_mixing(config.data, config.curriculum.stages, check)
    check_labels(config.data, check)
    if config.distill is not None:
        check_distill(config.distill, check)
    frozen = set(config.train.freeze)
    check(frozen <= set(PARAMETER_GROUPS), "train.freeze", config.train.freeze,
          f"a list of parameter groups: {', '.join(PARAMETER_GROUPS)}")
    cur = config.curriculum
    check(len(cur.stages) >= 1, "curriculum.stages", [], "at least one stage")
    from mgmoe_ds.curriculum import list_stages, stage_class  # the stage registry (no timm, no DeepSpeed)

    for i, stage in enumerate(cur.stages):
        key = f"curriculum.stages[{i}]"
        check(stage.name in list_stages(), f"{key}.name", stage.name,
              f"a registered stage: {', '.join(json.dumps(n) for n in list_stages())}")
        check(
            (stage.epochs is None) != (stage.steps is None),
            key,
            {"epochs": stage.epochs, "steps": stage.steps},
            "exactly one of epochs or steps",
        )
        length = stage.epochs if stage.epochs is not None else stage.steps
        check(length is not None and length >= 1, f"{key}.{'epochs' if stage.epochs is not None else 'steps'}",
              length, "an integer >= 1")
        for group, lr in stage.lr.items():
            if group not in PARAMETER_GROUPS:
                raise ConfigError(f"{source}: mgmoe.{key}.lr: unknown parameter group {group!r}; accepted: "
                                  f"{', '.join(PARAMETER_GROUPS)}")
            check(lr >= 0, f"{key}.lr.{group}", lr, "a learning rate >= 0")
        check(config.model.backbone_moe is not None or stage.lr.get("backbone_moe", 0) == 0, f"{key}.lr.backbone_moe",
              stage.lr.get("backbone_moe"), "0 or absent while mgmoe.model.backbone_moe is null")
        check(box is not None or stage.lr.get("box_tower", 0) == 0, f"{key}.lr.box_tower", stage.lr.get("box_tower"),
              "0 or absent while mgmoe.model.tasks.bbox is null")
        check(config.cache.depth is not None or stage.lr.get("backbone_top", 0) == 0, f"{key}.lr.backbone_top",
              stage.lr.get("backbone_top"), "0 or absent while mgmoe.cache.depth is null (the backbone's top "
              "starts after the cache's cut; set cache.depth, e.g. 4)")
        trained = stage.lr or stage_class(stage.name).default_lr
        check(any(lr > 0 for group, lr in trained.items() if group not in frozen), f"{key}.lr", stage.lr,
              "at least one parameter group with lr > 0" + (" outside mgmoe.train.freeze" if frozen else ""))
    check(cur.num_clusters >= 1, "curriculum.num_clusters", cur.num_clusters, "an integer >= 1")
    check(cur.teacher_temperature > 0, "curriculum.teacher_temperature", cur.teacher_temperature, "a number > 0")
    check(cur.kl_weight >= 0, "curriculum.kl_weight", cur.kl_weight, "a number >= 0")
    check_clustering(cur, check)
    check_routing(m.routing, cur.stages, check)
    check(config.train.log_every >= 1, "train.log_every", config.train.log_every, "an integer >= 1")
    check(config.train.checkpoint_every >= 0, "train.checkpoint_every", config.train.checkpoint_every,
          "an integer >= 0")
    check(config.train.max_bad_steps >= 1, "train.max_bad_steps", config.train.max_bad_steps, "an integer >= 1")
    check(config.cache.views >= 1, "cache.views", config.cache.views, "an integer >= 1")
    check(config.cache.memory_limit_gb >= 0, "cache.memory_limit_gb", config.cache.memory_limit_gb, "a number >= 0")
    check(config.cache.depth is None or config.cache.depth >= 0, "cache.depth", config.cache.depth,
          "a backbone block index >= 0, or null")


def config_from_dict(block: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Builds and validates a RunConfig from the contents of an ``"mgmoe"`` block.

    Args:
        block: the JSON object under ``"mgmoe"``.
        source: where the block came from, for error messages (a file path).

    Returns:
        The frozen, validated configuration.

    Raises:
        ConfigError: on an unknown key, a wrong type or an out-of-range value.
    """
    config = build_dataclass(RunConfig, block, "", source)
    _validate(config, source)
    return config


def _prefix_keys(error: ConfigError) -> ConfigError:
    """Puts the ``mgmoe.`` prefix on key names in messages about the block's own keys."""
    text = str(error)
    source, _, rest = text.partition(": ")
    if rest.startswith("unknown key "):
        rest = "unknown key mgmoe." + rest[len("unknown key "):]
    elif rest.startswith("missing required key "):
        rest = "missing required key mgmoe." + rest[len("missing required key "):]
    elif not rest.startswith("mgmoe."):
        rest = "mgmoe." + rest
    return ConfigError(f"{source}: {rest}")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Reads a DeepSpeed JSON file; a missing file or bad JSON is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config ({err.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def load_run_config(
    path: str | Path = DEFAULT_CONFIG_PATH, overrides: list[str] | None = None
) -> tuple[RunConfig, dict[str, Any]]:
    """Loads the ``"mgmoe"`` block of a DeepSpeed JSON file.

    Args:
        path: the DeepSpeed JSON file.
        overrides: ``key=value`` strings applied to the block before validation.

    Returns:
        ``(run_config, deepspeed_config)``: the validated block, and the JSON without the block,
        exactly as DeepSpeed should see it.
    """
    data = load_ds_config(path)
    block = data.pop("mgmoe", {})
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: mgmoe: expected an object")
    block = apply_overrides(block, overrides or [])
    try:
        config = config_from_dict(block, str(path))
    except ConfigError as err:
        raise _prefix_keys(err) from None
    return config, data


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """The configuration as plain JSON values (for run folders and checkpoint metadata)."""
    return dataclasses.asdict(config)
