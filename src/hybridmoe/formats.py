"""Refuse checkpoints whose weight format hybridmoe does not understand, before a single weight is read.

The loader converts floating-point tensors (fp32, fp16, bf16, fp64) to the compute dtype. Anything else would be
computed on as if it were plain weights: an FP8-e4m3 tensor *is* a torch floating-point dtype, so without this guard
an FP8 checkpoint loads "fine" with its ``weight_scale_inv`` tensors ignored and produces garbage (relative logit
error ~1). The rule here is the project's: never compute with what was not understood. Three checks, each a
:class:`~hybridmoe.errors.CheckpointError` of one line naming the file or tensor:

1. ``config.json`` declares a ``quantization_config`` (or the older ``compression_config``): refused with the method
   named, until that method has a real loader.
2. A tensor the model uses is stored in a dtype the loader does not convert (F8_*, integer packs, …). Integer
   tensors are accepted only where the model itself holds an integer buffer of that name.
3. A checkpoint tensor the model has no place for is ignored only when the model provably does not need it:
   rotary-embedding buffers (recomputed from the config), and whole modules the model does not have (e.g. the
   multi-token-prediction layer DeepSeek-V3 and GLM-4.5 ship past ``num_hidden_layers``). Quantization metadata
   (``*_scale_inv``, ``*_blocks``, ``qweight``, …) and any extra tensor of a module the model uses are errors.

Only safetensors headers and names are read here: the check costs milliseconds even for a 600 GB checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, KeyMapper, read_tensor
from .compressed import PACKED, CompressedTensors, PackedWeight, dequantize_int, parse_config, read_packed
from .errors import CheckpointError
from .experts.packed import PackedFormat, dequantize_packed

# safetensors dtype names the loader converts to the compute dtype.
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
_INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"})

# quant_method -> what it is, for the refusal line.
_METHODS = {
    "fp8": "FP8 (e4m3) weights with block scales",
    "fbgemm_fp8": "FP8 weights (fbgemm)",
    "mxfp4": "MXFP4 expert weights",
    "mxfp8": "MXFP8 weights",
    "nvfp4": "NVFP4 weights",
    "compressed-tensors": "compressed-tensors quantized weights",
    "gptq": "GPTQ int4 weights",
    "awq": "AWQ int4 weights",
    "bitsandbytes": "bitsandbytes 4/8-bit weights",
}

# Leaf names (the part after the last '.') that carry quantization data, never plain weights.
_QUANT_LEAF = re.compile(
    r"(_scale|_scale_inv|_scales|_blocks|_zero_point|_packed|_g_idx|_global_scale)$"
    r"|^(qweight|qzeros|scales|g_idx|SCB|absmax|quant_map|nested_absmax|nested_quant_map|weight_format|"
    r"quant_state\..*|input_scale|weight_scale)$"
)
_FIX = ("hybridmoe reads bf16/fp16/fp32, FP8 block-scaled, MXFP4 and compressed-tensors int4/int8 checkpoints: use "
        "such a release of the model, or convert it to bf16 first (transformers loads it with the quantization "
        "config's `dequantize=True`, then `save_pretrained`)")


def _quantization_config(model_dir: Path) -> dict | None:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # read_config reports an unreadable config.json with its own line
    for key in ("quantization_config", "compression_config"):
        q = raw.get(key) if isinstance(raw, dict) else None
        if q:
            return q if isinstance(q, dict) else {"quant_method": "unknown"}
    return None


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8-e4m3 weights with float32 ``weight_scale_inv`` per [block_out, block_in] block (DeepSeek-V3/R1, Kimi-K2,
    Qwen3-*-FP8, GLM-4.5-FP8): w = fp8 · scale_inv of its block, blocks at the edges cut short (a 576-row weight has
    5 row blocks of 128). ``block`` None: one scale per tensor. Dequantized as each tensor is read: the GPU side
    becomes the compute dtype, the routed experts the expert dtype (bf16, or int8 slice by slice)."""

    block: tuple[int, int] | None

    name = "fp8"


@dataclass(frozen=True)
class Mxfp4:
    """MXFP4 routed experts (gpt-oss as shipped): ``{proj}_blocks`` [E, out, in/32, 16] uint8, two e2m1 values per
    byte (low nibble first), and ``{proj}_scales`` [E, out, in/32] uint8, an e8m0 exponent per 32 inputs:
    w = e2m1 · 2^(scale - 127). Everything else is plain bf16. Dequantized as each projection is read (experts to
    bf16 or int8)."""

    name = "mxfp4"


def _check_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, key: str, f: Path) -> None:
    if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape
            or blocks.shape[-1] != 16):
        raise CheckpointError(f"tensors '{key}_blocks' {tuple(blocks.shape)} {blocks.dtype} and '{key}_scales' "
                              f"{tuple(scales.shape)} {scales.dtype} in '{f.name}' are not MXFP4 (uint8 [.., G, 16] "
                              "blocks with uint8 [.., G] exponents)")


