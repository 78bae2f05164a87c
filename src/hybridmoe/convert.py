"""`hybridmoe convert`: a checkpoint with its routed experts quantized ahead of time, so each start skips it.

Reads any checkpoint hybridmoe loads (bf16/fp16/fp32, FP8 block-scaled, MXFP4, compressed-tensors) and writes a
standard safetensors checkpoint in the hub's per-expert key layout:

- routed experts in compressed-tensors form: int4 ``pack-quantized`` (``weight_packed`` int32 [out, in/8],
  ``weight_scale`` bf16 [out, in/G], ``weight_shape``; G = the group hybridmoe's int4 experts use) or int8
  ``int-quantized`` per output channel (``weight`` int8, ``weight_scale`` bf16 [out, 1]);
- everything else as stored when it is a plain float tensor, bf16 when it was quantized in the input (dequantized);
- config.json with a matching ``quantization_config`` (one config group whose ``re:`` target names the expert
  projections), and the tokenizer, generation config and other side files copied.

The expert slices are quantized one expert at a time by the functions the loader itself uses (``quantize_rows``, and
``quantize_int4`` for int4), from the very tensors the loader would quantize, and the loader reads them back as they
are (int4 of the same group is copied in, int8 dequantizes and re-quantizes to the same bits): loading the output
gives bit-identical expert weights to loading the input with the same ``expert_dtype``.

Streaming: input tensors are read one at a time with plain file reads (no memory map, whose pages would stay
resident), and each output tensor goes to disk as soon as it is made (:class:`_ShardWriter`), so host memory holds
about one tensor, whatever the shard sizes (measured: +0.54 GiB peak RSS converting a 3.1 GiB single-shard
V2-Lite-shaped checkpoint whose largest tensor is 0.4 GiB; ``benchmarks/convert_load.py``). The output is built in a
temporary sibling directory and renamed into place at the end; an interrupted run leaves nothing half-written under
the output's name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import INDEX_NAME, Checkpoint, KeyMapper, read_config
from .errors import CheckpointError, ConfigError
from .experts.cpu_experts import quantize_rows
from .experts.packed import quantize_int4
from .export import _copy_side_files, _is_within
from .formats import FLOAT_DTYPES, WeightReader, check_tensors, checkpoint_format
from .io import atomic_replace_dir
from .loading import _build_empty, _swap_experts, resolve_expert_dtype

log = logging.getLogger("hybridmoe")

EXPERT_DTYPES = ("int4", "int8")
DEFAULT_MAX_SHARD = 4 << 30  # bytes of tensors per output shard


@dataclass(frozen=True)
class Target:
    """What the routed experts become: int8 per output channel, or int4 in groups of `group` inputs."""

    kind: str  # "int4" | "int8"
    group: int | None = None

    def quantize(self, w: torch.Tensor, base: str) -> dict[str, torch.Tensor]:
        """One expert's [out, in] float matrix -> its compressed-tensors tensors under module name `base`."""
        if self.kind == "int8":
            q, scale = quantize_rows(w)  # the loader's int8: one bf16 scale per output row
            return {f"{base}.weight": q, f"{base}.weight_scale": scale.unsqueeze(-1)}
        codes, scales = quantize_int4(w, self.group)  # the loader's int4: codes uint8 [out, in/2]
        return self.packed(codes, scales, base)

    def packed(self, codes: torch.Tensor, scales: torch.Tensor, base: str) -> dict[str, torch.Tensor]:
        """int4 codes as pack-quantized: the same bytes viewed as little-endian int32, eight values per word."""
        out, half = codes.shape
        return {f"{base}.weight_packed": codes.contiguous().view(torch.int32),
                f"{base}.weight_scale": scales.to(torch.bfloat16).contiguous(),
                f"{base}.weight_shape": torch.tensor([out, 2 * half], dtype=torch.int64)}

    def quantization_config(self, targets: list[str]) -> dict:
        fmt = "pack-quantized" if self.kind == "int4" else "int-quantized"
        weights = {"num_bits": 4 if self.kind == "int4" else 8, "type": "int", "symmetric": True,
                   "strategy": "group" if self.kind == "int4" else "channel", "group_size": self.group,
                   "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}}
        return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": targets, "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": fmt}},
                "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def _target(kind: str, experts: dict) -> Target:
    """The loader's format for `kind`: the int4 group is the one each block gets at load (``_block_format``)."""
    if kind == "int8":
        return Target("int8")
    groups = {ex.weights.packed.group for ex in experts.values()}
    if len(groups) != 1:
        raise ConfigError(f"the experts blocks get different int4 groups {sorted(groups)} (their input dims differ); "
                          "convert writes one group size: use --expert-dtype int8")
    return Target("int4", groups.pop())


# safetensors dtype names (the format's own spelling) of what convert writes or reads
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_COPY_CHUNK = 8 << 20


class _ShardWriter:
    """Output shards written tensor by tensor: each tensor's bytes go straight to a spool file as they are made, so
    host memory never holds more than the tensor being written. When a shard reaches `max_bytes`, its safetensors
    header (now known) is written and the spooled bytes are copied behind it; the index comes at the end."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.spool = None  # the open spool file of the shard being filled
        self.header: dict[str, dict] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary name, keys)
        self.keys: set[str] = set()
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        if key in self.keys:
            raise CheckpointError(f"two checkpoint tensors would be written as '{key}'; the checkpoint holds a "
                                  "tensor twice (e.g. fused and per-expert)")
        n = t.numel() * t.element_size()
        if self.header and self.size + n > self.max_bytes:
            self.flush()
        if self.spool is None:
            self.spool = open(self.root / f"part-{len(self.files) + 1:05d}.spool", "wb")  # noqa: SIM115 - closed in flush
        self.spool.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)  # the tensor's bytes, no copy
        self.header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self.size,
                                                                                                    self.size + n]}
        self.keys.add(key)
        self.size += n

    def flush(self) -> None:
        if self.spool is None:
            return
        self.spool.close()
        spool = Path(self.spool.name)
        name = spool.with_suffix(".safetensors").name
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.root / name, "wb") as out, open(spool, "rb") as src:
            out.write(len(head).to_bytes(8, "little") + head)
            out.flush()
            _copy_file(src, out, self.size)
        spool.unlink()
        self.files.append((name, sorted(self.header)))
        self.total += self.size
        self.spool, self.header, self.size = None, {}, 0

    def finish(self) -> int:
        """Name the shards as transformers does and write the index (for more than one shard); returns the count."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.files, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.root / tmp, self.root / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return n


def _copy_file(src, dst, n: int) -> None:
    """Append `n` bytes of `src` to `dst` inside the kernel where it can (no user-space buffer), else in chunks."""
    offset = 0
    try:
        while offset < n:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, min(n - offset, _COPY_CHUNK))
            if sent == 0:
                break
            offset += sent
    except (AttributeError, OSError):
        src.seek(offset)
        dst.seek(0, os.SEEK_END)
        while chunk := src.read(_COPY_CHUNK):
            dst.write(chunk)
        return
    if offset != n:
        raise CheckpointError(f"the spooled output '{src.name}' is shorter than what was written to it; is the disk full?")


