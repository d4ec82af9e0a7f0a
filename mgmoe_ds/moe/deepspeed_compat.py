"""DeepSpeed's MoE contract for our heterogeneous routed layer, in one place.

DeepSpeed (0.16-0.19) recognises MoE only through ``isinstance(module, deepspeed.moe.layer.MoE)``:
that switches on expert gradient buckets in ZeRO-1/2 (reduced over the expert-data-parallel
group instead of the whole data-parallel group) and per-expert checkpoint files. Its own ``MoE``
deep-copies one expert and needs output width == input width, so we do not run its constructor:
``DeepSpeedRoutedExperts`` is our ``RoutedExperts`` that also *is* an ``MoE`` and carries the
attributes DeepSpeed reads (``ep_size``, ``expert_group_name``, ``num_experts``,
``num_local_experts``). Expert parameters are tagged ``allreduce = False`` with ``group_name``,
optimizer param groups are named and split with DeepSpeed's own splitter, and checkpoints are
written by DeepSpeed: one file per (layer, global expert), whatever P is, so they load at any P.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from mgmoe_ds.moe.layer import RoutedExperts
from mgmoe_ds.moe.parallel import ExpertParallelComm


def expert_group_name(expert_parallel_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of size P."""
    return f"ep_size_{expert_parallel_size}"


class DeepSpeedRoutedExperts(RoutedExperts, MoE):
    """A ``RoutedExperts`` that DeepSpeed's engine treats as an MoE layer.

    Never constructed directly: ``adopt_moe_layers`` converts existing layers in place, so the
    model code stays free of DeepSpeed imports. ``MoE.__init__`` is deliberately not run.
    """

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize``: creates (once) and binds the expert-parallel group."""
        bind_expert_parallel_group(self, use_data_before_expert_parallel_)


_ADOPTED: dict[type, type] = {RoutedExperts: DeepSpeedRoutedExperts}  # one DeepSpeed class per layer class


def _deepspeed_class(cls: type) -> type:
    """``cls`` (a ``RoutedExperts`` subclass) that also is a DeepSpeed ``MoE``: one class per subclass."""
    if issubclass(cls, MoE):
        return cls
    if cls not in _ADOPTED:
        _ADOPTED[cls] = type(f"DeepSpeed{cls.__name__}", (cls, DeepSpeedRoutedExperts), {})
    return _ADOPTED[cls]


def ensure_expert_groups(expert_parallel_size: int, use_data_before_expert_parallel_: bool = False) -> None:
    """Creates DeepSpeed's expert-parallel and expert-data-parallel groups for P if missing.

    Needs ``torch.distributed`` initialised (``deepspeed.init_distributed``); the number of ranks
    must be a multiple of P.
    """
    name = expert_group_name(expert_parallel_size)
    if name in groups._get_expert_parallel_group_dict():
        return
    world = torch.distributed.get_world_size()
    if world % expert_parallel_size:
        raise ValueError(f"expert_parallel_size = {expert_parallel_size} does not divide the number of ranks ({world})")
    groups._create_expert_and_data_parallel(expert_parallel_size,
                                            use_data_before_expert_parallel_=use_data_before_expert_parallel_)


def expert_parallel_rank(expert_parallel_size: int) -> int:
    """This process's rank in its expert-parallel group (0 without a process group)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0
    ensure_expert_groups(expert_parallel_size)
    return groups._get_expert_parallel_rank(expert_group_name(expert_parallel_size))


def bind_expert_parallel_group(layer: RoutedExperts, use_data_before_expert_parallel_: bool = False) -> None:
    """Binds DeepSpeed's expert-parallel group of size ``layer.ep_size`` to the layer."""
    if not torch.distributed.is_initialized():
        return
    ensure_expert_groups(layer.ep_size, use_data_before_expert_parallel_)
    group = groups._get_expert_parallel_group(expert_group_name(layer.ep_size))
    layer.bind_comm(ExpertParallelComm(group))


def adopt_moe_layers(model: nn.Module) -> list[DeepSpeedRoutedExperts]:
    """Turns every ``RoutedExperts`` in ``model`` into a ``DeepSpeedRoutedExperts`` in place.

    Tags expert parameters as DeepSpeed expects and binds the expert-parallel group when
    ``torch.distributed`` is initialised. Call before building optimizer param groups.

    Raises:
        ValueError: if a routed layer is the model's root module (DeepSpeed then saves expert
            keys with a leading "." and cannot reload them).
    """
    adopted = []
    for name, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        if name == "":
            raise ValueError("the routed layer must be a submodule of the model, not its root")
        module.__class__ = _deepspeed_class(type(module))
        module.expert_group_name = expert_group_name(module.ep_size)
        for param in module.expert_parameters():
            param.allreduce = False
            param.group_name = module.expert_group_name
        bind_expert_parallel_group(module)
        adopted.append(module)
    return adopted


def moe_param_groups(named_groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer param groups that DeepSpeed's ZeRO-1/2 accepts.

    Args:
        named_groups: dicts with a unique ``"name"``, ``"params"`` and any optimizer options
            (``lr``, ``weight_decay``); expert and non-expert parameters may be mixed.

    Returns:
        The groups with expert parameters split into their own ``moe: True`` groups; groups that
        end up empty are dropped. DeepSpeed renames an expert group after its expert-parallel
        group (it looks the reduction group up by that name), so every group also carries its
        original name under ``"mgmoe_group"`` (for logging).
    """
    named_groups = [dict(g, params=list(g["params"]), mgmoe_group=g.get("name")) for g in named_groups]
    names = [g.get("name") for g in named_groups]
    if any(n is None for n in names) or len(set(names)) != len(names):
        raise ValueError(f"every param group needs a unique 'name', got {names}")
    split = split_params_into_different_moe_groups_for_optimizer(named_groups)
    return [g for g in split if len(g["params"]) > 0]


def consolidate_expert_checkpoint(checkpoint_dir: str, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Reads a DeepSpeed checkpoint written at any P into one full state dict (global expert ids).

    Loads tensors only (``weights_only=True``): nothing arbitrary is unpickled.

    Args:
        checkpoint_dir: the folder passed to ``engine.save_checkpoint``.
        tag: the checkpoint tag; default: the content of the ``latest`` file.

    Returns:
        The model's state dict with every expert at ``...deepspeed_experts.<global id>``.
    """
    root = Path(checkpoint_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{latest}: no 'latest' file; pass the checkpoint tag explicitly")
        tag = latest.read_text().strip()
    folder = root / tag
    main_file = folder / "mp_rank_00_model_states.pt"
    if not main_file.is_file():
        raise FileNotFoundError(f"{main_file}: not a DeepSpeed checkpoint folder")
    state = torch.load(main_file, map_location="cpu", weights_only=True)
    module_state = {k: v for k, v in state["module"].items()}
    for expert_file in sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        module_state.update(torch.load(expert_file, map_location="cpu", weights_only=True))
    return module_state
