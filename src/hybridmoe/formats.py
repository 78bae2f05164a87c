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
from pathlib import Path

from torch import nn

from .checkpoint import Checkpoint, KeyMapper
from .errors import CheckpointError

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
_FIX = ("hybridmoe reads bf16/fp16/fp32 checkpoints for now: use the model's bf16 release, or convert it to bf16 "
        "first (transformers loads it with the quantization config's `dequantize=True`, then `save_pretrained`)")


def quantization_method(model_dir: Path) -> str | None:
    """The ``quant_method`` that config.json declares (``quantization_config`` or ``compression_config``), or None."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # read_config reports an unreadable config.json with its own line
    for key in ("quantization_config", "compression_config"):
        q = raw.get(key) if isinstance(raw, dict) else None
        if q:
            method = q.get("quant_method") if isinstance(q, dict) else None
            return str(method or "unknown")
    return None


def refuse_quantized_config(model_dir: Path) -> None:
    """Check 1: a checkpoint that declares a quantization method is refused with the method named."""
    method = quantization_method(model_dir)
    if method is not None:
        what = _METHODS.get(method, "quantized weights")
        raise CheckpointError(
            f"'{model_dir / 'config.json'}' declares quantization_config quant_method '{method}' ({what}), which "
            f"hybridmoe does not load yet; {_FIX}"
        )


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


def check_tensors(ckpt: Checkpoint, model: nn.Module, expert_modules: set[str]) -> list[str]:
    """Checks 2 and 3 over every checkpoint tensor's name and header dtype; returns the keys safe to ignore.

    model: built on the meta device with its fused experts swapped (names, shapes and buffer dtypes only);
    expert_modules: module names of its routed-expert blocks."""
    mapper = KeyMapper(model.config.model_type)
    expected = model.state_dict()  # meta tensors: names and dtypes
    ignored, used = [], []
    for f, keys in ckpt.keys_by_file().items():  # names first: quantization metadata is the clearer diagnosis
        for key in sorted(keys):
            name = mapper.rename(key)
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
        if dtype in FLOAT_DTYPES:
            continue
        want_int = name in expected and not expected[name].is_floating_point()
        if not (want_int and dtype in _INT_DTYPES):
            raise CheckpointError(
                f"tensor '{key}' in '{f.name}' is stored as {dtype}, a format hybridmoe does not load; {_FIX}"
            )
    return ignored