class _ShardReader:
    """One input shard read tensor by tensor with plain file reads instead of a memory map: a mapped shard's pages
    stay in the process's resident set once touched (a 5 GB shard read through counts 5 GB), a read tensor is freed
    when it is done. The ``get_tensor``/``keys`` of a safetensors handle, for :class:`WeightReader`."""

    def __init__(self, f: Path):
        self.f = f
        try:
            self.fh = open(f, "rb")  # noqa: SIM115 - closed by close()
            n = int.from_bytes(self.fh.read(8), "little")
            header = json.loads(self.fh.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"'{f}' is not a readable safetensors file ({e}); it is truncated or corrupt, copy "
                                  "it again") from None
        header.pop("__metadata__", None)
        self.header, self.data_start = header, 8 + n

    def keys(self):
        return self.header.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        meta = self.header[key]
        start, end = meta["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self.fh.seek(self.data_start + start)
        if self.fh.readinto(buf.numpy().data) != end - start:
            raise CheckpointError(f"'{self.f}' ends inside tensor '{key}'; the file is truncated, copy it again")
        dtype = _TORCH_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor '{key}' in '{self.f.name}' has dtype {meta['dtype']}, which convert "
                                  "does not read")
        return buf.view(dtype).reshape(meta["shape"])

    def close(self) -> None:
        self.fh.close()


