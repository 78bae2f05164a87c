"""Merge a LoRA adapter into a checkpoint, in the base checkpoint's own key layout, format and sharding.

The output is what the base checkpoint would be had it been trained with the adapter folded in: the same shard file
names, the same tensor names (hub per-expert ``experts.{e}.gate_proj.weight`` or Mixtral ``w1/w2/w3`` stay per-expert;
fused ``experts.gate_up_proj`` stays fused), the same dtypes and quantization format, plus config, generation config
and tokenizer. So vLLM, SGLang or llama.cpp's converter can take it like the base.

How: everything is decided from names and safetensors headers before any weight is read (``_plan``): which checkpoint
key each adapter tensor lands in, that the shapes fit, and that every adapter tensor lands somewhere. Then the shards
are streamed one at a time, one tensor at a time: W (stored dtype) -> fp32 -> W + ΔW -> stored dtype, where

- Linear LoRA (attention, dense MLP, shared experts): ΔW = (alpha / r) · B @ A, B [out, r], A [r, in];
- routed experts, per expert e: ΔW[e] = (alpha / r) · B[e] @ A[e], B [E, out, r], A [E, r, in]. For ``gate_up_proj``
  (out = 2I) a per-expert ``gate_proj``/``w1`` key takes rows [:I] and ``up_proj``/``w3`` rows [I:]; a fused key takes
  all of it.

Quantized bases (FP8 blocks, MXFP4, compressed-tensors int4/int8; :mod:`hybridmoe.formats`): a weight the adapter
touches is a group of stored tensors (codes + scales) that is dequantized by the loader's own functions, merged in
fp32 and re-quantized into the same format and scale layout, one expert slice at a time (:mod:`hybridmoe.requantize`);
every other tensor, scales included, is copied byte for byte and config.json is copied as it is. ``dtype`` instead
writes a plain checkpoint: every float tensor in that dtype, quantized weights dequantized under the name the model
uses (MXFP4 ``{proj}_blocks`` -> ``{proj}``, ``weight_packed`` -> ``weight``), scales dropped, and no
quantization_config.

Host memory holds one output shard plus one tensor being merged; the weights are never loaded as a model. The output
directory is built in a temporary sibling and renamed into place (``atomic_replace_dir``), so a failure at any point
leaves no half-written output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .adapters import _alpha_for, _check_linear, nonfinite_tensors, read_adapter, split_adapter
from .checkpoint import INDEX_NAME, Checkpoint, KeyMapper, read_config, read_tensor
from .errors import AdapterError, CheckpointError, ConfigError, NonFiniteError
from .experts import ExpertsSpec, HybridExperts
from .formats import WeightReader, check_tensors, checkpoint_format
from .io import atomic_replace_dir
from .loading import _build_empty, _swap_experts
from .requantize import GroupIO, QuantGroup, quant_group

log = logging.getLogger("hybridmoe")

# Other weight formats are not copied: an unmerged copy of the weights beside the merged ones would be loaded by
# any tool that prefers that format.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
_SKIP_NAMES = {INDEX_NAME, "pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json"}
# Written into every export: it marks a folder that a later export may replace without --overwrite.
EXPORT_MARKER = "hybridmoe_export.json"
_COPYTREE_IGNORE = shutil.ignore_patterns(".*", *_SKIP_NAMES, *(f"*{suffix}" for suffix in _SKIP_SUFFIXES))


# -- the adapter as weight deltas ----------------------------------------------------------------------------------
@dataclass
class _LinearLoRA:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float  # alpha / r

    def delta(self) -> torch.Tensor:
        """ΔW [out, in] in fp32."""
        return self.scale * (self.B.float() @ self.A.float())


@dataclass
class _ExpertLoRA:
    A: torch.Tensor  # [E, r, in] fp32
    B: torch.Tensor  # [E, out, r] fp32
    scale: float  # alpha / r

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[1]

    @property
    def in_features(self) -> int:
        return self.A.shape[2]

    def delta(self, expert: int, chunk: int = 0, num_chunks: int = 1) -> torch.Tensor:
        """Row-chunk `chunk` of expert `expert`'s ΔW: [out / num_chunks, in] in fp32 (gate = chunk 0, up = chunk 1)."""
        rows = self.out_features // num_chunks
        b = self.B[expert, chunk * rows : (chunk + 1) * rows]  # [rows, r]
        return self.scale * (b @ self.A[expert])  # [rows, in]


