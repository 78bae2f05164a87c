"""compressed-tensors checkpoints: integer weights with group/channel scales, read as shipped.

What is read (``quantization_config.quant_method: compressed-tensors``; Kimi-K2-Thinking's int4 experts, llm-compressor
W4A16 / W8A16 releases, and what ``hybridmoe convert`` writes):

- ``format: pack-quantized``, 4-bit: ``{module}.weight_packed`` int32 [out, ceil(in/8)], eight values per int32,
  lowest bits first, each stored as q + 8 with q in [-8, 7]; ``{module}.weight_scale`` [out, in/G] (group), [out, 1]
  (channel) or one number (tensor); ``{module}.weight_shape`` (out, in). Viewed as bytes (little-endian), byte j of a
  row holds element 2j in its low nibble and element 2j+1 in its high one: hybridmoe's own int4 code layout
  (:mod:`hybridmoe.experts.packed`), so routed experts in int4 with the same group are copied in as they are.
- ``format: int-quantized`` / ``naive-quantized``, 4 or 8 bits: ``{module}.weight`` int8 [out, in] + the same scales.

In both, w = q · scale (symmetric: no zero point). Every other variant is refused with one line naming it: asymmetric
weights (zero points), quantized activations or KV cache, float or other bit widths, block / token strategies,
activation reordering (``g_idx``), sparsity or transforms, and other formats. Which config group describes a module
follows compressed-tensors' own matching: a ``re:`` target is matched against the module's name as stored, any other
target is a module name or a class name (every quantized tensor here is a Linear's weight, so ``Linear`` matches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .experts.packed import INT4_GROUP, PackedFormat, unpack_nibbles

METHOD = "compressed-tensors"
PACKED = "pack-quantized"
INT_FORMATS = ("int-quantized", "naive-quantized")
_STRATEGIES = ("group", "channel", "tensor")


@dataclass(frozen=True)
class IntScheme:
    """One config group's weight quantization: `bits`-bit symmetric integers in `fmt`, one scale per `group` inputs
    (None: per output channel, "tensor": one scale)."""

    targets: tuple[str, ...]
    fmt: str  # "pack-quantized" | "int-quantized" | "naive-quantized"
    bits: int
    strategy: str  # "group" | "channel" | "tensor"
    group: int | None  # inputs per scale for "group"

    def matches(self, module: str) -> bool:
        for t in self.targets:
            if t.startswith("re:"):
                if re.match(t[3:], module):
                    return True
            elif t == module or t.endswith("Linear"):  # a module name, or a Linear class: every weight here is one
                return True
        return False


@dataclass(frozen=True)
class CompressedTensors:
    """A compressed-tensors checkpoint hybridmoe reads: its config groups, in the order the config lists them."""

    schemes: tuple[IntScheme, ...]

    name = METHOD

    def scheme(self, module: str, key: str, f: Path) -> IntScheme:
        for s in self.schemes:
            if s.matches(module):
                return s
        if len(self.schemes) == 1:  # one group: it is what quantized this tensor, whatever its targets say
            return self.schemes[0]
        raise CheckpointError(f"tensor '{key}' in '{f.name}' is quantized, but no config group of the "
                              "quantization_config targets its module; the checkpoint does not match its config.json")

    def experts_scheme(self) -> IntScheme:
        """The group that quantizes the routed experts: the one whose ``re:`` target names experts, else the first
        (transformers' rule, ``get_experts_scheme``)."""
        named = [s for s in self.schemes if any(t.startswith("re:") and "experts" in t for t in s.targets)]
        return (named or list(self.schemes))[0]

    def compact(self) -> torch.dtype | PackedFormat:
        """How the routed experts are held when the user names no expert dtype: compact, as shipped where the format
        is hybridmoe's own (int4 in groups of a multiple of 32), else int4 / int8 quantized from the weights."""
        s = self.experts_scheme()
        if s.bits == 8:
            return torch.int8
        return PackedFormat("int4", s.group if self.ships_group(s) else INT4_GROUP)

    @staticmethod
    def ships_group(s: IntScheme) -> bool:
        return s.fmt == PACKED and s.strategy == "group" and s.group % 32 == 0

    def ships(self, experts) -> bool:
        """Whether experts held in `experts` format are the checkpoint's own int4 bytes."""
        return isinstance(experts, PackedFormat) and experts.kind == "int4" and any(
            self.ships_group(s) and s.group == experts.group for s in self.schemes)

    def __str__(self) -> str:
        parts = sorted({f"int{s.bits} {s.fmt} " + (f"group {s.group}" if s.strategy == "group" else s.strategy)
                        for s in self.schemes})
        return f"compressed-tensors {', '.join(parts)}"


def parse_config(q: dict, where: Path) -> CompressedTensors:
    """The checkpoint's compressed-tensors quantization_config, or one line naming what hybridmoe does not read."""

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"'{where}' declares quantization_config quant_method '{METHOD}' with {what}, which "
                               "hybridmoe does not read (it reads symmetric int4 pack-quantized and int4/int8 "
                               "int-quantized weights with group, channel or tensor scales)")

    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if q.get(key):
            raise refuse(f"a {key}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise refuse("no config_groups")
    top = q.get("format")
    schemes = []
    for gname, g in groups.items():
        if not isinstance(g, dict):
            raise refuse(f"config group '{gname}' that is not a mapping")
        fmt = g.get("format") or top
        for act in ("input_activations", "output_activations"):
            if g.get(act):
                raise refuse(f"quantized {act.replace('_', ' ')} (group '{gname}')")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise refuse(f"config group '{gname}' without weights")
        if fmt not in (PACKED, *INT_FORMATS):
            raise refuse(f"format '{fmt}' (group '{gname}')")
        bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy", "tensor")
        if kind != "int":
            raise refuse(f"{kind} weights (group '{gname}')")
        if bits not in ((4,) if fmt == PACKED else (4, 8)):
            raise refuse(f"{bits}-bit {fmt} weights (group '{gname}')")
        if not w.get("symmetric", True):
            raise refuse(f"asymmetric weights with zero points (group '{gname}')")
        if strategy not in _STRATEGIES:
            raise refuse(f"strategy '{strategy}' (group '{gname}')")
        if w.get("actorder") == "group":
            raise refuse(f"activation reordering actorder 'group' (weight_g_idx, group '{gname}')")
        group = w.get("group_size")
        if strategy == "group" and not (isinstance(group, int) and group > 0):
            raise refuse(f"strategy 'group' and group_size {group!r} (group '{gname}')")
        targets = g.get("targets") or []
        schemes.append(IntScheme(tuple(targets), fmt, bits, strategy, group if strategy == "group" else None))
    return CompressedTensors(tuple(schemes))


@dataclass
class PackedWeight:
    """A 4-bit weight as stored: codes uint8 [out, in/2] (low nibble first, q + 8), scales [out, in/group] float."""

    codes: torch.Tensor
    scales: torch.Tensor
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in], (code - 8) · scale: exact for bf16 scales (4 bits times 8 bits fits fp32's 24)."""
        c = unpack_nibbles(self.codes).float() - 8  # [out, in]
        out, n = c.shape
        return (c.view(out, n // self.group, self.group) * self.scales.float().unsqueeze(-1)).view(out, n)


def _scale_group(scale: torch.Tensor, out: int, n: int, s: IntScheme, skey: str, f: Path) -> int:
    """Inputs per scale, after checking the scale tensor against its weight (out, n) and the declared scheme."""
    if not scale.is_floating_point():
        raise CheckpointError(f"tensor '{skey}' in '{f.name}' is {scale.dtype}; compressed-tensors scales are floats")
    if s.strategy == "group" and n % s.group:
        raise CheckpointError(f"tensor '{skey}' in '{f.name}': group_size {s.group} does not divide the weight's "
                              f"{n} inputs; hybridmoe reads whole groups only")
    want = {"group": (out, n // (s.group or 1)), "channel": (out, 1), "tensor": None}[s.strategy]
    ok = scale.numel() == 1 if want is None else tuple(scale.shape) == want
    if not ok:
        raise CheckpointError(f"tensor '{skey}' in '{f.name}' has shape {tuple(scale.shape)}, but a {s.strategy} scale "
                              f"of a [{out}, {n}] weight{f' in groups of {s.group}' if s.group else ''} is "
                              f"{list(want) if want else 'one number'}; the checkpoint's scales do not match its weights")
    return s.group if s.strategy == "group" else n


def read_packed(packed: torch.Tensor, shape: torch.Tensor, scale: torch.Tensor, s: IntScheme, key: str,
                f: Path) -> PackedWeight:
    """``weight_packed`` int32 [out, ceil(in/8)] + ``weight_shape`` + ``weight_scale`` -> a :class:`PackedWeight`."""
    base = key[: -len("weight_packed")]
    dims = shape.flatten().tolist() if not shape.is_floating_point() else []
    if len(dims) != 2 or packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != dims[0] \
            or packed.shape[1] != -(-dims[1] // 8):
        raise CheckpointError(f"tensor '{key}' in '{f.name}' is {packed.dtype} {tuple(packed.shape)} with weight_shape "
                              f"{dims}; pack-quantized int4 is int32 [out, ceil(in/8)]")
    out, n = dims
    if n % 2:
        raise CheckpointError(f"tensor '{key}' in '{f.name}' packs {n} inputs per row; hybridmoe reads an even number")
    group = _scale_group(scale, out, n, s, base + "weight_scale", f)
    # int32 words -> their bytes, lowest first (safetensors is little-endian; so is every host torch runs this on)
    codes = packed.view(torch.uint8)[:, : n // 2]  # [out, in/2]
    scales = scale.reshape(out, -1) if scale.numel() > 1 else scale.reshape(1, 1).expand(out, 1)
    return PackedWeight(codes.contiguous(), scales.contiguous(), group)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, s: IntScheme, key: str, f: Path) -> torch.Tensor:
    """int-quantized ``weight`` int8 [out, in] + ``weight_scale`` -> fp32 q · scale."""
    if q.dim() != 2:
        raise CheckpointError(f"tensor '{key}' in '{f.name}' has shape {tuple(q.shape)}; int-quantized weights are 2-D")
    out, n = q.shape
    group = _scale_group(scale, out, n, s, key + "_scale", f)
    s_ = scale.float().reshape(out, -1) if scale.numel() > 1 else scale.float().reshape(1, 1)
    return (q.float().view(out, n // group, group) * s_.unsqueeze(-1)).view(out, n)
