"""The math of one layer's routed experts over expert-sorted rows, whoever holds the weights.

``LoopMath`` runs the experts one at a time (``F.linear`` per expert: the CPU path, and the device loop over a streamed
slot whose rows the grouped GEMM cannot take); ``GroupedMath`` runs all of them in a few grouped GEMMs (the streamed GPU
path). Both take the slots sorted by expert, keep what a backward needs, and compute that backward by hand
(:class:`hybridmoe.experts.cpu_experts._ExpertsFn`). The weights come as an object with ``linear`` / ``matrix`` /
``out_features`` per expert: the host :class:`~hybridmoe.experts.cpu_experts.ExpertWeights` (which owns the storage
format) or :class:`SlotWeights` (float weights somewhere else). A leaf module: the split of a layer between CPU and
GPU (:mod:`hybridmoe.experts.split`) uses it too, without importing the experts block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import nn

from .formula import ExpertMLP


class PerExpertWeights(Protocol):
    """What the per-expert loop asks of a layer's weights: ExpertWeights (host, any storage format) or SlotWeights."""

    def linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor: ...  # x [n, in] -> [n, out] fp32
    def matrix(self, proj: str, e: int) -> torch.Tensor: ...  # [out, in] float
    def out_features(self, proj: str) -> int: ...