@dataclass(frozen=True)
class _Target:
    """What one checkpoint key receives: a Linear LoRA (`module`) or a slice of a routed-expert LoRA (`experts`)."""

    module: str | None = None  # Linear module name, e.g. "model.layers.0.self_attn.q_proj"
    experts: tuple[str, str] | None = None  # (experts module, "gate_up_proj" | "down_proj")
    expert: int | None = None  # None: the fused [E, out, in] key
    chunk: int = 0
    num_chunks: int = 1
    transposed: bool = False  # the checkpoint stores this expert projection [.., in, out] (gpt-oss, Llama-4)


@dataclass
class _Deltas:
    linear: dict[str, _LinearLoRA]  # model module name -> LoRA
    experts: dict[tuple[str, str], _ExpertLoRA]  # (experts module, proj) -> LoRA
    specs: dict[str, ExpertsSpec]  # experts module -> its layout (transposed, input projection's name)

    def for_target(self, t: _Target) -> _LinearLoRA | _ExpertLoRA:
        return self.linear[t.module] if t.module is not None else self.experts[t.experts]


def _meta_model(model_dir: Path) -> nn.Module:
    """The model on the meta device with HybridExperts swapped in: names and shapes for `split_adapter`, no weights.
    A quantized checkpoint's model is the plain one its weights stand for; a format hybridmoe does not read is
    refused (``checkpoint_format``)."""
    config = read_config(model_dir)
    if checkpoint_format(model_dir) is not None:  # the weights' format is ours to read (formats.py), not transformers'
        config.quantization_config = None  # (set first: an older `compression_config` leaves no attribute to delete)
        del config.quantization_config
    model = _build_empty(config, torch.float32)
    _swap_experts(model, torch.bfloat16, device="meta")  # shapes only: no host memory is reserved
    return model


def _read_deltas(adapter_dir: Path, model: nn.Module) -> _Deltas:
    """Read, check (finite, fits the model) and sort the adapter into Linear and routed-expert LoRA."""
    cfg, sd = read_adapter(adapter_dir)
    bad = nonfinite_tensors(sd)
    if bad:
        raise NonFiniteError(
            f"adapter '{adapter_dir}' has {len(bad)} non-finite (NaN/Inf) tensor(s), e.g. '{bad[0]}'; refusing to "
            f"merge it (it was saved from a diverged run); see `hybridmoe inspect {adapter_dir}`"
        )
    linear, experts = split_adapter(model, cfg, sd)
    _check_linear(model, linear)
    lin = {mod: _LinearLoRA(ab["A"], ab["B"], _alpha_for(cfg, mod) / ab["A"].shape[0]) for mod, ab in linear.items()}
    exp = {key: _ExpertLoRA(ea.A.float(), ea.B.float(), ea.alpha / ea.A.shape[1]) for key, ea in experts.items()}
    specs = {n: m.spec for n, m in model.named_modules() if isinstance(m, HybridExperts)}
    return _Deltas(lin, exp, specs)


