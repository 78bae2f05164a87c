"""One token's 4-bit expert projections on the GPU, read straight from page-locked host memory (a Triton kernel).

Graph decode's GPU share (:class:`hybridmoe.mapped_share.MappedShare`) computes some of each token's routed experts
on the GPU while the CPU computes the others. Their weights stay in host RAM: the GPU reads the picked experts' codes
and scales over PCIe inside the kernel (page-locked memory is mapped into the device's address space), so no copy is
queued by the host and the expert ids never leave the device. The kernel takes the ids from device memory, which
lets it sit in a captured CUDA graph that the host launches before the routing is known.

The math is the streamed path's (``decode_graph._picked_experts``): each weight dequantized to bf16 (int4: ``(c -
8) · scale`` rounded to nearest even; MXFP4: exact), times the bf16 input, summed in fp32, the sum rounded to bf16 as
a bf16 GEMM rounds its output, then the fp32 bias. It differs from cuBLAS only in the order of the fp32 sum.

Layout (:mod:`hybridmoe.experts.packed`): codes uint8 [E, out, in/2] (element 2j in the low nibble of byte j), scales
[E, out, in/group] (int4: bf16; MXFP4: e8m0 bytes or bf16), bias fp32 [E, out] or none.
"""

from __future__ import annotations

import os

import torch

from hybridmoe.experts.dequant_gpu import triton

if triton is not None:
    import triton.language as tl

    from hybridmoe.experts.dequant_gpu import _bf16_bits, _values

__all__ = ["available", "gemv4"]

# The kernel's tiling: output rows a program, code bytes of a row a loop step, warps a program. Reading host memory
# over PCIe wants many bytes in flight: small programs that load a whole row (up to 2048 code bytes) at once. S18-d
# (`benchmarks/host_gemv.py --tilings`, H200, one expert from host memory): gpt-oss's MXFP4 expert 44.3 GB/s at
# 2,2048,2 against 30.4 at 16,256,4 (PCIe's DMA here 53.8, a read-only kernel 47.6, S18-c); V2-Lite's int4 39.4
# against 30.6. HYBRIDMOE_HOST_GEMV_TILING="ROWS,STEP_BYTES,WARPS" overrides it.
ROWS, STEP_BYTES, WARPS = (int(v) for v in os.environ.get("HYBRIDMOE_HOST_GEMV_TILING", "2,2048,2").split(","))


