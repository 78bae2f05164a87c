"""4-bit expert weights (int4, MXFP4; layout in :mod:`hybridmoe.experts.packed`) dequantized to bf16 on the GPU in one
pass, by a Triton kernel.

A streamed 4-bit layer crosses PCIe as codes and scales and becomes bf16 in its GPU slot for the grouped GEMMs, once
per pass (forward, and again for the recompute and backward of a checkpointed training step). The torch version
(:func:`hybridmoe.experts.packed.dequantize_packed_torch`) is a dozen elementwise kernels with 1-2 byte temporaries
per weight; this kernel reads each code byte and its scale once and writes the two bf16 weights once: ~2.6 bytes of
traffic per weight (gpt-oss-120b: 3.2 G weights a layer; S10-b: its training step 2.4x faster).

The result is bitwise the torch version's: a value of the table (int4: c - 8; e2m1: at most 3 significant bits) times
a bf16 scale is exact in fp32, and the one rounding to bf16 is round-to-nearest-even in both.

Used by ``dequantize_packed`` for bf16 output from CUDA tensors when Triton imports (it ships with torch's CUDA
wheels); ``HYBRIDMOE_TRITON_DEQUANT=0`` keeps the torch version.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with torch's CUDA wheels; CPU-only installs have none and never need this kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "dequantize_bf16"]

BLOCK = 4096  # code bytes per program: 8192 weights


def available(codes: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`dequantize_bf16` takes this call: bf16 output, CUDA codes, Triton importable, not turned off."""
    return (triton is not None and dtype == torch.bfloat16 and codes.device.type == "cuda"
            and os.environ.get("HYBRIDMOE_TRITON_DEQUANT", "1") != "0")


if triton is not None:

    @triton.jit
    def _values(c, MXFP4: tl.constexpr):
        # codes (int32 < 16) -> their values, fp32. int4: c - 8. e2m1 (s eem): built from its bits, sign << 31, the
        # exponent e - 1 + 127 << 23 and the mantissa bit << 22 for e > 0, else m * 0.5 (0x3F000000): exact.
        if MXFP4:
            e = (c >> 1) & 3
            m = c & 1
            bits = tl.where(e > 0, ((e + 126) << 23) | (m << 22), m * 0x3F000000) | ((c >> 3) << 31)
            return bits.to(tl.float32, bitcast=True)
        else:
            return (c - 8).to(tl.float32)

    @triton.jit
    def _dequant4_kernel(codes_ptr, scales_ptr, out_ptr, n_bytes, half, groups, group_bytes, code_lead, scale_lead,
                         MXFP4: tl.constexpr, E8M0: tl.constexpr, BLOCK: tl.constexpr):
        # One lead index (an expert) per program_id(1): its codes [R, half] uint8 (rows contiguous, code_lead bytes
        # from one expert to the next: a row slice of a layer needs no copy), scales [R, groups] bf16 bits as int16,
        # or (E8M0) MXFP4's exponents as uint8 (scale_lead apart), out [R, half] int32 (contiguous, n_bytes = R * half
        # words an expert): one word = the byte's two bf16 weights, element 2j (low nibble) in the low half
        # (little-endian: it comes first in memory)
        lead = tl.program_id(1).to(tl.int64)
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = off < n_bytes
        b = tl.load(codes_ptr + lead * code_lead + off, mask=mask, other=0).to(tl.int32)
        row = off // half
        s = tl.load(scales_ptr + lead * scale_lead + row * groups + (off - row * half) // group_bytes, mask=mask,
                    other=0)  # bf16 bits, or an e8m0 exponent
        if E8M0:  # 2^(e - 127) as fp32 bits: e << 23, and e = 0 the subnormal 2^-127 (0x00400000); 255 -> inf
            e = s.to(tl.int32) & 0xFF
            s = tl.where(e > 0, e << 23, 0x00400000).to(tl.float32, bitcast=True)
        else:
            s = ((s.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)  # exact, subnormals kept
        lo = _bf16_bits(_values(b & 15, MXFP4) * s)
        hi = _bf16_bits(_values(b >> 4, MXFP4) * s)
        tl.store(out_ptr + lead * n_bytes + off, lo | (hi << 16), mask=mask)

    @triton.jit
    def _bf16_bits(x):
        # fp32 -> its bf16 rounded to nearest even, as the low 16 bits of an int32 (torch's rounding; NaN stays NaN).
        # Integer ops, so the rounding does not depend on the backend's conversion.
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
        return r.to(tl.int32)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t [L, R, C] itself if each lead's rows are contiguous (a row slice of a contiguous tensor), else a copy."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def dequantize_bf16(codes: torch.Tensor, scales: torch.Tensor, kind: str, group: int) -> torch.Tensor:
    """codes uint8 [..., out, in/2], scales bf16 (or MXFP4's uint8 exponents) [..., out, in/group] on a CUDA device
    -> bf16 [..., out, in] there (kind "int4" or "mxfp4"; see :mod:`hybridmoe.experts.packed`). A slice of rows
    (``codes[:, r0:r1]``) is read in place."""
    *lead, rows, half = codes.shape
    out = torch.empty(*lead, rows, 2 * half, dtype=torch.bfloat16, device=codes.device)
    if codes.numel():
        c3 = _rows_contiguous(codes.reshape(-1, rows, half) if codes.dim() != 3 else codes)
        s3 = _rows_contiguous(scales.reshape(-1, rows, scales.shape[-1]) if scales.dim() != 3 else scales)
        grid = (triton.cdiv(rows * half, BLOCK), c3.shape[0])
        e8m0 = s3.dtype == torch.uint8
        if e8m0 and kind != "mxfp4":
            raise ValueError(f"dequantize_bf16: uint8 (e8m0) scales are MXFP4's, not {kind}'s")
        _dequant4_kernel[grid](c3, s3 if e8m0 else s3.view(torch.int16), out.view(torch.int32), rows * half, half,
                               s3.shape[-1], group // 2, c3.stride(0), s3.stride(0), MXFP4=kind == "mxfp4", E8M0=e8m0,
                               BLOCK=BLOCK)
    return out