Format = Fp8Blocks | Mxfp4 | CompressedTensors


def checkpoint_format(model_dir: Path) -> Format | None:
    """Check 1: the weight format config.json declares. None for plain float checkpoints; a format object for one
    hybridmoe reads; any other declared quantization is refused with the method named."""
    q = _quantization_config(model_dir)
    if q is None:
        return None
    method = str(q.get("quant_method") or "unknown")
    if method == "fp8":
        block = q.get("weight_block_size")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3" or q.get("activation_scheme", "dynamic") != "dynamic":
            raise CheckpointError(f"'{model_dir / 'config.json'}' declares FP8 with fmt '{fmt}' and activation_scheme "
                                  f"'{q.get('activation_scheme')}'; hybridmoe reads e4m3 weights with dynamic "
                                  f"activations only; {_FIX}")
        if block is not None and (not isinstance(block, (list, tuple)) or len(block) != 2
                                  or not all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"'{model_dir / 'config.json'}' has weight_block_size {block!r}; expected two "
                                  "positive integers such as [128, 128]")
        return Fp8Blocks(tuple(block) if block is not None else None)
    if method == "mxfp4":
        return Mxfp4()
    if method == "compressed-tensors":
        return parse_config(q, model_dir / "config.json")
    what = _METHODS.get(method, "quantized weights")
    raise CheckpointError(
        f"'{model_dir / 'config.json'}' declares quantization_config quant_method '{method}' ({what}), which "
        f"hybridmoe does not load yet; {_FIX}"
    )


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None, key: str,
                   f: Path) -> torch.Tensor:
    """w [..., out, in] float8_e4m3fn, scale_inv [..., ceil(out/bo), ceil(in/bi)] (or one scale) -> fp32 w · s."""
    out_f, in_f = w.shape[-2:]
    if block is None:
        if scale_inv.numel() != 1:
            raise CheckpointError(f"tensor '{key}_scale_inv' in '{f.name}' has shape {tuple(scale_inv.shape)}; a "
                                  "per-tensor FP8 scale is one number")
        return w.float() * scale_inv.float().reshape(())
    bo, bi = block
    want = (*w.shape[:-2], -(-out_f // bo), -(-in_f // bi))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"tensor '{key}_scale_inv' in '{f.name}' has shape {tuple(scale_inv.shape)}, but weight "
                              f"{tuple(w.shape)} in blocks of {list(block)} needs {want}; the checkpoint's scales do "
                              "not match its weights")
    s = scale_inv.float().repeat_interleave(bo, -2)[..., :out_f, :].repeat_interleave(bi, -1)[..., :in_f]
    return w.float() * s


class WeightReader:
    """Reads checkpoint tensors as floats, dequantizing the declared format.

    FP8: a weight is read together with its ``weight_scale_inv`` (from whichever shard holds it) and returned as
    fp32; the scales are consumed. MXFP4: ``{proj}_blocks`` + ``{proj}_scales`` are read as the one tensor the model
    has, ``{proj}``, in the checkpoint's own orientation for that name ([E, in, out] for gpt-oss), as fp32."""

    def __init__(self, ckpt: Checkpoint, fmt: Format | None):
        self.ckpt, self.fmt = ckpt, fmt
        self._handles: dict[Path, object] = {}
        self._dtypes: dict[Path, dict[str, str]] = {}

    def consumed(self, key: str) -> bool:
        """A scale tensor read as part of its weight (never loaded on its own)."""
        has = self.ckpt.key_to_file
        if isinstance(self.fmt, Fp8Blocks):
            return key.endswith("_scale_inv") and key[: -len("_scale_inv")] in has
        if isinstance(self.fmt, Mxfp4):
            return key.endswith("_scales") and key[: -len("_scales")] + "_blocks" in has
        if isinstance(self.fmt, CompressedTensors):  # scales of a packed or int8 weight, shapes of a packed one
            base = key[: -len("weight_scale")] if key.endswith(".weight_scale") else None
            if base is not None and (base + "weight_packed" in has or base + "weight" in has):
                return True
            return key.endswith(".weight_shape") and key[: -len("shape")] + "packed" in has
        return False

    def logical(self, key: str) -> str:
        """The name a checkpoint key stands for (MXFP4 ``{proj}_blocks`` -> ``{proj}``)."""
        if isinstance(self.fmt, Mxfp4) and key.endswith("_blocks") and key[: -len("_blocks")] + "_scales" in \
                self.ckpt.key_to_file:
            return key[: -len("_blocks")]
        if isinstance(self.fmt, CompressedTensors) and key.endswith(".weight_packed"):
            return key[: -len("_packed")]
        return key

    def packed_format(self, key: str) -> PackedFormat | None:
        """The 4-bit format `key` is stored in, when :meth:`read_packed` can hand it over as is (MXFP4 blocks;
        compressed-tensors int4 in groups of a multiple of 32 with bf16 scales), from names and headers alone."""
        if isinstance(self.fmt, Mxfp4) and self.logical(key) != key:
            return PackedFormat("mxfp4", 32)
        if isinstance(self.fmt, CompressedTensors) and key.endswith(".weight_packed"):
            f = self.ckpt.key_to_file[key]
            s = self.fmt.scheme(key[: -len(".weight_packed")], key, f)
            scale = key[: -len("packed")] + "scale"
            if s.fmt != PACKED or s.strategy != "group" or s.group % 32 or scale not in self.ckpt.key_to_file:
                return None
            if self._dtype(scale) != "BF16":
                return None  # fp16/fp32 scales: dequantized, then held as the experts are
            return PackedFormat("int4", s.group)
        return None

    def _dtype(self, key: str) -> str:
        f = self.ckpt.key_to_file[key]
        if f not in self._dtypes:
            self._dtypes[f] = self.ckpt.dtypes(f)  # one header parse per shard
        return self._dtypes[f][key]

    def read_packed(self, handle, f: Path, key: str, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A 4-bit tensor as stored, in [..., out, in] orientation: (codes uint8 [..., out, in/2], scales
        [..., out, in/group]: compressed-tensors int4's bf16, MXFP4's uint8 e8m0 exponents); see
        :mod:`hybridmoe.experts.packed` (MXFP4 blocks and compressed-tensors int4 are that layout byte for byte). `t`:
        the tensor of `key`, if the caller has read it already."""
        t = read_tensor(handle, f, key) if t is None else t
        if isinstance(self.fmt, CompressedTensors):
            w = self._read_compressed(handle, f, key, t)
            return w.codes, w.scales.to(torch.bfloat16)  # bf16 already (packed_format checked the header)
        blocks = t  # [..., out, G, 16] uint8
        base = self.logical(key)
        exps = self.companion(handle, f, key, base + "_scales", "MXFP4")  # [..., out, G] uint8
        _check_mxfp4(blocks, exps, base, f)
        return blocks.flatten(-2), exps

    def release(self) -> None:
        """Forget the shards opened for companions: a memory-mapped shard keeps the pages read through it resident
        while it is open, so a reader that streams shard by shard (export) releases them after each shard."""
        self._handles.clear()

    def companion(self, handle, f: Path, key: str, ckey: str, what: str) -> torch.Tensor:
        """Tensor `ckey` read as part of `key` (its scales or shape), from whichever shard holds it."""
        cf = self.ckpt.key_to_file.get(ckey)
        if cf is None:
            raise CheckpointError(f"tensor '{key}' in '{f.name}' is {what} but the checkpoint has no '{ckey}'; it is "
                                  "incomplete")
        if cf not in self._handles:
            self._handles[cf] = handle if cf == f else self.ckpt.open(cf)
        return read_tensor(self._handles[cf], cf, ckey)

    def read(self, handle, f: Path, key: str) -> torch.Tensor:
        """The weight `key` stands for, as fp32 when it was quantized."""
        t = read_tensor(handle, f, key)
        if isinstance(self.fmt, CompressedTensors):
            w = self._read_compressed(handle, f, key, t)
            return w.dequantize() if isinstance(w, PackedWeight) else w
        if isinstance(self.fmt, Fp8Blocks) and t.dtype == torch.float8_e4m3fn:
            scale = self.companion(handle, f, key, key + "_scale_inv", "FP8")
            return dequantize_fp8(t, scale, self.fmt.block, key, f)
        if isinstance(self.fmt, Mxfp4) and self.logical(key) != key:
            w = dequantize_packed(*self.read_packed(handle, f, key, t), PackedFormat("mxfp4", 32))  # [E, out, in] fp32
            return w.transpose(-1, -2)  # the name's own orientation ([E, in, out], as transformers stores gpt-oss)
        return t

    def _read_compressed(self, handle, f: Path, key: str, t: torch.Tensor) -> torch.Tensor | PackedWeight:
        """A pack-quantized weight as stored (:class:`~hybridmoe.compressed.PackedWeight`), an int-quantized one as
        fp32, anything else as it is."""
        if key.endswith(".weight_packed"):
            module = key[: -len(".weight_packed")]
            s = self.fmt.scheme(module, key, f)
            if s.fmt != PACKED:
                raise CheckpointError(f"tensor '{key}' in '{f.name}' is pack-quantized, but the config group for "
                                      f"'{module}' declares format '{s.fmt}'; the checkpoint does not match its config")
            shape = self.companion(handle, f, key, module + ".weight_shape", "pack-quantized")
            scale = self.companion(handle, f, key, module + ".weight_scale", "pack-quantized")
            return read_packed(t, shape, scale, s, key, f)
        if not t.is_floating_point() and key.endswith(".weight") and key + "_scale" in self.ckpt.key_to_file:
            module = key[: -len(".weight")]
            s = self.fmt.scheme(module, key, f)
            if s.fmt == PACKED or t.dtype != torch.int8:
                raise CheckpointError(f"tensor '{key}' in '{f.name}' is {t.dtype}, but the config group for "
                                      f"'{module}' declares {s.fmt} int{s.bits}; the checkpoint does not match its "
                                      "config")
            return dequantize_int(t, self.companion(handle, f, key, key + "_scale", "int-quantized"), s, key, f)
        return t


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The deepest existing module on `name`'s path and the rest of the path below it."""
    parts = name.split(".")
    mod: nn.Module = model
    for i, part in enumerate(parts[:-1]):
        child = mod._modules.get(part)
        if child is None:
            return mod, ".".join(parts[i:])
        mod = child
    return mod, parts[-1]


def _provably_unused(model: nn.Module, name: str) -> bool:
    """True for a checkpoint tensor the model has no place for and whose absence cannot change its output."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "inv_freq" or ".rotary_emb." in f".{name}":
        return True  # rotary buffers: recomputed from the config
    mod, rest = _owner(model, name)
    if "." not in rest:  # a tensor of an existing module
        return rest in getattr(mod, "_non_persistent_buffers_set", ())  # the module computes it itself
    head = rest.split(".", 1)[0]
    if mod is model:
        return True  # a whole top-level module the model lacks (e.g. Qwen3-Next's `mtp.`)
    # a layer past the model's depth (e.g. DeepSeek-V3's multi-token-prediction layer 61)
    return isinstance(mod, (nn.ModuleList, nn.Sequential)) and head.isdigit() and int(head) >= len(mod)


def check_tensors(ckpt: Checkpoint, model: nn.Module, expert_modules: set[str],
                  fmt: Format | None = None) -> list[str]:
    """Checks 2 and 3 over every checkpoint tensor's name and header dtype; returns the keys safe to ignore.

    model: built on the meta device with its fused experts swapped (names, shapes and buffer dtypes only);
    expert_modules: module names of its routed-expert blocks; fmt: the declared format (FP8 weights and their
    ``weight_scale_inv`` are then understood)."""
    reader = WeightReader(ckpt, fmt)
    expected = model.state_dict()  # meta tensors: names and dtypes
    mapper = KeyMapper(model.config.model_type, expected)
    ignored, used = [], []
    for f, keys in ckpt.keys_by_file().items():  # names first: quantization metadata is the clearer diagnosis
        for key in sorted(keys):
            if reader.consumed(key):
                continue
            name = mapper.rename(reader.logical(key))
            sl = mapper.expert_slice(name)
            if (sl is not None and sl.module in expert_modules) or name in expected:
                used.append((f, key, name))
                continue
            part = mapper.concat_part(name)
            if part is not None and part.target in expected:
                used.append((f, key, part.target))
                continue
            leaf = name.rsplit(".", 1)[-1]
            if _QUANT_LEAF.search(leaf):
                raise CheckpointError(
                    f"tensor '{key}' in '{f.name}' is quantization data ('{leaf}') that hybridmoe does not "
                    f"implement; {_FIX}"
                )
            if not _provably_unused(model, name):
                raise CheckpointError(
                    f"tensor '{key}' in '{f.name}' belongs to a module the model uses, which has no tensor of that "
                    "name; refusing to compute without it (is the checkpoint for another architecture or format?)"
                )
            ignored.append(key)
    dtypes = {f: ckpt.dtypes(f) for f in ckpt.files}
    for f, key, name in used:
        dtype = dtypes[f][key]
        if isinstance(fmt, CompressedTensors) and key.endswith(".weight") and key + "_scale" in ckpt.key_to_file:
            if dtype != "I8":  # a float weight beside a scale would be computed on with its scale ignored
                raise CheckpointError(f"tensor '{key}' in '{f.name}' is stored as {dtype} beside a weight_scale; "
                                      "compressed-tensors int-quantized weights are I8")
            continue  # dequantized as it is read
        if dtype in FLOAT_DTYPES:
            continue
        if fmt is not None and dtype == "F8_E4M3" and key + "_scale_inv" in ckpt.key_to_file:
            continue  # dequantized as it is read (WeightReader)
        if reader.logical(key) != key:
            continue  # MXFP4 blocks: checked as they are read
        want_int = name in expected and not expected[name].is_floating_point()
        if not (want_int and dtype in _INT_DTYPES):
            raise CheckpointError(
                f"tensor '{key}' in '{f.name}' is stored as {dtype}, a format hybridmoe does not load; {_FIX}"
            )
    return ignored