# -- planning: names and headers only ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """What happens to one checkpoint key: the LoRA its weight receives (None: none), and the quantized weight it is
    the primary or a companion (scales, shape) of (None: a tensor stored as it is read)."""

    target: _Target | None
    group: QuantGroup | None = None


def _target_of(key: str, mapper: KeyMapper, deltas: _Deltas) -> _Target | None:
    """The adapter part a checkpoint key (its logical name, for a quantized weight) receives, or None when the key
    is copied unchanged."""
    name = mapper.rename(key)
    sl = mapper.expert_slice(name)
    if sl is not None:
        spec = deltas.specs.get(sl.module)
        proj = "gate_up_proj" if spec is not None and sl.proj == spec.up_name else sl.proj  # biases: no LoRA
        if (sl.module, proj) not in deltas.experts:
            return None
        return _Target(experts=(sl.module, proj), expert=sl.expert, chunk=sl.chunk, num_chunks=sl.num_chunks,
                       transposed=spec.transposed)
    if name.endswith(".weight") and name[: -len(".weight")] in deltas.linear:
        return _Target(module=name[: -len(".weight")])
    return None


def _expected_shape(t: _Target, deltas: _Deltas) -> tuple[int, ...]:
    lora = deltas.for_target(t)
    if isinstance(lora, _LinearLoRA):
        return (lora.B.shape[0], lora.A.shape[1])
    rows = lora.out_features // t.num_chunks
    mat = (lora.in_features, rows) if t.transposed else (rows, lora.in_features)
    return (lora.num_experts, *mat) if t.expert is None else mat


def _check_header(key: str, f: Path, shape: tuple[int, ...], dtype: str | None, t: _Target, deltas: _Deltas) -> None:
    """The stored tensor fits its LoRA and has a dtype we can merge into (dtype None: a quantized weight, `shape` the
    weight's logical shape)."""
    want = _expected_shape(t, deltas)
    if t.experts is not None and t.expert is not None and t.expert >= deltas.experts[t.experts].num_experts:
        raise AdapterError(f"checkpoint tensor '{key}' is expert {t.expert}, but the adapter for '{t.experts[0]}' has "
                           f"{deltas.experts[t.experts].num_experts} experts; is the adapter for another model?")
    if shape != want:
        raise AdapterError(f"checkpoint tensor '{key}' in '{f.name}' has {'logical ' if dtype is None else ''}shape "
                           f"{shape}, its LoRA gives {want}; is the adapter for another model?")
    if dtype is not None and dtype not in ("F32", "BF16", "F16", "F64"):
        raise CheckpointError(f"checkpoint tensor '{key}' in '{f.name}' is stored as {dtype} with no quantization "
                              "format declared for it; export merges into float weights and the quantized formats "
                              "hybridmoe reads only")


def _headers(ckpt: Checkpoint) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype, shape)} of every checkpoint tensor, from the shards' headers."""
    out = {}
    for f, keys in ckpt.keys_by_file().items():
        handle = ckpt.open(f)
        for k in keys:
            sl = handle.get_slice(k)
            out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
        del handle
    return out


def _groups(ckpt: Checkpoint, io: GroupIO, headers: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, QuantGroup]:
    """{key: its quantized weight} for every primary and companion key (names and headers only)."""
    dtypes = {k: dtype for k, (dtype, _) in headers.items()}
    out: dict[str, QuantGroup] = {}
    for key in ckpt.key_to_file:
        g = quant_group(io.reader, key, dtypes)
        if g is None:
            continue
        for k in g.keys:
            if k not in ckpt.key_to_file:
                raise CheckpointError(f"tensor '{key}' in '{ckpt.key_to_file[key].name}' is {g.fmt.name} but the "
                                      f"checkpoint has no '{k}'; it is incomplete")
            out[k] = g
    return out


def _plan(ckpt: Checkpoint, mapper: KeyMapper, deltas: _Deltas, io: GroupIO) -> dict[Path, dict[str, _Entry]]:
    """{shard: {key: entry}} in shard order, after checking every quantized weight's scales and that every adapter
    tensor lands in full."""
    headers = _headers(ckpt)
    groups = _groups(ckpt, io, headers)
    targets: dict[str, _Target | None] = {}  # primary or plain key -> target
    linear_hits: set[str] = set()
    expert_rows = {k: torch.zeros(lo.num_experts, dtype=torch.long) for k, lo in deltas.experts.items()}  # rows per e
    by_file = ckpt.keys_by_file()
    for f in ckpt.files:
        handle = ckpt.open(f)
        for key in sorted(by_file[f]):
            g = groups.get(key)
            if g is not None and key != g.primary:
                continue  # a companion: it follows its primary
            dtype, shape = headers[key]
            if g is not None:  # every quantized weight, touched or not: the loader's checks, on meta tensors
                dtype, shape = None, io.check(handle, f, g, headers)
            t = targets[key] = _target_of(io.reader.logical(key), mapper, deltas)
            if t is None:
                continue
            _check_header(key, f, shape, dtype, t, deltas)
            if t.module is not None:
                linear_hits.add(t.module)
            else:
                rows = deltas.experts[t.experts].out_features // t.num_chunks
                if t.expert is None:
                    expert_rows[t.experts] += rows
                else:
                    expert_rows[t.experts][t.expert] += rows
        del handle
    io.reader.release()
    _check_coverage(deltas, linear_hits, expert_rows)
    plan: dict[Path, dict[str, _Entry]] = {}
    for f in ckpt.files:
        plan[f] = {}
        for key in sorted(by_file[f]):
            g = groups.get(key)
            plan[f][key] = _Entry(targets[g.primary if g is not None else key], g)
    return plan


