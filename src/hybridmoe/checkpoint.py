"""Reading a transformers-format checkpoint directory: config, safetensors shards, key conversion.

Only safetensors are read (no pickle). Every failure a user can cause is a :class:`CheckpointError` naming the file.
Keys are converted to the transformers-v5 module tree with transformers' own conversion table
(``transformers.conversion_mapping``): plain renames (Mixtral's ``block_sparse_moe`` -> ``mlp``) and the per-expert
hub layout ``experts.{e}.gate_proj/up_proj/down_proj.weight`` (or ``w1/w3/w2``) stacked into the fused
``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class ExpertSlice:
    """Where a per-expert or fused checkpoint tensor lands in a layer's fused expert weights."""

    module: str  # e.g. "model.layers.1.mlp.experts"
    proj: str  # "gate_up_proj" | "up_proj" | "down_proj", + "_bias" for the experts' biases
    expert: int | None  # None: the whole fused [E, ...] tensor
    chunk: int  # which row-chunk of the expert's matrix (gate=0, up=1 for gate_up_proj)
    num_chunks: int


@dataclass(frozen=True)
class ConcatPart:
    """A checkpoint tensor that is one part of a model tensor transformers builds by concatenating several
    (Kimi-Linear's ``q_conv1d/k_conv1d/v_conv1d.weight`` -> ``conv1d.weight`` along dim 0)."""

    target: str  # the model tensor, e.g. "model.layers.0.self_attn.conv1d.weight"
    index: int  # position of this part in the concatenation
    count: int
    dim: int


def _literal_dots(pattern: str) -> str:
    """Escape the dots of a conversion-table pattern that are meant as dots (all but `.*`, `.+`, `.?`, `.{`).

    transformers compiles the patterns as regexes and only ever meets hub-layout keys. We also map keys that are
    already in the v5 layout (a v5 save, an adapter), where an unescaped dot matching any character renames twice:
    Laguna's `mlp.shared_expert.` matches `mlp.shared_experts` and makes `shared_experts..down_proj`."""
    return re.sub(r"(?<!\\)\.(?![*+?{])", r"\\.", pattern)


class KeyMapper:
    """Maps checkpoint keys to model names using transformers' conversion table for the model type."""

    def __init__(self, model_type: str, expected=None):
        """expected: the model's tensor names, when known. As in transformers' loader, a key that a rename would
        take away from a name the model has keeps its own name (DeepSeek-V4's ``\\.norm\\.`` -> ``.kv_norm.`` rename
        must not touch ``model.norm.weight``)."""
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        self.expected = expected

        self.renames: list[tuple[re.Pattern, str]] = []
        self.experts: list[tuple[re.Pattern, str, int, int]] = []  # (pattern, target proj, chunk, num_chunks)
        self.concats: list[tuple[re.Pattern, str, int, int, int]] = []  # (pattern, target, index, count, dim)
        for rule in get_checkpoint_conversion_mapping(model_type) or []:
            kind = type(rule).__name__
            if kind == "WeightRenaming":
                for src, tgt in zip(rule.source_patterns, rule.target_patterns):
                    self.renames.append((re.compile(_literal_dots(src)), tgt))
            elif kind == "WeightConverter" and not any("*" in src for src in rule.source_patterns):
                # Several whole tensors (no per-expert `*`) concatenated into one; other operations are not
                # mapped, so their tensors are refused by name (formats.check_tensors), never loaded wrongly.
                ops = [type(op).__name__ for op in rule.operations]
                if ops == ["Concatenate"] and len(rule.target_patterns) == 1:
                    for i, src in enumerate(rule.source_patterns):
                        self.concats.append((re.compile(_literal_dots(src)), rule.target_patterns[0], i, len(rule.source_patterns),
                                             rule.operations[0].dim))
            elif kind == "WeightConverter" and len(rule.target_patterns) == 1:
                target = rule.target_patterns[0].rsplit(".", 1)[-1]
                for chunk, src in enumerate(rule.source_patterns):
                    # ".experts.*.w1.weight" -> r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.w1\.weight$". Some tables
                    # write their dots regex-escaped (Kimi-Linear's r"\.experts.*.w1.weight"): unescape them first.
                    head, _, tail = src.replace("\\.", ".").partition("*")
                    pat = rf"^(?P<mod>.*{re.escape(head.rstrip('.'))})\.(?P<e>\d+){re.escape(tail)}$"
                    self.experts.append((re.compile(pat), target, chunk, len(rule.source_patterns)))
        # Fused v5 names need no rule but are expert tensors all the same.
        self.fused = re.compile(r"^(?P<mod>.*\.experts)\.(?P<proj>(gate_up_proj|up_proj|down_proj)(_bias)?)$")

    def rename(self, key: str) -> str:
        renamed = key
        for pat, tgt in self.renames:
            renamed = pat.sub(tgt, renamed)
        if self.expected is not None and renamed not in self.expected and key in self.expected:
            return key
        return renamed

    def concat_part(self, key: str) -> ConcatPart | None:
        """The model tensor this (renamed) key is one concatenated part of, if any."""
        for pat, tgt, index, count, dim in self.concats:
            target, n = pat.subn(tgt, key, count=1)
            if n:
                return ConcatPart(target, index, count, dim)
        return None

    def expert_slice(self, key: str) -> ExpertSlice | None:
        m = self.fused.match(key)
        if m:
            return ExpertSlice(m["mod"], m["proj"], None, 0, 1)
        for pat, proj, chunk, n in self.experts:
            m = pat.match(key)
            if m:
                return ExpertSlice(m["mod"], proj, int(m["e"]), chunk, n)
        return None


