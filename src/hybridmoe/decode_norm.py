"""One fused kernel for each RMSNorm of a decode step's GPU stretches, in place of the module's eight.

transformers' RMSNorm modules (Llama's formula, copied into most MoE models) run eight kernels a call in eager mode:
a cast to fp32, the square, the mean, + eps, rsqrt, the product, the cast back and the weight's product. A batch-1
DeepSeek-V2-Lite step calls 82 norms: 656 of its 1849 kernels (S12-g's profile), each a few microseconds of a graph's
replay, all on the path between the CPU's experts. This Triton kernel does one row of a call in one program: its
sum of squares, rsqrt and both products in fp32, with the model's roundings.

Two formulas are in use, which differ in where the product is rounded:
- ``cast_first`` (Llama, DeepSeek, Qwen-MoE, Mixtral, ...): ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``;
- ``scale_first`` (gpt-oss): ``(weight * (x * rsqrt(mean(x²) + eps))).to(x.dtype)``.

A module is fused only after its own forward and the kernel agree on random rows (:func:`fused_norm_pairs`,
per module, both formulas tried): the same values except, rarely, one unit in the last place (the sum of squares is
added in another order than torch's reduction), else the module keeps its own forward (a weight offset such as
Gemma's ``1 + weight``, another epsilon rule, extra arguments). Used while a decode step is run eagerly or captured
(:class:`hybridmoe.decode_graph.GraphChain`); prefill and training keep the modules' own forwards. CUDA with Triton
only; ``HYBRIDMOE_FUSED_NORMS=0`` turns it off; not with ``compile_decode`` (inductor fuses the norms itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

try:  # Triton ships with torch's CUDA wheels; CPU-only installs have none (and no use for this kernel)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["ENABLED", "FORMULAS", "fused_norm_pairs", "rms_norm", "swapped_forwards", "unavailable"]

ENABLED = os.environ.get("HYBRIDMOE_FUSED_NORMS", "1") not in ("", "0", "false", "no", "off")
FORMULAS = ("cast_first", "scale_first")
MAX_WIDTH = 16384  # one row a program: wider norms keep their own forward
_DTYPES = (torch.bfloat16, torch.float32)  # activations and outputs the kernel writes
_CHECK_ROWS = 64  # random rows each module is checked on
_FP32_REL = 1e-5
_MAX_MISMATCH = 0.002  # share of a bf16 check's values allowed to differ (by one unit in the last place)


if triton is not None:
    from hybridmoe.experts.dequant_gpu import _bf16_bits  # fp32 -> bf16 bits, rounded as torch does

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, inv_n, eps, x_row, out_row,
                         CAST_FIRST: tl.constexpr, X_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
                         BLOCK: tl.constexpr):
        # x [R, n] (rows x_row elements apart, contiguous within), w [n], out [R, n] (out_row apart; bf16 as int16
        # bits); one row a program. bf16 roundings in integer ops, as dequant_gpu's (the same on every backend).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * x_row + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) * inv_n  # torch's mean: the sum times 1/n
        y = x * tl.math.rsqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if CAST_FIRST and X_BF16:  # the normalized row rounded to the input's dtype, then the product rounded
            y = (_bf16_bits(y) << 16).to(tl.float32, bitcast=True)
        v = w * y
        if OUT_BF16:
            tl.store(out_ptr + row * out_row + cols, _bf16_bits(v).to(tl.int16), mask=mask)
        else:
            tl.store(out_ptr + row * out_row + cols, v, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, formula: str,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The fused RMSNorm of `x` [..., n] (bf16 or fp32, contiguous last dim) with `weight` [n] by `formula`
    (:data:`FORMULAS`); out_dtype (bf16 or fp32): the module's output dtype (default: x's)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)  # a view for the decode step's [B, 1, H] inputs
    out = torch.empty(rows.shape, dtype=out_dtype or x.dtype, device=x.device)
    if rows.shape[0]:
        bf16 = out.dtype == torch.bfloat16
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out.view(torch.int16) if bf16 else out, n, 1.0 / n,
                                           float(eps), rows.stride(0), out.stride(0),
                                           CAST_FIRST=formula == "cast_first", X_BF16=x.dtype == torch.bfloat16,
                                           OUT_BF16=bf16, BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape)


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _candidate(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    # (a forward set on the instance, e.g. by accelerate's hooks, is someone else's code: it keeps running)
    return ("RMSNorm" in type(module).__name__ and "forward" not in vars(module)
            and isinstance(w, torch.Tensor) and w.dim() == 1
            and 0 < w.numel() <= MAX_WIDTH and w.is_cuda and _eps(module) is not None
            and not list(module.children()))


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to the order of the sum of squares (and the rsqrt's implementation): bf16 values at most one unit in
    the last place apart, in a few places; fp32 values within a relative 1e-5 (~80 units; the decode tests' tolerance)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if torch.equal(got, want):
        return True
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return False
    if want.dtype == torch.float32:
        return bool(((got - want).abs() <= _FP32_REL * want.abs()).all())
    if want.dtype != torch.bfloat16:
        return False
    ulps = (got.view(torch.int16).long() - want.view(torch.int16).long()).abs()  # same sign: bit patterns' distance
    same_sign = (got.sign() == want.sign()) | (got == 0) | (want == 0)
    return bool(same_sign.all()) and int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) <= _MAX_MISMATCH


def _formula_of(module: nn.Module, dtype: torch.dtype) -> tuple[str, torch.dtype] | None:
    """Which formula reproduces `module`'s forward on random `dtype` rows of its width, and the dtype the module
    returns for them (e.g. gpt-oss's fp32 norm weights: bf16 for bf16 rows; Llama's: fp32), or None."""
    w = module.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = (torch.randn(_CHECK_ROWS, w.numel(), device=w.device, generator=gen) * 3).to(dtype)
    try:
        want = module(x)
    except Exception:  # another signature: not a plain RMSNorm
        return None
    if not isinstance(want, torch.Tensor):
        return None
    for formula in FORMULAS:
        if _agrees(rms_norm(x, w, _eps(module), formula, want.dtype), want):
            return formula, want.dtype
    return None


def cuda_triton_unavailable(device: torch.device, enabled: bool, switch: str) -> str | None:
    """Why a decode feature built on a Triton kernel is off on `device` (CUDA only, Triton installed, `enabled` by the
    environment variable `switch`), or None."""
    if device.type != "cuda":
        return "CUDA only"
    if triton is None:
        return "Triton is not installed"
    if not enabled:
        return f"turned off by {switch}=0"
    return None


def unavailable(device: torch.device) -> str | None:
    """Why decode steps on `device` keep the modules' own norms, or None when the fused kernel can run there."""
    return cuda_triton_unavailable(device, ENABLED, "HYBRIDMOE_FUSED_NORMS")