def _check_coverage(deltas: _Deltas, linear_hits: set[str], expert_rows: dict[tuple[str, str], torch.Tensor]) -> None:
    """Every adapter tensor landed on checkpoint keys, every expert row exactly once; else the adapter does not fit."""
    for mod in deltas.linear:
        if mod not in linear_hits:
            raise AdapterError(f"adapter tensor '{mod}.lora_A.weight' matches no weight of the checkpoint (no key "
                               f"'{mod}.weight'); is the adapter for another model?")
    for (mod, proj), rows in expert_rows.items():
        out = deltas.experts[(mod, proj)].out_features
        bad = (rows != out).nonzero().flatten().tolist()
        if bad:
            e = bad[0]
            raise AdapterError(f"adapter tensor for routed experts '{mod}.{proj}' covers {len(rows)} experts, but the "
                               f"checkpoint holds {int(rows[e])} of {out} rows of expert {e}; is the adapter for "
                               "another model (or the checkpoint incomplete)?")


# -- merging and writing -------------------------------------------------------------------------------------------
def _delta(t: _Target, deltas: _Deltas, e: int | None = None, out_in: bool = False) -> torch.Tensor:
    """ΔW in fp32 for target `t`: [out, in] for a Linear or one expert (`e`: the slice of a fused key), the whole
    [E, ...] of a fused key for e None. The checkpoint's orientation ([in, out] for a transposed one), unless
    `out_in` (MXFP4 codes are [out, in] whatever the name's orientation)."""
    lora = deltas.for_target(t)
    if isinstance(lora, _LinearLoRA):
        return lora.delta()

    def one(x: int) -> torch.Tensor:  # [rows, in] or [in, rows]
        d = lora.delta(x, t.chunk, t.num_chunks)
        return d.T if t.transposed and not out_in else d

    if t.expert is not None:
        return one(t.expert)
    if e is not None:
        return one(e)
    return torch.stack([one(x) for x in range(lora.num_experts)])  # a fused key quantized whole (per-tensor FP8)


def _merge_tensor(w: torch.Tensor, t: _Target, deltas: _Deltas, dtype: torch.dtype) -> torch.Tensor:
    """W + ΔW computed in fp32, returned in `dtype`. Fused expert keys are merged one expert at a time."""
    if t.experts is None or t.expert is not None:
        return (w.float() + _delta(t, deltas)).to(dtype)  # [out, in]
    out = torch.empty(w.shape, dtype=dtype)  # [E, out, in] (or [E, in, out])
    for e in range(w.shape[0]):
        out[e] = (w[e].float() + _delta(t, deltas, e)).to(dtype)
    return out


def _check_finite(w: torch.Tensor, key: str) -> None:
    if not torch.isfinite(w).all():
        raise NonFiniteError(f"merging the adapter into '{key}' gives non-finite values in {w.dtype}; the adapter's "
                             "updates overflow this dtype")


