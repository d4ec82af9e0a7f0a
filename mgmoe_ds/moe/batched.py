"""Homogeneous experts as batched weights: one (L, in, out) tensor per linear layer, not L modules.

``BatchedExperts`` holds the L local experts of a token-level routed layer, each a small MLP
(``Linear -> act -> Linear``) or a single ``Linear``, as stacked weights, and runs all of them on
rows grouped by expert in a few kernels (Tutel's batched experts): a padded ``baddbmm`` (every
device), or ``torch._grouped_mm``, with no padding, wherever torch runs it (a CUDA GPU in bf16; the
CPU in recent torch). The stacked weights are held in chunks of experts, each chunk its own
parameter and its own autograd nodes, so backward makes one chunk's weight gradient at a time
(DeepSpeed's loop makes one expert's): at d = 1024 and 64 experts one (L, in, out) gradient is
1 GiB in fp32. Its state dict shows
each expert as the ``nn.Linear`` state dict a loop of separate experts would have
(``<i>.fc1.weight`` as (out, in), ``<i>.fc1.bias``, ...), so DeepSpeed writes one checkpoint
file per expert and reshards them across expert-parallel sizes, and a loop of ``nn.Linear``
experts loads the same files. No ``torch.distributed`` here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MatmulBackend = Literal["auto", "padded", "grouped"]


_CHUNK_BYTES = 1 << 24  # row chunks of 16 MiB: the bias gradient's fp32 sums make no (R, F) fp32 copy
_WEIGHT_CHUNK_ELEMENTS = 1 << 24  # experts per parameter chunk: at most 16 Mi elements in a layer's chunk


def experts_per_chunk(widths: Sequence[int], budget: int = _WEIGHT_CHUNK_ELEMENTS) -> int:
    """How many experts share one parameter chunk: as many as fit ``budget`` weight elements in the
    widest layer (64 at d = 256 -> 4d, 4 at d = 1024 -> 4d), at least one."""
    widest = max(fan_in * fan_out for fan_in, fan_out in zip(widths[:-1], widths[1:]))
    return max(1, budget // widest)


def _row_step(rows: Tensor) -> int:
    """Rows per chunk of ``rows`` (R, F) for ``_CHUNK_BYTES``."""
    return max(1, _CHUNK_BYTES // max(1, rows.shape[1] * rows.element_size()))


def _segment_sums(rows: Tensor, expert_of_row: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    """(R, F) -> (L, F): the sum of each expert's rows (a bias gradient), accumulated in fp32 chunk by
    chunk (a bf16 ``rows`` is never copied whole to fp32)."""
    sums = torch.zeros(num_experts, rows.shape[1], dtype=torch.float32, device=rows.device)  # (L, F)
    step = _row_step(rows)
    for start in range(0, rows.shape[0], step):
        sums.index_add_(0, expert_of_row[start:start + step], rows[start:start + step].float())
    return sums.to(dtype)


def _add_bias_by_expert_(out: Tensor, bias: Tensor, counts: Sequence[int]) -> Tensor:
    """Each expert's bias added in place to its rows: (R, F) grouped by expert, (L, F) -> (R, F).
    A broadcast add per expert with rows: no (R, F) temporary, and one pass over ``out``."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            out[start:start + count].add_(bias[expert])
        start += count
    return out


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor, counts: Sequence[int]) -> Tensor:
    """(R, in) rows grouped by expert, (L, in, out), (L, out) -> (R, out), outside autocast."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _add_bias_by_expert_(torch._grouped_mm(x, weight, offs=offsets), bias, counts)


def _grouped_input_grad(grad_out: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """(R, out) gradient, (L, in, out) -> (R, in): the gradient of a grouped linear's input."""
    return torch._grouped_mm(grad_out, weight.transpose(1, 2), offs=offsets)


