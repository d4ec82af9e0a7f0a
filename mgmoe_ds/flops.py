"""FLOPs and parameter counts for the backbone, each expert, and top-k vs dense accounting.

FLOPs are measured, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` counts the
matmul/convolution/attention operators a call actually dispatches (2 FLOPs per multiply-add;
elementwise ops, norms and softmax are not counted, as in the usual GFLOPs tables).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode


def count_flops(module_or_fn: Union[nn.Module, Callable[..., Any]], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``module_or_fn(*args, **kwargs)``, forward only, without autograd.

    Args:
        module_or_fn: a module or any callable (e.g. ``lambda x: backbone(x, need)``).
        *args: positional arguments of the call.
        **kwargs: keyword arguments of the call.

    Returns:
        Total FLOPs of the call (for a batch of B images, divide by B for per-image FLOPs).
    """
    # Inputs are detached: FlopCounterMode's module tracker fails on inputs that require grad
    # under no_grad (e.g. backbone features handed to an expert).
    args, kwargs = tree_map_only(torch.Tensor, torch.Tensor.detach, (args, kwargs))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module_or_fn(*args, **kwargs)
    return int(counter.get_total_flops())


def flops_per_image(module_or_fn: Union[nn.Module, Callable[..., Any]], *args: Any, batch_size: int,
                    **kwargs: Any) -> float:
    """``count_flops`` of a call on ``batch_size`` images, divided by ``batch_size``."""
    return count_flops(module_or_fn, *args, **kwargs) / batch_size


def count_parameters(module_or_params: Union[nn.Module, Iterable[nn.Parameter]], *, trainable_only: bool = False) -> int:
    """Number of parameter elements, each shared tensor counted once.

    Args:
        module_or_params: a module, or parameters (e.g. ``expert.head_parameters()``).
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The element count.
    """
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    unique = {id(p): p for p in params}
    return sum(p.numel() for p in unique.values() if p.requires_grad or not trainable_only)