class _ShardMerger:
    """Writes merged shards. dtype None: the base's own format (plain tensors in their dtype, quantized weights
    re-quantized); a dtype: every float tensor in it, quantized weights dequantized, scales dropped."""

    def __init__(self, ckpt: Checkpoint, io: GroupIO, deltas: _Deltas, dtype: torch.dtype | None):
        self.ckpt, self.io, self.deltas, self.dtype = ckpt, io, deltas, dtype
        # Re-quantized companions (scales) whose shard comes later than their primary's: small, held until written.
        self.pending: dict[str, torch.Tensor] = {}
        self.written: set[Path] = set()

    def shard(self, f: Path, entries: dict[str, _Entry], dst: Path) -> tuple[int, list[str]]:
        """Write shard `f` merged to `dst` (its metadata kept); returns its tensor bytes and keys."""
        handle = self.ckpt.open(f)
        metadata = handle.metadata() or {"format": "pt"}
        tensors: dict[str, torch.Tensor] = {}
        for key, entry in entries.items():
            if entry.group is None:
                tensors[key] = self._plain(handle, f, key, entry.target)
            elif self.dtype is not None:
                if key == entry.group.primary:  # companions are dropped: the weight is plain now
                    tensors[self.io.reader.logical(key)] = self._dequantized(handle, f, entry)
            elif entry.target is None:
                tensors[key] = read_tensor(handle, f, key)  # untouched: byte for byte, scales included
            elif key in tensors:
                continue  # written with its group
            elif key in self.pending:
                tensors[key] = self.pending.pop(key)
            else:
                # The group's tensors in this shard are written now; its companions in shards still to come wait
                # in `pending` (scales: small). A primary in another shard, met from a companion in an earlier one,
                # is computed again when its own shard is written (deterministic; rare).
                for k, v in self._requantized(handle, f, entry).items():
                    kf = self.ckpt.key_to_file[k]
                    if kf == f:
                        tensors[k] = v
                    elif k != entry.group.primary and kf not in self.written:
                        self.pending[k] = v
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        del handle
        self.io.reader.release()
        save_file(tensors, str(dst), metadata=metadata)
        self.written.add(f)
        return sum(t.numel() * t.element_size() for t in tensors.values()), list(tensors)

    def _plain(self, handle, f: Path, key: str, t: _Target | None) -> torch.Tensor:
        w = read_tensor(handle, f, key)
        dtype = self.dtype if self.dtype is not None and w.is_floating_point() else w.dtype
        if t is None:
            return w.to(dtype)
        w = _merge_tensor(w, t, self.deltas, dtype)
        _check_finite(w, key)
        return w

    def _load(self, handle, f: Path, g: QuantGroup) -> tuple[Path, dict[str, torch.Tensor], list[int | None]]:
        """The group's shard, its stored tensors (compact) and the slices it is merged in."""
        pf = self.ckpt.key_to_file[g.primary]
        stored = self.io.load(handle if pf == f else self.ckpt.open(pf), pf, g)
        return pf, stored, self.io.slices(g, stored)

    def _merged_slice(self, pf: Path, entry: _Entry, stored: dict[str, torch.Tensor], e: int | None) -> torch.Tensor:
        """Slice `e` (None: all) of a quantized weight dequantized, plus its ΔW: fp32, [.., out, in] for MXFP4, the
        stored orientation otherwise."""
        g, t = entry.group, entry.target
        w = self.io.dequantize(pf, g, stored, e)
        if t is not None:
            w = w + _delta(t, self.deltas, e, g.out_in)
            _check_finite(w, g.primary)
        return w

    def _requantized(self, handle, f: Path, entry: _Entry) -> dict[str, torch.Tensor]:
        """The group's stored tensors, merged and re-quantized one expert slice at a time."""
        pf, stored, slices = self._load(handle, f, entry.group)
        out = self.io.output(entry.group, stored)
        for e in slices:
            self.io.quantize_into(pf, entry.group, out, e, self._merged_slice(pf, entry, stored, e))
        return out

    def _dequantized(self, handle, f: Path, entry: _Entry) -> torch.Tensor:
        """The weight the group stands for, merged, in the export's dtype and the name's orientation (as
        WeightReader.read gives it), one expert slice at a time."""
        pf, stored, slices = self._load(handle, f, entry.group)
        plain = None
        for e in slices:
            w = self._merged_slice(pf, entry, stored, e)
            w = w.transpose(-1, -2) if entry.group.out_in else w
            if e is None:
                return w.to(self.dtype)
            if plain is None:
                plain = torch.empty(len(slices), *w.shape, dtype=self.dtype)  # [E, ...]: the output tensor
            plain[e] = w
        return plain


def _shard_name(ckpt: Checkpoint, f: Path) -> str:
    """The shard's file name as the base checkpoint spells it (relative to its directory)."""
    return f.relative_to(ckpt.path.resolve()).as_posix()


