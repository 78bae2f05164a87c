"""Quantized checkpoint tensors for export: dequantized with the loader's code, quantized back into the checkpoint's
own format and layout.

One quantized weight is a *group* of stored tensors: its primary (the key :class:`~hybridmoe.formats.WeightReader`
reads as the weight: FP8 ``.weight``, MXFP4 ``{proj}_blocks``, compressed-tensors ``.weight_packed`` or int8
``.weight``) and its companions (``_scale_inv``, ``_scales``, ``weight_scale``, ``weight_shape``). A group is merged
slice by slice (one expert of a fused [E, ...] tensor at a time, so a layer of gpt-oss-120b experts is never a float
tensor): dequantize the slice to fp32 with the loader's own function, add ΔW, quantize it back.

Quantization rules, each the one the format's own tools write with:

- FP8 e4m3 in [bo, bi] blocks (DeepSeek-V3's ``weight_dequant`` inverse, transformers' ``FineGrainedFP8``): per block
  scale_inv = amax / 448 in the stored scale dtype, codes = w / scale_inv clamped to ±448 (torch's cast does not
  saturate: it would make NaN) and rounded to the nearest e4m3 (torch's cast: ties to even). Edge blocks are cut
  short as the loader reads them. No block size: one scale for the tensor.
- MXFP4 (gpt-oss): :func:`~hybridmoe.experts.packed.quantize_mxfp4` (OCP: shared exponent floor(log2 amax) - 2,
  nearest e2m1), codes as ``{proj}_blocks`` [..., out, in/32, 16], exponents + 127 as the e8m0 ``{proj}_scales``:
  the layout transformers' gpt-oss reader and the loader read.
- compressed-tensors: the config group's strategy (group / channel / tensor) and group size, symmetric (no zero
  point), scales in their stored dtype. int4 by the loader's own :func:`~hybridmoe.experts.packed.quantize_int4`
  (llama.cpp's Q4_0 rule: the value of largest magnitude maps to -8, so all 16 levels are used), packed eight to a
  little-endian int32, lowest bits first, offset 8 (``pack_to_int32``'s layout); int8 amax / 127 (``quantize_rows``'
  rule). compressed-tensors' own observer (amax / 7.5 for int4) decodes the same way but gave 1.6x the logit error
  of one re-quantization on the test model (tests/test_export_quantized.py), so the loader's rule is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import read_tensor
from .compressed import PACKED, CompressedTensors, dequantize_int, read_packed
from .errors import CheckpointError
from .experts.cpu_experts import quantize_rows
from .experts.packed import PackedFormat, dequantize_packed, quantize_int4, quantize_mxfp4, unpack_nibbles
from .formats import Fp8Blocks, Mxfp4, WeightReader, _check_mxfp4, dequantize_fp8

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# safetensors dtype names of the tensors a quantized weight is stored as (codes, scales)
_TORCH_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32,
                 "I64": torch.int64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                 "F64": torch.float64}


# -- quantizers (the inverse of the loader's dequantization) -------------------------------------------------------
def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None, scale_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] fp32 -> (codes float8_e4m3fn [out, in], scale_inv [ceil(out/bo), ceil(in/bi)] or [1] in
    `scale_dtype`), so that :func:`~hybridmoe.formats.dequantize_fp8` gives w within one e4m3 rounding."""
    if block is None:
        scale = _nonzero(w.abs().amax().reshape(1) / FP8_MAX).to(scale_dtype)  # [1]
        return (w / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    bo, bi = block
    out_f, in_f = w.shape
    nbo, nbi = -(-out_f // bo), -(-in_f // bi)
    padded = torch.zeros(nbo * bo, nbi * bi, dtype=torch.float32)  # edge blocks padded with zeros (no amax effect)
    padded[:out_f, :in_f] = w
    blocks = padded.view(nbo, bo, nbi, bi)
    scale = _nonzero(blocks.abs().amax(dim=(1, 3)) / FP8_MAX).to(scale_dtype)  # [nbo, nbi]
    q = (blocks / scale.float()[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q.view(nbo * bo, nbi * bi)[:out_f, :in_f].to(torch.float8_e4m3fn), scale


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero block keeps scale 1 (its codes are 0 under any scale; a zero scale would divide by zero)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_mxfp4_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] fp32 -> gpt-oss's (blocks uint8 [out, in/32, 16], e8m0 exponents uint8 [out, in/32])."""
    codes, exps = quantize_mxfp4(w)  # [out, in/2] uint8, [out, in/32] uint8
    return codes.view(w.shape[0], -1, 16), exps


def quantize_compressed(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype, packed: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] fp32 -> (codes, scale [out, in/group] in `scale_dtype`); `group` = in for one scale per row. Codes:
    `packed` (pack-quantized int4) ``weight_packed`` int32 [out, ceil(in/8)], else (int-quantized) q int8 [out, in].
    The loader's own rules: int4 is :func:`~hybridmoe.experts.packed.quantize_int4` (the value of largest magnitude
    maps to -8), int8 amax / 127 per group (``quantize_rows``' rule); each scale is rounded to its stored dtype before
    dividing."""
    out_f, in_f = w.shape
    if bits == 4:
        codes, scale = quantize_int4(w, group)  # uint8 [out, in/2] (compressed-tensors' bytes), bf16 [out, G]
        if not packed:  # int4 values in int8 storage
            return (unpack_nibbles(codes).to(torch.int16) - 8).to(torch.int8), scale.to(scale_dtype)
        pad = -codes.shape[1] % 4  # whole int32 words; the padding nibbles are 0, as pack_to_int32 writes them
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        return codes.contiguous().view(torch.int32), scale.to(scale_dtype)
    q, scale = quantize_rows(w.view(out_f, in_f // group, group), scale_dtype)  # [out, G, group], [out, G]
    return q.view(out_f, in_f), scale


# -- groups of stored tensors --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantGroup:
    """One quantized weight in the checkpoint: `primary` and its `companions`, in format `fmt`.

    ``out_in``: the stored codes are [..., out, in] whatever the name's orientation (MXFP4 blocks; the loader returns
    them transposed to gpt-oss's [E, in, out]); FP8 and compressed-tensors codes are in the name's orientation."""

    fmt: Fp8Blocks | Mxfp4 | CompressedTensors
    primary: str
    companions: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.primary, *self.companions)

    @property
    def out_in(self) -> bool:
        return isinstance(self.fmt, Mxfp4)

    @property
    def fused(self) -> bool:
        """Quantized per expert slice (FP8 with a block size, MXFP4), so a fused [E, ...] tensor goes slice by slice."""
        return isinstance(self.fmt, Mxfp4) or (isinstance(self.fmt, Fp8Blocks) and self.fmt.block is not None)


def quant_group(reader: WeightReader, key: str, dtypes: dict[str, str]) -> QuantGroup | None:
    """The group whose primary is `key`, or None for a tensor read as stored. dtypes: {key: safetensors dtype}."""
    fmt, has = reader.fmt, reader.ckpt.key_to_file
    if isinstance(fmt, Fp8Blocks) and dtypes.get(key) == "F8_E4M3" and key + "_scale_inv" in has:
        return QuantGroup(fmt, key, (key + "_scale_inv",))
    if isinstance(fmt, Mxfp4) and reader.logical(key) != key:
        return QuantGroup(fmt, key, (reader.logical(key) + "_scales",))
    if isinstance(fmt, CompressedTensors):
        if key.endswith(".weight_packed"):
            module = key[: -len("packed")]
            return QuantGroup(fmt, key, (module + "scale", module + "shape"))
        if key.endswith(".weight") and key + "_scale" in has and not dtypes.get(key, "F").startswith(("F", "BF")):
            return QuantGroup(fmt, key, (key + "_scale",))
    return None


class GroupIO:
    """Reads a group's stored tensors and writes merged or dequantized ones, one expert slice at a time."""

    def __init__(self, reader: WeightReader):
        self.reader = reader

    def load(self, handle, f: Path, g: QuantGroup) -> dict[str, torch.Tensor]:
        """The group's stored tensors {key: tensor}, the companions from whichever shard holds them; MXFP4 pairs are
        checked here (the loader's check)."""
        stored = {g.primary: read_tensor(handle, f, g.primary)}
        for c in g.companions:
            stored[c] = self.reader.companion(handle, f, g.primary, c, g.fmt.name)
        if isinstance(g.fmt, Mxfp4):
            _check_mxfp4(stored[g.primary], stored[g.companions[0]], self.reader.logical(g.primary), f)
        return stored

    def check(self, handle, f: Path, g: QuantGroup, headers: dict[str, tuple[str, tuple[int, ...]]]
              ) -> tuple[int, ...]:
        """The loader's checks of the group (scales that fit their weight, blocks that fit the format) run on meta
        tensors made from the safetensors `headers` {key: (dtype, shape)}: no weight is read (a pack's small
        ``weight_shape`` is), so a malformed base is refused before anything is written, whether or not the adapter
        touches the weight. Returns the shape of the weight the group stands for (as WeightReader.read gives it)."""
        meta = {}
        for k in g.keys:
            dtype, shape = headers[k]
            if k.endswith(".weight_shape"):
                meta[k] = self.reader.companion(handle, f, g.primary, k, g.fmt.name)
            elif dtype in _TORCH_DTYPES:
                meta[k] = torch.empty(shape, dtype=_TORCH_DTYPES[dtype], device="meta")
            else:
                raise CheckpointError(f"tensor '{k}' in '{self.reader.ckpt.key_to_file[k].name}' is stored as {dtype}, "
                                      f"which {g.fmt.name} weights do not use; the checkpoint does not match its config")
        if isinstance(g.fmt, Mxfp4):
            _check_mxfp4(meta[g.primary], meta[g.companions[0]], self.reader.logical(g.primary), f)
        w = self.dequantize(f, g, meta, None)
        return tuple(w.transpose(-1, -2).shape if g.out_in else w.shape)

    def slices(self, g: QuantGroup, stored: dict[str, torch.Tensor]) -> list[int | None]:
        """Expert indices of a fused [E, out, in] group quantized per slice, else [None] (the whole tensor)."""
        dims = stored[g.primary].dim() - (1 if isinstance(g.fmt, Mxfp4) else 0)  # MXFP4 blocks [..., out, G, 16]
        return list(range(stored[g.primary].shape[0])) if g.fused and dims > 2 else [None]

    def dequantize(self, f: Path, g: QuantGroup, stored: dict[str, torch.Tensor], e: int | None) -> torch.Tensor:
        """Slice `e` (None: all) as fp32, [.., out, in] for MXFP4, the stored orientation otherwise, by the loader's
        own functions (``WeightReader.read`` calls the same ones on whole tensors)."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if e is None else t[e]

        w = stored[g.primary]
        if isinstance(g.fmt, Fp8Blocks):
            scale = stored[g.companions[0]]
            return dequantize_fp8(pick(w), scale if g.fmt.block is None else pick(scale), g.fmt.block, g.primary, f)
        if isinstance(g.fmt, Mxfp4):  # blocks [.., out, G, 16] -> codes [.., out, in/2]; e8m0 exponents as they are
            return dequantize_packed(pick(w).flatten(-2), pick(stored[g.companions[0]]), PackedFormat("mxfp4", 32))
        module = g.primary.rsplit(".", 1)[0]
        s = g.fmt.scheme(module, g.primary, f)
        if s.fmt == PACKED:
            scale, shape = stored[g.companions[0]], stored[g.companions[1]]
            return read_packed(w, shape, scale, s, g.primary, f).dequantize()
        return dequantize_int(w, stored[g.companions[0]], s, g.primary, f)

    def output(self, g: QuantGroup, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The group's output tensors, to be filled by :meth:`quantize_into`: for a sliced group, new tensors shaped
        and typed like the stored ones; else the stored ones (replaced whole; an unchanged ``weight_shape`` stays)."""
        if self.slices(g, stored) == [None]:
            return dict(stored)
        return {k: torch.empty_like(stored[k]) for k in g.keys}

    def quantize_into(self, f: Path, g: QuantGroup, out: dict[str, torch.Tensor], e: int | None,
                      w: torch.Tensor) -> None:
        """Write slice `e` (None: all) of the group, quantized from fp32 `w` (orientation as :meth:`dequantize`)."""
        def put(key: str, t: torch.Tensor) -> None:
            if e is None:
                out[key] = t.reshape(out[key].shape)  # a per-tensor scale keeps its stored shape ([], [1], [1, 1])
            else:
                out[key][e] = t

        skey = g.companions[0]
        if isinstance(g.fmt, Fp8Blocks):
            q, scale = quantize_fp8(w, g.fmt.block, out[skey].dtype)
            put(g.primary, q)
            put(skey, scale)
            return
        if isinstance(g.fmt, Mxfp4):
            blocks, exps = quantize_mxfp4_blocks(w)
            put(g.primary, blocks)
            put(skey, exps)
            return
        s = g.fmt.scheme(g.primary.rsplit(".", 1)[0], g.primary, f)
        packed = s.fmt == PACKED
        if s.strategy == "tensor":  # one scale: the weight as one row
            q, scale = quantize_compressed(w.reshape(1, -1), s.bits, w.numel(), out[skey].dtype, packed)
            q = q.view(w.shape[0], -1)
        else:
            q, scale = quantize_compressed(w, s.bits, s.group if s.strategy == "group" else w.shape[1],
                                           out[skey].dtype, packed)
        put(skey, scale)
        out[g.primary] = q  # weight_shape is unchanged