def _per_expert_names(model_type: str) -> dict[tuple[str, int], str]:
    """{(fused projection, chunk): per-expert suffix} from transformers' conversion table, e.g. ("gate_up_proj", 1)
    -> ".up_proj.weight": how the hub names one expert's slice of a fused tensor."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out = {}
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        if type(rule).__name__ != "WeightConverter" or len(rule.target_patterns) != 1:
            continue
        target = rule.target_patterns[0].rsplit(".", 1)[-1]
        for chunk, src in enumerate(rule.source_patterns):
            if "*" in src:
                out[(target, chunk)] = src.replace("\\.", ".").partition("*")[2]
    return out


class _Converter:
    def __init__(self, ckpt: Checkpoint, fmt, model, experts: dict, target: Target):
        self.ckpt, self.target = ckpt, target
        self.writer: _ShardWriter | None = None  # set when the output directory exists
        self.reader = WeightReader(ckpt, fmt)
        self.mapper = KeyMapper(model.config.model_type, model.state_dict())
        self.experts = experts
        self.model_type = model.config.model_type
        self.split = _per_expert_names(self.model_type)
        self._dtypes: dict[Path, dict[str, str]] = {}
        self.modules: set[str] = set()  # per-expert Linear names written quantized (for the config's target)

    def check_layout(self, key: str) -> None:
        """Before anything is written: a fused expert tensor must have a per-expert layout to be written in."""
        sl = self.mapper.expert_slice(self.mapper.rename(self.reader.logical(key)))
        if sl is None or sl.module not in self.experts or sl.expert is not None:
            return
        proj = sl.proj[: -len("_bias")] if sl.proj.endswith("_bias") else sl.proj
        chunks = [self.split.get((proj, c)) for c in range(2 if proj == "gate_up_proj" else 1)]
        if None in chunks or self.experts[sl.module].spec.interleaved:
            raise CheckpointError(
                f"the routed experts of '{sl.module}' are stored fused ('{key}' [E, ...]) and transformers has no "
                f"per-expert layout for model_type '{self.model_type}' that compressed-tensors could describe; "
                "convert writes per-expert Linear weights only (load this checkpoint directly instead)")

    def tensor(self, handle, f: Path, key: str) -> None:
        logical = self.reader.logical(key)
        sl = self.mapper.expert_slice(self.mapper.rename(logical))
        if sl is None or sl.module not in self.experts:
            t = self.reader.read(handle, f, key)
            if self._stored(f)[key] not in FLOAT_DTYPES and t.is_floating_point():
                t = t.to(torch.bfloat16)  # quantized in the input (FP8, int4, int8), dequantized as read
            self.writer.add(logical, t)  # plain float tensors (and integer buffers) as stored
            return
        spec = self.experts[sl.module].spec
        if sl.proj.endswith("_bias"):
            t = self.reader.read(handle, f, key)
            if sl.expert is None:
                self._split_fused(sl, t, bias=True)
            else:
                self.writer.add(logical, t)
            return
        if not logical.endswith(".weight") and sl.expert is not None:
            raise CheckpointError(f"tensor '{key}' in '{f.name}' is one expert's weight whose name does not end in "
                                  "'.weight'; convert writes per-expert Linear weights only")
        fmt = self.experts[sl.module].weights.packed
        if fmt is not None and sl.expert is not None and self.reader.packed_format(key) == fmt:
            # what the loader copies in as stored (``loading._as_shipped``) is copied out as stored
            codes, scales = self.reader.read_packed(handle, f, key)
            self._add(logical[: -len(".weight")], self.target.packed(codes, scales, logical[: -len(".weight")]))
            return
        t = self.reader.read(handle, f, key)
        if spec.transposed:
            t = t.transpose(-1, -2)  # [.., out, in], as the loader stores it
        if sl.expert is None:
            self._split_fused(sl, t, bias=False)
        else:
            self._add(logical[: -len(".weight")], self.target.quantize(t, logical[: -len(".weight")]))

    def _stored(self, f: Path) -> dict[str, str]:
        if f not in self._dtypes:
            self._dtypes = {f: self.ckpt.dtypes(f)}  # the open shard's header only
        return self._dtypes[f]

    def _add(self, base: str, tensors: dict[str, torch.Tensor]) -> None:
        self.modules.add(base)
        for k, v in tensors.items():
            self.writer.add(k, v)

    def _split_fused(self, sl, t: torch.Tensor, bias: bool) -> None:
        """A fused [E, out, (in)] tensor as per-expert hub tensors, one expert at a time (gate rows, then up rows)."""
        proj = sl.proj[: -len("_bias")] if bias else sl.proj
        chunks = [self.split[(proj, c)] for c in range(2 if proj == "gate_up_proj" else 1)]  # checked up front
        rows = t.shape[1] // len(chunks)
        for e in range(t.shape[0]):
            for c, suffix in enumerate(chunks):
                part = t[e, c * rows:(c + 1) * rows]  # [rows, in] (bias: [rows])
                name = f"{sl.module}.{e}{suffix}"  # e.g. model.layers.1.mlp.experts.3.up_proj.weight
                if bias:
                    self.writer.add(name[: -len("weight")] + "bias", part.clone())
                else:
                    self._add(name[: -len(".weight")], self.target.quantize(part, name[: -len(".weight")]))

    def targets(self) -> list[str]:
        """One ``re:`` target naming every expert projection written, as compressed-tensors matches module names."""
        parents = sorted({re.escape(".".join(m.rsplit(".", 2)[0].split(".")[-2:])) for m in self.modules})
        leaves = sorted({re.escape(m.rsplit(".", 1)[1]) for m in self.modules})
        return [rf"re:.*({'|'.join(parents)})\.[0-9]+\.({'|'.join(leaves)})$"]


def _check_paths(model_dir: Path, output_dir: Path, overwrite: bool) -> None:
    if _is_within(output_dir, model_dir) or _is_within(model_dir, output_dir):
        raise CheckpointError(f"output directory '{output_dir}' must not be, contain or be inside the model directory "
                              f"'{model_dir}'; pass a new directory")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise CheckpointError(f"output path '{output_dir}' exists and is not a directory; pass a new directory")
        if any(output_dir.iterdir()) and not overwrite:
            raise CheckpointError(f"output directory '{output_dir}' is not empty; pass a new or empty directory, or "
                                  "--overwrite to replace it")


def convert_checkpoint(model_dir: str | os.PathLike, output_dir: str | os.PathLike, expert_dtype: str,
                       overwrite: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD, progress: bool = True,
                       trust_remote_code: bool = False) -> Path:
    """Write `model_dir` with its routed experts as compressed-tensors `expert_dtype` ("int4"/"int8") to
    `output_dir` (see the module docstring). Every input problem is raised before anything is written."""
    if max_shard_size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {max_shard_size} bytes")
    model_path = Path(model_dir).expanduser().resolve()
    out_path = Path(output_dir).expanduser().resolve()
    ckpt = Checkpoint(model_path)
    _check_paths(model_path, out_path, overwrite)
    fmt = checkpoint_format(ckpt.path)
    config = read_config(model_path, trust_remote_code=trust_remote_code)
    if fmt is not None:
        del config.quantization_config
    if expert_dtype not in EXPERT_DTYPES:
        raise ConfigError(f"expert dtype '{expert_dtype}' is not one convert writes; use int4 or int8")
    model = _build_empty(config, torch.bfloat16)
    # The experts blocks as the loader makes them for this expert dtype (int4: each block's group), on the meta
    # device: specs, names and formats only, no expert memory.
    experts = _swap_experts(model, resolve_expert_dtype(expert_dtype, torch.device("cpu")), device="meta")
    target = _target(expert_dtype, experts)
    ignored = set(check_tensors(ckpt, model, set(experts), fmt))  # the whole input, before a byte is written

    conv = _Converter(ckpt, fmt, model, experts, target)
    for key in ckpt.key_to_file:
        conv.check_layout(key)

    def write(tmp: Path) -> None:
        writer = conv.writer = _ShardWriter(tmp, max_shard_size)
        with tqdm(total=len(ckpt.key_to_file), desc="Converting", unit="tensor", disable=not progress,
                  file=sys.stderr) as bar:
            for f, keys in ckpt.keys_by_file().items():  # one input shard open at a time
                ckpt.open(f)  # checks the shard holds what the index lists
                handle = _ShardReader(f)
                for key in sorted(keys):
                    if not conv.reader.consumed(key) and key not in ignored:
                        conv.tensor(handle, f, key)
                    bar.update(1)
                handle.close()
        n = writer.finish()
        _copy_side_files(model_path, tmp)
        raw = json.loads((model_path / "config.json").read_text())
        raw.pop("compression_config", None)
        raw["quantization_config"] = target.quantization_config(conv.targets())
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        log.info("wrote %d shard(s): %d expert matrices as %s%s; %d tensor(s) the model does not use left out",
                 n, len(conv.modules), target.kind, f" (group {target.group})" if target.group else "", len(ignored))

    atomic_replace_dir(out_path, write)
    return out_path