def _write_index(ckpt: Checkpoint, dst: Path, written: dict[Path, list[str]], total_size: int) -> None:
    """The base index with the weight_map of what was written and metadata.total_size updated."""
    index = json.loads((ckpt.path / INDEX_NAME).read_text())
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = total_size
    weight_map = {key: _shard_name(ckpt, f) for f, keys in written.items() for key in keys}
    index = {**index, "metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _write_plain_config(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """config.json of a plain `dtype` checkpoint: the quantization_config goes (the weights are plain now) and the
    declared dtype is `dtype`; every other key as the base has it."""
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw.pop("compression_config", None)
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in raw or key == "dtype":
            raw[key] = name
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer and other non-weight files (and folders); returns their names."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in _SKIP_NAMES or p.name.endswith(_SKIP_SUFFIXES):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, ignore=_COPYTREE_IGNORE)
        elif p.is_file():
            shutil.copy2(p, dst / p.name)
        else:
            continue
        copied.append(p.name)
    return copied


# -- paths ---------------------------------------------------------------------------------------------------------
def _is_within(a: Path, b: Path) -> bool:
    """a is b or inside b."""
    return a == b or b in a.parents


def _check_paths(model_dir: Path, adapter_dir: Path, output_dir: Path, overwrite: bool = False) -> None:
    """Refuse outputs that would overwrite, contain or sit inside the inputs, and non-empty folders that are not a
    previous export (another model's folder, say) unless `overwrite`."""
    if _is_within(output_dir, model_dir) or _is_within(model_dir, output_dir):
        raise CheckpointError(f"output directory '{output_dir}' must not be, contain or be inside the model directory "
                              f"'{model_dir}'; pass a new directory")
    if _is_within(adapter_dir, output_dir):
        raise CheckpointError(f"output directory '{output_dir}' would replace the adapter directory '{adapter_dir}'; "
                              "pass a new directory")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise CheckpointError(f"output path '{output_dir}' exists and is not a directory; pass a new directory")
        if not overwrite and any(output_dir.iterdir()) and not (output_dir / EXPORT_MARKER).is_file():
            raise CheckpointError(f"output directory '{output_dir}' is not empty and is not a previous export (no "
                                  f"{EXPORT_MARKER}); it would be replaced: pass a new or empty directory, or "
                                  "--overwrite to replace it")


EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def export_merged(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, output_dir: str | os.PathLike,
                  progress: bool = True, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Merge the adapter in `adapter_dir` into the checkpoint in `model_dir` and write it to `output_dir`.

    The output has the base checkpoint's shard file names, tensor names, dtypes and index, with config, generation
    config and tokenizer files copied; a quantized base (FP8 blocks, MXFP4, compressed-tensors) stays in its format,
    the weights the adapter touches re-quantized (:mod:`hybridmoe.requantize`). `dtype` ("bfloat16" / "float32"):
    a plain checkpoint instead, every float tensor in that dtype, quantized weights dequantized, their scales and
    the quantization_config gone. An existing `output_dir` (a previous export) is replaced atomically. Raises
    NonFiniteError for an adapter with NaN/Inf and AdapterError for an adapter that does not fit, before writing.
    """
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype '{dtype}' is not one of {', '.join(EXPORT_DTYPES)}")
    out_dtype = EXPORT_DTYPES[dtype] if dtype is not None else None
    model_path = Path(model_dir).expanduser().resolve()
    adapter_path = Path(adapter_dir).expanduser().resolve()
    out_path = Path(output_dir).expanduser().resolve()
    _check_paths(model_path, adapter_path, out_path, overwrite)
    ckpt = Checkpoint(model_path)
    fmt = checkpoint_format(ckpt.path)  # refuses every quantization hybridmoe does not read
    model = _meta_model(model_path)
    # The export copies tensors it does not merge, but a checkpoint whose format we do not understand is refused
    # here as everywhere: merging float LoRA deltas into an unknown format would write garbage.
    check_tensors(ckpt, model, {n for n, m in model.named_modules() if isinstance(m, HybridExperts)}, fmt)
    deltas = _read_deltas(adapter_path, model)
    mapper = KeyMapper(model.config.model_type, set(model.state_dict()))
    del model
    io = GroupIO(WeightReader(ckpt, fmt))
    plan = _plan(ckpt, mapper, deltas, io)

    def write(tmp: Path) -> None:
        total, written = 0, {}
        merger = _ShardMerger(ckpt, io, deltas, out_dtype)
        for f in tqdm(plan, desc="Merging shards", unit="shard", disable=not progress, file=sys.stderr):
            dst = tmp / _shard_name(ckpt, f)
            dst.parent.mkdir(parents=True, exist_ok=True)
            n, written[f] = merger.shard(f, plan[f], dst)
            total += n
        if (model_path / INDEX_NAME).is_file():
            _write_index(ckpt, tmp, written, total)
        _copy_side_files(model_path, tmp)
        if out_dtype is not None:
            _write_plain_config(model_path, tmp, out_dtype)
        (tmp / EXPORT_MARKER).write_text(json.dumps({
            "exported_by": "hybridmoe export", "model": str(model_path), "adapter": str(adapter_path),
            "format": dtype or (fmt.name if fmt is not None else "as the base")}, indent=2) + "\n")

    atomic_replace_dir(out_path, write)
    n_merged = sum(e.target is not None and (e.group is None or k == e.group.primary)
                   for keys in plan.values() for k, e in keys.items())
    how = f"as plain {dtype}" if dtype else (f"re-quantized as {fmt.name}" if fmt is not None else "in the base's dtypes")
    log.info("merged the adapter into %d weights (%s) in %d shard(s); wrote %s", n_merged, how, len(plan), out_path)
    return out_path