def available() -> bool:
    """Triton imports (it ships with torch's CUDA wheels)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _bf16_round(x):
        # fp32 -> fp32 holding its bf16 rounding (nearest even), by integer ops (backend-independent)
        return (_bf16_bits(x) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv4_kernel(x_ptr, ids_ptr, codes_ptr, scales_ptr, bias_ptr, out_ptr, slot0, rows, half, groups, x_lead,
                      code_lead, scale_lead, bias_lead, MXFP4: tl.constexpr, E8M0: tl.constexpr,
                      HAS_BIAS: tl.constexpr, GB: tl.constexpr, NG: tl.constexpr, BR: tl.constexpr):
        # program (row block, slot s): expert e = ids[slot0 + s]; out[s, r] = bf16(Σ_i W[e, r, i] x[s, i]) + b[e, r]
        # for its BR rows r. x [S, 2 * half] bf16 (x_lead apart; 0: one row for every slot). A step takes NG scale
        # groups of GB code bytes of each row, as a [BR, NG, GB] tile: one scale per (row, group), broadcast.
        s = tl.program_id(1)
        e = tl.load(ids_ptr + slot0 + s).to(tl.int64)
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = r < rows
        r64 = r.to(tl.int64)
        g = tl.arange(0, NG)
        j = tl.arange(0, GB)
        cbase = codes_ptr + e * code_lead + r64[:, None, None] * half
        sbase = scales_ptr + e * scale_lead + r64[:, None] * groups
        xbase = x_ptr + s.to(tl.int64) * x_lead
        acc = tl.zeros([BR], dtype=tl.float32)
        for g0 in range(0, groups, NG):
            gg = g0 + g
            gm = gg < groups
            byte = gg[:, None] * GB + j[None, :]  # [NG, GB] code byte within the row
            c = tl.load(cbase + byte[None, :, :], mask=rmask[:, None, None] & gm[None, :, None], other=0)
            c = c.to(tl.int32)
            sc = tl.load(sbase + gg[None, :], mask=rmask[:, None] & gm[None, :], other=0)  # [BR, NG]
            if E8M0:  # 2^(e - 127) as fp32 bits, e = 0 the subnormal 2^-127 (dequant_gpu's rule)
                ex = sc.to(tl.int32) & 0xFF
                scale = tl.where(ex > 0, ex << 23, 0x00400000).to(tl.float32, bitcast=True)
            else:  # bf16 bits
                scale = ((sc.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            xe = tl.load(xbase + 2 * byte, mask=gm[:, None], other=0).to(tl.float32)  # [NG, GB] even inputs
            xo = tl.load(xbase + 2 * byte + 1, mask=gm[:, None], other=0).to(tl.float32)  # odd inputs
            wlo = _bf16_round(_values(c & 15, MXFP4) * scale[:, :, None])
            whi = _bf16_round(_values(c >> 4, MXFP4) * scale[:, :, None])
            acc += tl.sum(tl.sum(wlo * xe[None, :, :] + whi * xo[None, :, :], axis=2), axis=1)
        y = _bf16_round(acc)
        if HAS_BIAS:
            y += tl.load(bias_ptr + e * bias_lead + r64, mask=rmask, other=0.0)
        tl.store(out_ptr + s.to(tl.int64) * rows + r64, y, mask=rmask)


def gemv4(x: torch.Tensor, ids: torch.Tensor, slot0: int, codes: torch.Tensor, scales: torch.Tensor,
          bias: torch.Tensor | None, kind: str, group: int, out: torch.Tensor, rows_per_program: int = ROWS,
          step_bytes: int = STEP_BYTES, num_warps: int = WARPS) -> torch.Tensor:
    """out[s] = x[s] · W[ids[slot0 + s]]ᵀ (+ bias) for s < out.shape[0], on x's device.

    x: [S, in] or [1, in] bf16 on the device (one row serves every slot); ids: int64 [K] on the device; codes uint8
    [E, out, in/2] and scales [E, out, in/group] (``kind`` "int4" or "mxfp4"; int4 bf16, MXFP4 uint8 e8m0 or bf16)
    in page-locked host memory or on the device; bias fp32 [E, out] (the same) or None; out fp32 [S, out] on the
    device. No host sync: capturable in a CUDA graph. ``rows_per_program``, ``step_bytes`` (powers of two) and
    ``num_warps``: the kernel's tiling (benchmarks/host_gemv.py sweeps them)."""
    n_slots, rows = out.shape
    half = codes.shape[-1]
    groups = scales.shape[-1]
    if x.dtype != torch.bfloat16 or out.dtype != torch.float32 or group % 2 or 2 * half != groups * group:
        raise ValueError(f"gemv4: x bf16 and out fp32 with in = groups x group (got {x.dtype}, {out.dtype}, "
                         f"in {2 * half}, {groups} groups of {group})")
    for t in (codes, scales) + (() if bias is None else (bias,)):
        if not t.is_contiguous():
            raise ValueError("gemv4: the weights, scales and bias must be contiguous")
    e8m0 = scales.dtype == torch.uint8
    gb = group // 2
    ng = max(1, step_bytes // gb)
    grid = (triton.cdiv(rows, rows_per_program), n_slots)
    _gemv4_kernel[grid](x, ids, codes, scales if e8m0 else scales.view(torch.int16),
                        codes if bias is None else bias, out, slot0, rows, half, groups,
                        x.shape[1] if x.shape[0] > 1 else 0, codes.stride(0), scales.stride(0),
                        0 if bias is None else bias.stride(0), MXFP4=kind == "mxfp4", E8M0=e8m0,
                        HAS_BIAS=bias is not None, GB=gb, NG=ng, BR=rows_per_program, num_warps=num_warps)
    return out