class SlotWeights:
    """A layer's float weights somewhere else (a streamed GPU slot, dequantized there), with the same loop interface
    as :class:`ExpertWeights` (``linear``, ``matrix``, ``out_features``)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, bias: dict[str, torch.Tensor] | None):
        self.w = {"gate_up_proj": gate_up, "down_proj": down}  # [E, U, H], [E, H, I] float
        self.bias = bias

    def linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        w = self.w[proj][e]
        y = nn.functional.linear(x.to(w.dtype), w).float()
        return y if self.bias is None else y + self.bias[proj][e].float()

    def matrix(self, proj: str, e: int) -> torch.Tensor:
        return self.w[proj][e]

    def out_features(self, proj: str) -> int:
        return self.w[proj].shape[1]


class LoRAFactors(NamedTuple):
    """The factors one compute pass uses: the CPU masters themselves, or their copies on the compute device."""

    A: torch.Tensor  # [E, r, in] fp32
    B: torch.Tensor  # [E, out, r] fp32
    scale: float


class LoopMath:
    """All experts of one layer, one expert at a time (``F.linear`` per expert): the CPU path.

    Base GEMMs run in the weight dtype (oneDNN for bf16 on CPU), everything else in fp32. Rows are the expert-sorted
    slots; ``groups`` lists (expert, row slice) for the experts that have any.
    """

    def __init__(self, weights: PerExpertWeights, lora: dict[str, LoRAFactors], mlp: ExpertMLP,
                 groups: list[tuple[int, slice]]):
        self.weights = weights  # owns the format: linear() and matrix() per expert
        self.lora, self.mlp, self.groups = lora, mlp, groups
        self.act_dtype = torch.float32  # activations kept between the GEMMs

    def _linear(self, proj: str, x: torch.Tensor, e: int) -> torch.Tensor:
        # x: [n, in] fp32 -> [n, out] fp32.
        y = self.weights.linear(proj, e, x)
        lo = self.lora.get(proj)
        if lo is not None:
            y = y + lo.scale * ((x @ lo.A[e].T) @ lo.B[e].T)
        return y

    def forward(self, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [S, H] fp32 -> (gu [S, 2I] if keep else empty, y [S, H]), both fp32."""
        gu_out = x.new_empty(x.shape[0] if keep else 0, self.weights.out_features("gate_up_proj"))  # [S, U]
        y_out = x.new_empty(x.shape[0], self.weights.out_features("down_proj"))  # [S, H]
        for e, rows in self.groups:
            gu = self._linear("gate_up_proj", x[rows], e)  # [n, 2I]
            y_out[rows] = self._linear("down_proj", self.mlp(gu), e)  # [n, H]
            if keep:
                gu_out[rows] = gu
        return gu_out, y_out

    def _linear_backward(self, proj: str, dy: torch.Tensor, x: torch.Tensor, e: int, grads: dict) -> torch.Tensor:
        """dL/dx for y = x W^T + s·(x A^T) B^T, accumulating the LoRA grads (gA, gB) of `proj` into `grads`."""
        w = self.weights.matrix(proj, e)  # [out, in] float
        dx = nn.functional.linear(dy.to(w.dtype), w.T).float()  # dy @ W
        lo = self.lora.get(proj)
        if lo is not None:
            a_e, b_e = lo.A[e], lo.B[e]  # [r, in], [out, r]
            dyb = dy @ b_e  # [n, r]
            dx = dx + lo.scale * (dyb @ a_e)
            if proj in grads:
                ga, gb = grads[proj]
                gb[e] += lo.scale * (dy.T @ (x @ a_e.T))  # [out, r]
                ga[e] += lo.scale * (dyb.T @ x)  # [r, in]
        return dx

    def backward(self, dy: torch.Tensor, x: torch.Tensor, gu: torch.Tensor, grads: dict) -> torch.Tensor:
        """dy [S, H] = dL/dy per slot -> dx [S, H]; LoRA grads accumulate into `grads`."""
        dx_out = torch.empty_like(x)  # [S, H]
        for e, rows in self.groups:
            h = self.mlp(gu[rows])  # [n, I], recomputed from the kept pre-activation
            dh = self._linear_backward("down_proj", dy[rows], h, e, grads)  # [n, I]
            dgu = self.mlp.backward(gu[rows], dh)  # [n, U]
            dx_out[rows] = self._linear_backward("gate_up_proj", dgu, x[rows], e, grads)
        return dx_out


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped matmul over expert-sorted rows: a [S, K] (group g = rows offs[g-1]:offs[g]) with b [E, K, N] -> [S, N];
    or a [M, S] and b [S, N] with groups along S -> [E, M, N]. One kernel (CUTLASS for bf16 on Hopper), no host sync."""
    return torch._grouped_mm(a, b, offs=offs)


# The most bytes of float weights a Dequantized projection makes at once: larger ones are made in parts of rows
# (output features). gpt-oss-120b's gate_up is 4.3 GB in bf16 (128 x 5760 x 2880): five parts of <= 1 GiB.
DEQUANT_PART_BYTES = 1 << 30


class Dequantized:
    """A compact (int8 / 4-bit) weight [E, out, in] in its device slot, dequantized each time a GEMM takes it and not
    held after, in parts of output rows of at most :data:`DEQUANT_PART_BYTES` each: :class:`GroupedMath` computes
    the part's output columns (or, in backward, its share of dx) and drops it before the next is made. gpt-oss-120b
    with MXFP4 experts holds <= 1 GiB of bf16 at a time, not gate_up's 4.3 GB (or, before session 10, both
    projections' 6.4 GB). Each part is dequantized once per forward and once per backward.

    make(rows): rows [r0, r1) of every expert as floats [E, r1 - r0, in] (a row slice of the codes: no copy)."""

    def __init__(self, make: Callable[[slice], torch.Tensor], dtype: torch.dtype, shape: tuple[int, int, int]):
        self.make, self.dtype = make, dtype  # dtype: what make() returns
        e, out, inp = shape
        row_bytes = e * inp * torch.empty(0, dtype=dtype).element_size()
        # whole multiples of 8 rows: a part's output columns keep the grouped GEMM's 16-byte alignment
        step = out if row_bytes * out <= DEQUANT_PART_BYTES else max(8, DEQUANT_PART_BYTES // row_bytes // 8 * 8)
        self.parts = [slice(r, min(r + step, out)) for r in range(0, out, step)]


class GroupedMath:
    """All experts of one layer in a few grouped GEMMs: the streamed (GPU) path, with no per-expert Python loop
    and no host synchronisation (group boundaries stay on the device as cumulative offsets).

    Every GEMM, LoRA included, runs in the weight dtype with fp32 accumulation, and the activations between them
    are kept in that dtype: for bf16 weights that is transformers' own bf16 precision (and what keeps every GEMM on
    the CUTLASS grouped kernel; fp32 would fall back to one matmul per expert, and fp32 activations would double the
    GPU memory of a 4096-token layer). The sum over top-k, the routing-weight gradient and the LoRA gradients
    accumulate in fp32; the LoRA master weights stay fp32 on the CPU. For fp32 weights the path is fp32 throughout.
    """

    def __init__(self, w_gu: torch.Tensor, w_d: torch.Tensor, lora: dict[str, LoRAFactors], mlp: ExpertMLP,
                 offs: torch.Tensor, row_bias: dict[str, torch.Tensor] | None = None):
        self.w = {"gate_up_proj": w_gu, "down_proj": w_d}  # [E, U, H], [E, H, I] (or Dequantized: made when used)
        self.dtype = self.act_dtype = w_gu.dtype
        self.lora, self.mlp, self.offs = lora, mlp, offs  # offs: [E] int32 cumulative row ends
        self.row_bias = row_bias  # per projection [S, out]: each sorted row's expert bias, or None

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _gmm(a.to(self.dtype), b, self.offs)

    def _base(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        """x [S, in] -> [S, out]: per group x W[e]^T; a Dequantized weight one part of output columns at a time."""
        w = self.w[proj]
        if not isinstance(w, Dequantized):
            return self._mm(x, w.transpose(1, 2))
        if len(w.parts) == 1:
            return self._mm(x, w.make(w.parts[0]).transpose(1, 2))
        return torch.cat([self._mm(x, w.make(p).transpose(1, 2)) for p in w.parts], dim=1)  # each part freed after

    def _base_backward(self, proj: str, dy: torch.Tensor) -> torch.Tensor:
        """dy [S, out] -> [S, in]: per group dy W[e]; a Dequantized weight in parts, summed in fp32."""
        w = self.w[proj]
        if not isinstance(w, Dequantized):
            return self._mm(dy, w)
        if len(w.parts) == 1:
            return self._mm(dy, w.make(w.parts[0]))
        dx = None
        for p in w.parts:  # dx = sum over parts of dy[:, p] W[e][p]
            part = self._mm(dy[:, p].contiguous(), w.make(p))  # [S, in]
            dx = part.float() if dx is None else dx.add_(part)
        return dx.to(self.dtype)

    def _linear(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        y = self._base(proj, x)  # [S, out]
        if self.row_bias is not None:
            y = y + self.row_bias[proj]
        lo = self.lora.get(proj)
        if lo is not None:
            xa = self._mm(x, lo.A.transpose(1, 2))  # [S, r]
            y = y + lo.scale * self._mm(xa, lo.B.transpose(1, 2))
        return y

    def forward(self, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [S, H] -> (gu [S, 2I] if keep else empty, y [S, H]); the results themselves, never copied."""
        gu = self._linear("gate_up_proj", x)  # [S, 2I]
        y = self._linear("down_proj", self.mlp(gu))  # [S, H]
        return (gu if keep else gu.new_empty(0, gu.shape[1])), y

    def _linear_backward(self, proj: str, dy: torch.Tensor, x: torch.Tensor, grads: dict) -> torch.Tensor:
        dx = self._base_backward(proj, dy)  # [S, in]
        lo = self.lora.get(proj)
        if lo is not None:
            dyb = self._mm(dy, lo.B)  # [S, r]
            dx = dx + lo.scale * self._mm(dyb, lo.A)
            if proj in grads:
                ga, gb = grads[proj]  # fp32
                xa = self._mm(x, lo.A.transpose(1, 2))  # [S, r]
                gb += lo.scale * self._mm(dy.T, xa).float()  # [E, out, r]: per group dy^T (x A^T)
                ga += lo.scale * self._mm(dyb.T, x).float()  # [E, r, in]: per group (dy B)^T x
        return dx

    def backward(self, dy: torch.Tensor, x: torch.Tensor, gu: torch.Tensor, grads: dict) -> torch.Tensor:
        dh = self._linear_backward("down_proj", dy, self.mlp(gu), grads)  # [S, I]
        dgu = self.mlp.backward(gu, dh)  # [S, U]
        del dh
        return self._linear_backward("gate_up_proj", dgu, x, grads)  # [S, H]


def expert_groups(counts: list[int], experts: range) -> list[tuple[int, slice]]:
    """(expert, its rows) for each expert of `experts` with rows, over rows sorted by expert: counts[e] rows each."""
    groups, start = [], 0
    for e in experts:
        if counts[e]:
            groups.append((e, slice(start, start + counts[e])))
            start += counts[e]
    return groups


def unsort_sum(rows_sorted: torch.Tensor, order: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """[S, H] rows in expert-sorted slot order -> [T, H] fp32 sum over each token's k slots. S < T·K (a split call's
    GPU part, hybridmoe.experts.split): the slots not in `order` add zero."""
    shape = (t * k, rows_sorted.shape[1])
    slots = rows_sorted.new_empty(shape) if len(order) == t * k else rows_sorted.new_zeros(shape)
    slots[order] = rows_sorted  # back to (token, k) order
    return slots.view(t, k, -1).sum(dim=1, dtype=torch.float32)