def fused_norm_pairs(model: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, Callable]]:
    """(module, fused forward) for every RMSNorm of `model` whose forward the kernel reproduces on `dtype` inputs
    (the step's activations); [] without Triton, off, or on a CPU model (only CUDA weights are candidates)."""
    if unavailable(torch.device("cuda")) is not None or dtype not in _DTYPES:
        return []
    pairs = []
    with torch.no_grad():
        for module in model.modules():
            if not _candidate(module):
                continue
            found = _formula_of(module, dtype)
            if found is not None:
                pairs.append((module, _forward(module, *found, dtype)))
    return pairs


def _forward(module: nn.Module, formula: str, out_dtype: torch.dtype, dtype: torch.dtype) -> Callable:
    """The fused forward of `module` for `dtype` inputs: `formula`, returning `out_dtype` (both as checked,
    :func:`_formula_of`); other inputs go to the module's own forward."""
    eps, own = _eps(module), type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype:  # checked on `dtype` inputs only
            return own(module, x)
        if x.stride(-1) != 1:
            x = x.contiguous()
        # the weight read at each call: a reloaded weight is used as the module would
        return rms_norm(x, module.weight, eps, formula, out_dtype)

    return forward


@contextmanager
def swapped_forwards(pairs: list[tuple[nn.Module, Callable]]):
    """While the block runs, each module's ``forward`` is the one paired with it (an instance attribute over the
    class's method, removed after)."""
    before = [vars(module).get("forward") for module, _ in pairs]  # a forward set on the instance (a hook's)
    for module, fn in pairs:
        module.forward = fn
    try:
        yield
    finally:
        for (module, _), fn in zip(pairs, before):
            if fn is None:
                del module.forward
            else:
                module.forward = fn