class _GroupedLinear(torch.autograd.Function):
    """``x @ W_e + b_e`` per expert on rows grouped by expert (``torch._grouped_mm``): the first layer.

    Written out rather than left to autograd so that no (R, out) temporary exists besides the output:
    the bias is added in place (``_add_bias_by_expert_``), and its gradient is summed in fp32 row
    chunks.
    ``offsets`` (L,) are the experts' end rows, ``expert_of_row`` (R,) each row's expert, ``counts``
    (L,) the rows of each expert.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, offsets: Tensor, expert_of_row: Tensor,
                counts: Sequence[int]) -> Tensor:
        ctx.save_for_backward(x, weight, offsets, expert_of_row)
        return _grouped_linear(x, weight, bias, offsets, counts)  # (R, out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        x, weight, offsets, expert_of_row = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype).contiguous()  # grouped_mm takes no expanded strides
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x = _grouped_input_grad(grad_out, weight, offsets) if needs_x else None  # (R, in)
        grad_weight = torch._grouped_mm(x.t(), grad_out, offs=offsets) if needs_weight else None  # (L, in, out)
        grad_bias = _segment_sums(grad_out, expert_of_row, weight.shape[0], weight.dtype) if needs_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None


class _ActivatedLinear(torch.autograd.Function):
    """``activation(hidden) @ W_e + b_e`` per expert, keeping only ``hidden`` for backward: the
    activation's output, as large as the hidden layer, is recomputed there (one elementwise pass)
    instead of being held from forward to backward. The second layer of an expert MLP.

    Padded: ``hidden`` is (L, M, H) and the product a ``baddbmm``. Grouped: ``hidden`` is (R, H)
    rows grouped by expert, ``offsets`` their end rows, and the product ``torch._grouped_mm``.
    Backward holds two hidden-sized tensors at a time (``hidden`` and the gradient, the GELU
    derivative applied in place), and each layer's (L, in, out) weight gradient is its own node's
    output, accumulated before the layer below runs: one exists at a time, not two.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor, activation, offsets: Optional[Tensor],
                expert_of_row: Optional[Tensor], counts: Optional[Sequence[int]]) -> Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if offsets is None:
                out = torch.baddbmm(bias.unsqueeze(1), activation(hidden), weight)  # (L, M, out)
            else:
                out = _grouped_linear(activation(hidden), weight, bias, offsets, counts)  # (R, out)
        ctx.activation = activation
        ctx.grouped = offsets is not None
        ctx.save_for_backward(hidden, weight, offsets, expert_of_row)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        hidden, weight, offsets, expert_of_row = ctx.saved_tensors
        grad_out = grad_out.to(hidden.dtype).contiguous()  # grouped_mm takes no expanded strides
        derivative = _known_derivative(ctx.activation)
        with torch.enable_grad():
            hidden_leaf = hidden.detach().requires_grad_(derivative is None)
            activated = ctx.activation(hidden_leaf)  # recomputed
        if ctx.grouped:
            grad_weight = torch._grouped_mm(activated.detach().t(), grad_out, offs=offsets)  # (L, H, out)
        else:
            grad_weight = torch.bmm(activated.detach().transpose(1, 2), grad_out)  # (L, H, out)
        if derivative is not None:
            del activated  # freed before the two hidden-sized gradients below exist
        if ctx.grouped:
            grad_activated = _grouped_input_grad(grad_out, weight, offsets)  # (R, H)
            grad_bias = _segment_sums(grad_out, expert_of_row, weight.shape[0], weight.dtype)  # (L, out)
        else:
            grad_activated = torch.bmm(grad_out, weight.transpose(1, 2))  # (L, M, H)
            grad_bias = grad_out.sum(1)  # (L, out)
        if derivative is not None:
            grad_hidden = derivative(grad_activated, hidden)  # in place: grad_activated's memory
        else:
            (grad_hidden,) = torch.autograd.grad(activated, hidden_leaf, grad_activated)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _known_derivative(activation):
    """``(grad, input) -> grad * activation'(input)``, written into ``grad``'s memory (no third
    hidden-sized tensor in backward), for GELU (the experts' activation), else None."""
    if activation is F.gelu:
        approximate = "none"
    elif isinstance(activation, nn.GELU):
        approximate = activation.approximate
    else:
        return None

    def gelu_backward_(grad: Tensor, inputs: Tensor) -> Tensor:
        return torch.ops.aten.gelu_backward.grad_input(grad, inputs, approximate=approximate, grad_input=grad)

    return gelu_backward_


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (CUDA in bf16; the CPU in
    recent torch): probed once per device type and dtype."""
    if not hasattr(torch, "_grouped_mm") or (device_type == "cuda" and not torch.cuda.is_available()):
        return False
    try:
        x = torch.ones(8, 16, dtype=dtype, device=device_type, requires_grad=True)
        w = torch.ones(2, 16, 8, dtype=dtype, device=device_type, requires_grad=True)
        offsets = torch.tensor([4, 8], dtype=torch.int32, device=device_type)
        torch._grouped_mm(x, w, offs=offsets).square().sum().backward()
        torch._grouped_mm(x.detach().t(), x.detach()[:, :8], offs=offsets)  # the weight-gradient form
        return True
    except (RuntimeError, NotImplementedError):
        return False


class BatchedExperts(nn.Module):
    """L homogeneous experts with stacked weights, in chunks of experts.

    Args:
        num_experts: L, the experts this rank holds.
        widths: layer widths, e.g. ``(C, H, C)`` for an MLP expert, ``(H, C)`` for one linear map.
        activation: applied between linear layers (not after the last); a ``torch.nn.functional``
            callable such as ``F.gelu``, or a module (``nn.GELU``); None for a single linear layer.
        backend: "padded" (``baddbmm`` on rows padded to the busiest expert), "grouped"
            (``torch._grouped_mm``) or "auto" (grouped where it runs, ``grouped_mm_runs``, else padded).
        chunk_experts: experts per parameter chunk (None: ``experts_per_chunk(widths)``). Each chunk
            is a (chunk, in, out) parameter per layer whose rows run in their own kernels, so only
            one chunk's weight gradient exists at a time in backward.
    """

    def __init__(self, num_experts: int, widths: Sequence[int], activation=F.gelu,
                 backend: MatmulBackend = "auto", chunk_experts: Optional[int] = None) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths = {tuple(widths)}: expected at least (in, out)")
        if activation is None and len(widths) > 2:
            raise ValueError(f"widths = {tuple(widths)}: several layers need an activation between them")
        if backend not in ("auto", "padded", "grouped"):
            raise ValueError(f"backend = {backend!r}: expected 'auto', 'padded' or 'grouped'")
        if chunk_experts is not None and chunk_experts < 1:
            raise ValueError(f"chunk_experts = {chunk_experts}: expected at least 1")
        self.num_experts = num_experts
        self.widths = tuple(int(w) for w in widths)
        self.activation = activation
        self.backend = backend
        self.chunk_size = chunk_experts or experts_per_chunk(self.widths)  # experts per chunk; the last may have fewer
        self.chunk_bounds = tuple((first, min(first + self.chunk_size, num_experts))
                                  for first in range(0, num_experts, self.chunk_size))
        # Parameters sit on this module itself (no ParameterList child), so that the state dict
        # below is the only view of them: ``fc<j>_weight_<c>`` (chunk, in, out), ``fc<j>_bias_<c>``
        # (chunk, out) for chunk c of ``chunk_bounds``.
        for j, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:]), start=1):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per expert
            for c, (first, stop) in enumerate(self.chunk_bounds):
                size = stop - first
                self.register_parameter(f"fc{j}_weight_{c}",
                                        nn.Parameter(torch.empty(size, fan_in, fan_out).uniform_(-bound, bound)))
                self.register_parameter(f"fc{j}_bias_{c}",
                                        nn.Parameter(torch.empty(size, fan_out).uniform_(-bound, bound)))

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    def chunk_weights(self, chunk: int) -> list[nn.Parameter]:
        """Per layer, chunk ``chunk``'s stacked weight: (chunk size, in, out)."""
        return [getattr(self, f"fc{j}_weight_{chunk}") for j in range(1, self.num_layers + 1)]

    def chunk_biases(self, chunk: int) -> list[nn.Parameter]:
        """Per layer, chunk ``chunk``'s stacked bias: (chunk size, out)."""
        return [getattr(self, f"fc{j}_bias_{chunk}") for j in range(1, self.num_layers + 1)]

    def expert_weight(self, layer: int, expert: int) -> Tensor:
        """Expert ``expert``'s weight in ``layer``: an (in, out) view of its chunk's parameter."""
        chunk, local = self._locate(expert)
        return self.chunk_weights(chunk)[layer][local]

    def expert_bias(self, layer: int, expert: int) -> Tensor:
        """Expert ``expert``'s bias in ``layer``: an (out,) view of its chunk's parameter."""
        chunk, local = self._locate(expert)
        return self.chunk_biases(chunk)[layer][local]

    def stacked_grads(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s gradients as one stacked expert would have them: (L, in, out) weight and
        (L, out) bias, the chunks' in expert order (a copy; for checks and benchmarks)."""
        chunks = range(len(self.chunk_bounds))
        return (torch.cat([self.chunk_weights(c)[layer].grad for c in chunks]),
                torch.cat([self.chunk_biases(c)[layer].grad for c in chunks]))

    def _locate(self, expert: int) -> tuple[int, int]:
        """Expert -> (its chunk, its index in the chunk)."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert}: this module holds {self.num_experts}")
        return divmod(expert, self.chunk_size)

    # -- the math ---------------------------------------------------------------------------------

    def forward(self, rows: Tensor, counts: Sequence[int]) -> Tensor:
        """Runs expert i on its rows.

        Args:
            rows: (R, in) rows grouped by expert: ``counts[0]`` rows of expert 0 first, and so on.
            counts: (L,) rows per expert, summing to R.

        Returns:
            (R, out), row r the output of its expert on row r.
        """
        if len(counts) != self.num_experts or sum(counts) != rows.shape[0]:
            raise ValueError(f"counts {list(counts)} do not split {rows.shape[0]} rows over {self.num_experts} experts")
        if rows.shape[0] == 0:
            return rows.new_zeros((0, self.widths[-1]))
        # grouped_mm needs every row stride a multiple of 16 bytes
        aligned = all(width * rows.element_size() % 16 == 0 for width in self.widths)
        if self.backend == "grouped" and not aligned:
            raise ValueError(f"backend 'grouped': widths {self.widths} in {rows.dtype} are not multiples of 16 bytes; "
                             f"use 'auto' or 'padded'")
        grouped = self.backend == "grouped" or (self.backend == "auto" and aligned
                                                and grouped_mm_runs(rows.device.type, rows.dtype))
        run = self._grouped if grouped else self._padded
        count_t = torch.as_tensor(counts, device=rows.device)  # (L,): one host-to-device copy per call
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_experts, device=rows.device), count_t,
                                                output_size=rows.shape[0])  # (R,); output_size: no device sync
        if len(self.chunk_bounds) == 1:
            return run(rows, list(counts), count_t, expert_of_row, 0)
        chunk_rows = [sum(counts[first:stop]) for first, stop in self.chunk_bounds]
        pieces = torch.split(rows, chunk_rows)  # per chunk: (R_c, in) views; one node gathers their gradients
        outputs, row = [], 0
        for chunk, ((first, stop), piece) in enumerate(zip(self.chunk_bounds, pieces)):
            if piece.shape[0] == 0:
                outputs.append(self._idle(piece, chunk))
                continue
            local_expert = expert_of_row[row:row + piece.shape[0]] - first  # (R_c,) index in the chunk
            outputs.append(run(piece, list(counts[first:stop]), count_t[first:stop], local_expert, chunk))
            row += piece.shape[0]
        return torch.cat(outputs)  # (R, out)

    def _idle(self, rows: Tensor, chunk: int) -> Tensor:
        """A chunk no row reached: (0, out), tied to its parameters by a zero term, so each gets a zero
        gradient (every rank's gradient reduction sees every parameter) and no kernel runs on zero rows.
        Without autograd (evaluation) there is nothing to tie."""
        empty = rows.new_zeros((0, self.widths[-1]))  # (0, out)
        if not torch.is_grad_enabled():
            return empty
        return empty + 0.0 * sum(p.sum() for p in (*self.chunk_weights(chunk), *self.chunk_biases(chunk))
                                 if p.requires_grad)

    def _padded(self, rows: Tensor, counts: Sequence[int], count_t: Tensor, expert_of_row: Tensor,
                chunk: int) -> Tensor:
        """One ``baddbmm`` per layer on the chunk's rows padded to its busiest expert's count.
        ``count_t`` (L_c,) is ``counts`` on the device, ``expert_of_row`` (R_c,) each row's expert."""
        experts, longest = len(counts), max(counts)
        starts = torch.cumsum(count_t, 0) - count_t  # (L_c,) first row of each expert
        slot = torch.arange(rows.shape[0], device=rows.device) - starts[expert_of_row]  # (R_c,) place in its expert
        destination = expert_of_row * longest + slot  # (R_c,) row of the padded buffer
        x = rows.new_zeros((experts * longest, rows.shape[1])).index_copy(0, destination, rows)  # (L_c*M, in)
        x = x.view(experts, longest, rows.shape[1])  # (L_c, M, in)
        x = self._layers(x, chunk, None, None)  # (L_c, M, out)
        return x.reshape(experts * longest, x.shape[-1]).index_select(0, destination)  # (R_c, out)

    def _grouped(self, rows: Tensor, counts: Sequence[int], count_t: Tensor, expert_of_row: Tensor,
                 chunk: int) -> Tensor:
        """``torch._grouped_mm`` per layer on the chunk's rows: no padding."""
        offsets = torch.cumsum(count_t, 0).to(torch.int32)  # (L_c,) end row of each expert
        return self._layers(rows, chunk, offsets, expert_of_row, counts)  # (R_c, out)

    def _layers(self, x: Tensor, chunk: int, offsets: Optional[Tensor], expert_of_row: Optional[Tensor],
                counts: Optional[Sequence[int]] = None) -> Tensor:
        """The layers of chunk ``chunk`` on padded (L_c, M, in) rows (``offsets`` None) or grouped
        (R_c, in) rows. Every layer after the first takes its input before the activation
        (``_ActivatedLinear``)."""
        weights = [w.to(x.dtype) for w in self.chunk_weights(chunk)]
        biases = [b.to(x.dtype) for b in self.chunk_biases(chunk)]
        if offsets is None:
            x = torch.baddbmm(biases[0].unsqueeze(1), x, weights[0])  # (L_c, M, out_0)
        else:
            x = _GroupedLinear.apply(x, weights[0], biases[0], offsets, expert_of_row, tuple(counts))  # (R_c, out_0)
        for weight, bias in zip(weights[1:], biases[1:]):
            x = _ActivatedLinear.apply(x, weight, bias, self.activation, offsets, expert_of_row,
                                       None if counts is None else tuple(counts))
        return x

    # -- initialisation ---------------------------------------------------------------------------

    @torch.no_grad()
    def upcycle(self, linears: Sequence[tuple[Tensor, Optional[Tensor]]], noise: float,
                seeds: Sequence[int]) -> None:
        """Every expert starts as the dense layers it replaces, plus noise (sparse upcycling).

        Args:
            linears: per layer, the dense ``(weight (out, in), bias (out,) or None)``.
            noise: std of the Gaussian noise added to each weight, relative to that weight's std.
            seeds: one seed per local expert (its global id's), so an expert starts from the
                same weights whichever rank builds it.
        """
        if len(linears) != self.num_layers or len(seeds) != self.num_experts:
            raise ValueError(f"upcycle: got {len(linears)} layers and {len(seeds)} seeds, expected "
                             f"{self.num_layers} and {self.num_experts}")
        for layer, (dense_weight, dense_bias) in enumerate(linears):
            expected = (self.widths[layer + 1], self.widths[layer])
            if tuple(dense_weight.shape) != expected:
                raise ValueError(f"upcycle: layer {layer} weight {tuple(dense_weight.shape)}, expected {expected}")
            weight_t = dense_weight.detach().float().t()  # (in, out)
            scale = noise * float(weight_t.std()) if weight_t.numel() > 1 else 0.0
            for local, seed in enumerate(seeds):
                generator = torch.Generator().manual_seed(int(seed) * 1009 + layer)
                jitter = torch.randn(weight_t.shape, generator=generator) * scale if scale > 0 else 0.0
                self.expert_weight(layer, local).copy_(weight_t + jitter)
                self.expert_bias(layer, local).copy_(dense_bias.detach().float() if dense_bias is not None else 0.0)

    # -- the state dict: one nn.Linear state dict per expert ---------------------------------------

    def _expert_keys(self, prefix: str, expert: int, layer: int) -> tuple[str, str]:
        return f"{prefix}{expert}.fc{layer + 1}.weight", f"{prefix}{expert}.fc{layer + 1}.bias"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                weight_key, bias_key = self._expert_keys(prefix, expert, layer)
                w, b = self.expert_weight(layer, expert).t(), self.expert_bias(layer, expert)  # nn.Linear's layout
                destination[weight_key] = w if keep_vars else w.detach().contiguous()
                destination[bias_key] = b if keep_vars else b.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        ours = set()
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                targets = (self.expert_weight(layer, expert).t(), self.expert_bias(layer, expert))
                for key, target in zip(self._expert_keys(prefix, expert, layer), targets):
                    ours.add(key)
                    if key not in state_dict:
                        missing_keys.append(key)
                        continue
                    value = state_dict[key]
                    if tuple(value.shape) != tuple(target.shape):
                        error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                          f"the expert's is {tuple(target.shape)}")
                        continue
                    with torch.no_grad():
                        target.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)