def _check_dir(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        try:
            os.stat(p)
        except OSError as e:  # exists() is False for any error: a symlink loop or no permission is not "missing"
            if e.errno not in (None, errno.ENOENT):
                raise CheckpointError(f"model directory '{p}' cannot be opened: {os.strerror(e.errno)}; pass a "
                                      "directory holding config.json and *.safetensors") from None
        raise CheckpointError(f"model directory '{p}' does not exist; pass a directory holding config.json and *.safetensors")
    if not p.is_dir():
        raise CheckpointError(f"model path '{p}' is not a directory; pass a directory holding config.json and *.safetensors")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"'{p}' has no config.json; pass a transformers checkpoint directory")
    return p


class Checkpoint:
    """A checkpoint directory: its safetensors files and which file holds each key."""

    def __init__(self, path: str | os.PathLike):
        self.path = _check_dir(path)
        self.key_to_file: dict[str, Path] = {}
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"'{index}' is not a valid safetensors index ({e}); re-save the checkpoint") from None
            for key, fname in weight_map.items():
                # Containment is checked on the normalised path, not the resolved one: a hub cache snapshot keeps
                # its shards as symlinks into ../../blobs, which is fine; a "../x" entry in the index is not.
                f = Path(os.path.normpath(self.path / fname))
                if Path(os.path.normpath(self.path)) not in f.parents:
                    raise CheckpointError(f"'{index}' points outside the checkpoint directory ({fname}); refusing to read it")
                self.key_to_file[key] = f
            for f in sorted(set(self.key_to_file.values())):
                if not f.is_file():
                    raise CheckpointError(f"shard '{f.name}' listed in '{index}' is missing; download or copy it again")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"'{self.path}' has no *.safetensors weights (and no {INDEX_NAME}); hybridmoe reads safetensors only"
                )
            for f in files:
                for key in self._open(f).keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    self.key_to_file[key] = f

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.key_to_file.values()))

    def keys_by_file(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for k, f in self.key_to_file.items():
            out.setdefault(f, []).append(k)
        return out

    @staticmethod
    def _open(f: Path):
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"'{f}' is not a readable safetensors file ({str(e).splitlines()[0]}); it is truncated or corrupt, copy it again"
            ) from None
        return handle

    def dtypes(self, f: Path) -> dict[str, str]:
        """{key: safetensors dtype name ("BF16", "F8_E4M3", "I32", ...)} of one shard, from its header alone."""
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > 1 << 30:
                    raise ValueError(f"header length {n}")
                header = json.loads(fh.read(n))
            return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(
                f"'{f}' is not a readable safetensors file ({e}); it is truncated or corrupt, copy it again"
            ) from None

    def open(self, f: Path):
        """Open one shard; the handle memory-maps the file, so reading a tensor reads only its bytes."""
        handle = self._open(f)
        expected = {k for k, v in self.key_to_file.items() if v == f}
        missing = expected - set(handle.keys())
        if missing:
            raise CheckpointError(f"'{f.name}' lacks {len(missing)} tensor(s) its index lists, e.g. '{sorted(missing)[0]}'")
        return handle


def read_tensor(handle, f: Path, key: str):
    """Read one tensor from an open shard, turning a short/corrupt file into a one-line error."""
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read tensor '{key}' from '{f}' ({str(e).splitlines()[0]}); the file is corrupt") from None


def read_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The model's transformers config, with a clear error for a broken or unknown config.json."""
    from transformers import AutoConfig

    p = _check_dir(path)
    try:
        return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        hint = "" if trust_remote_code or "custom code" not in str(e) else (
            " (its code was not run: set trust_remote_code: true only for a checkpoint you trust)")
        raise CheckpointError(f"cannot read '{p / 'config.json'}': {str(e).splitlines()[0]}{hint}") from None
