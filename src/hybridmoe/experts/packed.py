"""4-bit routed-expert weights: int4 (quantized by hybridmoe) and MXFP4 (gpt-oss as shipped), one layout for both.

A 4-bit weight matrix [out, in] is two tensors:

  codes  uint8 [out, in/2]      byte j of a row holds element 2j in its low nibble and element 2j+1 in its high one
  scales [out, in/group]        one scale per `group` consecutive inputs of a row: w[o, i] = VALUES[code] · scale[o, i // group]
                                int4: bf16; MXFP4: uint8, the e8m0 exponents as shipped (scale 2^(e - 127);
                                :attr:`PackedFormat.scale_dtype`)

and a 16-entry value table per kind:

  int4   VALUES[c] = c - 8                  symmetric, q ∈ [-8, 7] (compressed-tensors' pack-quantized int4 is this
                                            byte layout: 8 values per little-endian int32, lowest bits first, offset 8)
  mxfp4  VALUES[c] = e2m1(c)                ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} (OCP microscaling FP4; gpt-oss's
                                            ``*_blocks`` and ``*_scales``, byte for byte), group 32, scales 2^(e - 127)
                                            (exact in bf16: :func:`mxfp4_scales`)

MXFP4 keeps its exponents as bytes: a scale is then 1 byte per 32 weights, not 2 (gpt-oss-120b: 17 bytes a block of
32 weights, not 18; 5.6% fewer bytes for every decode step to read, ~3.4 GiB less RAM). Every consumer takes either
scale dtype (:func:`scale_values`; the CPU kernel and the GPU dequantization read the bytes themselves).

Every VALUES[c] · scale is exact in fp32 (at most 3 significant bits times bf16's 8), so :func:`dequantize_packed`
to fp32 is the format's exact meaning; the CPU kernel computes Σ_groups scale · Σ_i VALUES[c_i] · x_i, equal to it up
to summation order.

Group size. int4's default :data:`INT4_GROUP` = 64 inputs per scale (0.25 bits a weight for the scales), chosen by
``benchmarks/int4_groups.py`` (BENCHMARKS.md, session 6): logit error and greedy agreement at 32 / 64 / 128 against
bf16 on the V2-Lite shape, and the kernel's decode speed. A group must divide the input dimension and be a multiple
of 32 (the kernel's block); :func:`int4_group_for` picks the largest of 128 / 64 / 32 that divides where the default
does not (gpt-oss's 2880 = 45 · 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["INT4_GROUP", "MXFP4_VALUES", "PackedFormat", "dequantize_packed", "dequantize_packed_torch",
           "int4_group_for", "mxfp4_scales", "pack_nibbles", "scale_values", "quantize_activations", "quantize_int4", "quantize_mxfp4", "unpack_nibbles"]

INT4_GROUP = 64
BLOCK = 32  # the kernel's unit: 16 bytes of codes

INT4_VALUES = tuple(float(c - 8) for c in range(16))
MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class PackedFormat:
    """A 4-bit expert weight format: `kind` "int4" or "mxfp4", `group` inputs per scale."""

    kind: str
    group: int

    def __post_init__(self):
        if self.kind not in ("int4", "mxfp4"):
            raise ValueError(f"unknown 4-bit format '{self.kind}' (int4 or mxfp4)")
        if self.group <= 0 or self.group % BLOCK:
            raise ValueError(f"a 4-bit group must be a positive multiple of {BLOCK}, got {self.group}")

    @property
    def values(self) -> tuple[float, ...]:
        return INT4_VALUES if self.kind == "int4" else MXFP4_VALUES

    def __str__(self) -> str:
        return self.kind if self.kind == "mxfp4" else f"int4 (group {self.group})"

    @property
    def scale_dtype(self) -> torch.dtype:
        """How the scales are stored: MXFP4's e8m0 exponents as uint8 (as shipped), int4's bf16."""
        return torch.uint8 if self.kind == "mxfp4" else torch.bfloat16

    def fits(self, in_features: int) -> bool:
        return in_features % self.group == 0

    @property
    def int8_activations(self) -> bool:
        """int4 with groups of a multiple of 64, and MXFP4, compute on the CPU against int8 activations (one fp32
        scale per weight group: :func:`quantize_activations`), with integer dot products in the kernel (llama.cpp's
        Q4_0 x Q8_0 and MXFP4 x Q8_0: twice an e2m1 value is an integer); the torch path quantizes the same way, so
        the two agree. On the GPU activations stay bf16."""
        return (self.kind == "int4" and self.group % 64 == 0) or self.kind == "mxfp4"


def int4_group_for(in_dims: tuple[int, ...], group: int | None = None) -> int | None:
    """The int4 group size for expert matrices with these input dims: `group` (default :data:`INT4_GROUP`) if it
    divides all of them, else the largest of 128 / 64 / 32 that does; None if none does (int4 cannot hold them)."""
    for g in ((group,) if group else (INT4_GROUP, 128, 64, 32)):
        if all(d % g == 0 for d in in_dims):
            return g
    return None


def pack_nibbles(c: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., n] (each < 16) -> packed uint8 [..., n/2] (element 2j low nibble, 2j+1 high)."""
    c = c.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., n/2] -> codes uint8 [..., n] (each < 16), on p's device."""
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise int4: w [..., out, in] float -> (codes uint8 [..., out, in/2], scales bf16
    [..., out, in/group]).

    Per group the scale maps the largest magnitude to 8 (the value of largest magnitude gets -8 when it is negative,
    and +8 clamps to 7 otherwise: llama.cpp's Q4_0 rule, which uses all 16 levels), rounded to bf16 before dividing so
    the codes match the stored scale. Works on one fp32 copy of `w`; callers pass one expert at a time."""
    *lead, out, n = w.shape
    if n % group:
        raise ValueError(f"int4 group {group} does not divide the input dimension {n}")
    g = w.float().reshape(*lead, out, n // group, group)  # [..., out, G, group] fp32
    idx = g.abs().argmax(-1, keepdim=True)
    peak = g.gather(-1, idx)  # signed value of largest magnitude [..., out, G, 1]
    scale = (peak / -8).to(torch.bfloat16)  # negative peak -> positive scale, and vice versa
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group: codes 8 (= 0) under any scale
    q = torch.round(g / s).clamp_(-8, 7) + 8  # [..., out, G, group] in [0, 15]
    codes = pack_nibbles(q.reshape(*lead, out, n).to(torch.uint8))
    return codes, scale.squeeze(-1)


def dequantize_packed(codes: torch.Tensor, scales: torch.Tensor, fmt: PackedFormat,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes uint8 [..., out, in/2], scales [..., out, in/group] (bf16, or MXFP4's uint8 exponents) -> [..., out, in]
    in `dtype` (exact in fp32; bf16 rounds each weight once, as fp32 math then a cast would).

    On the tensors' device: the streamed path dequantizes a whole layer on the GPU per pass. bf16 from CUDA tensors
    goes through one Triton kernel where Triton imports (:mod:`hybridmoe.experts.dequant_gpu`, bitwise the same);
    otherwise :func:`dequantize_packed_torch`."""
    if codes.device.type == "cuda":
        from . import dequant_gpu  # imports Triton: only where a GPU is

        if dequant_gpu.available(codes, dtype):
            return dequant_gpu.dequantize_bf16(codes, scales, fmt.kind, fmt.group)
    return dequantize_packed_torch(codes, scales, fmt, dtype)


def dequantize_packed_torch(codes: torch.Tensor, scales: torch.Tensor, fmt: PackedFormat,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`dequantize_packed` in torch ops, on any device. Written for bandwidth: no index tensors or table
    gathers, every temporary 1-2 bytes a weight, in chunks of rows so the temporaries stay ~200 MB whatever the
    layer's size. Values come from the code's bits: int4 is c - 8 (exact in bf16); an e2m1 code becomes the bf16
    with its sign, exponent and mantissa bits (exact)."""
    if scales.dtype == torch.uint8 and fmt.kind != "mxfp4":
        raise ValueError(f"uint8 (e8m0) scales are MXFP4's, not those of {fmt}")
    *lead, rows, half = codes.shape
    n = 2 * half
    out = torch.empty(*lead, rows, n, dtype=dtype, device=codes.device)
    # bf16 math is exact here (a value has <= 3 significant bits, a scale 8: the product rounds once, to `dtype`);
    # fp32 out: compute in fp32 (exact)
    work = torch.float32 if dtype == torch.float32 else torch.bfloat16
    flat_c, flat_s, flat_o = codes.reshape(-1, half), scales.reshape(-1, n // fmt.group), out.view(-1, n)
    step = max(1, (1 << 26) // n)  # rows per chunk: 64M weights
    for r in range(0, flat_c.shape[0], step):
        m = flat_c[r:r + step].shape[0]
        v = _values(unpack_nibbles(flat_c[r:r + step]), fmt, work)  # [m, in]
        v = v.view(m, n // fmt.group, fmt.group) * scale_values(flat_s[r:r + step], work).unsqueeze(-1)
        flat_o[r:r + step] = v.view(m, n)
    return out


def _values(nib: torch.Tensor, fmt: PackedFormat, dtype: torch.dtype) -> torch.Tensor:
    """uint8 codes (< 16) -> their values in `dtype`, elementwise (no gather)."""
    if fmt.kind == "int4":
        return nib.to(dtype) - 8
    # e2m1: s eem -> (-1)^s · (e == 0 ? m/2 : 2^(e-1) · (1 + m/2)), built as bf16 bits: sign << 15, the exponent
    # e - 1 + 127 = e + 126 (e > 0) << 7, the mantissa's top bit m << 6; e == 0, m == 1 is 0.5 = 0x3F00.
    x = nib.to(torch.int16)
    sign, e, m = (x >> 3) << 15, (x >> 1) & 3, x & 1
    bits = torch.where(e > 0, ((e + 126) << 7) | (m << 6), m * 0x3F00) | sign
    return bits.view(torch.bfloat16).to(dtype)


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [n, in] fp32 -> the values int8 activations stand for, fp32: per group of `group` inputs s = amax / 127,
    q = round(x / s) (ties to even), returned as q · s. The CPU kernel's quant_act, in torch (the same fp32 ops)."""
    n, k = x.shape
    g = x.float().reshape(n, k // group, group)
    s = g.abs().amax(-1, keepdim=True) / 127  # [n, G, 1] fp32
    q = torch.where(s > 0, torch.round(g / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(g))
    return (q.clamp_(-127, 127) * s).reshape(n, k)


def mxfp4_scales(exponents: torch.Tensor) -> torch.Tensor:
    """MXFP4 e8m0 exponents uint8 [...] -> bf16 scales 2^(e - 127) [...] (exact: bf16 has fp32's exponent range;
    e = 0 is 2^-127, a bf16 subnormal; e = 255, e8m0's NaN, becomes 2^128 = inf)."""
    return torch.exp2(exponents.float() - 127).to(torch.bfloat16)


def scale_values(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored 4-bit scales (bf16, or MXFP4's uint8 e8m0 exponents) as values in `dtype` (exact for bf16 and fp32)."""
    return mxfp4_scales(scales).to(dtype) if scales.dtype == torch.uint8 else scales.to(dtype)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4: w [..., out, in] float -> (codes uint8 [..., out, in/2], e8m0 exponents uint8 [..., out, in/32]:
    the scale of a block is 2^(e - 127)).

    Per block of 32 inputs the shared scale is 2^(floor(log2 amax) - 2) (the largest magnitude lands in [4, 8) and
    clamps to e2m1's 6), each weight rounds to the nearest e2m1 magnitude (a tie to the smaller), a weight that rounds
    to zero gets +0. Idempotent: dequantized and quantized again, it gives the same bytes. Used where float
    weights must go back into MXFP4 weights (an adapter merged with ``--merge``)."""
    *lead, out, n = w.shape
    g = w.float().reshape(*lead, out, n // 32, 32)  # [..., out, G, 32]
    amax = g.abs().amax(-1, keepdim=True)
    exp = torch.floor(torch.log2(amax.clamp_min(2.0 ** -125))) - 2
    scale = torch.exp2(exp.clamp(-127, 127))  # [..., out, G, 1], a power of two (exact in bf16)
    mags = torch.tensor(MXFP4_VALUES[:8], dtype=torch.float32, device=w.device)  # [8] increasing
    a = (g / scale).abs().clamp_max(6.0).contiguous()
    mid = (mags[1:] + mags[:-1]) / 2  # [7] midpoints between consecutive levels
    idx = torch.bucketize(a, mid, right=False)  # [..., 32] in 0..7: the nearest level (a tie: the lower one)
    codes = idx + 8 * ((g < 0) & (idx > 0)).to(idx.dtype)  # zero is +0 (code 0): re-quantizing gives the same bytes
    return pack_nibbles(codes.reshape(*lead, out, n)), (exp.clamp(-127, 127) + 127).squeeze(-1).to(torch.uint8)
