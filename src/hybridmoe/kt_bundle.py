"""KTransformers adapter bundles: read, validate, map onto hybridmoe's expert LoRA, and write.

KTransformers (kt-kernel ``python/sft/artifacts.py`` and ``lora.py``; LLaMA-Factory with ``use_kt``) saves LoRA of a
fused-experts model as a *bundle* in one directory:

- a standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for attention, dense MLPs and
  shared experts;
- ``fused_expert_lora.safetensors``: per MoE layer L the six tensors ``layers.{L}.experts.{name}``::

      gate_lora_a [E, r, H]   gate_lora_b [E, I, r]
      up_lora_a   [E, r, H]   up_lora_b   [E, I, r]
      down_lora_a [E, r, I]   down_lora_b [E, H, r]

  in bf16 (kt-kernel's LoRA buffers are bf16 and its loader refuses any other dtype);
- ``kt_adapter_manifest.json``: ``version`` 1, ``status: "ready"``, ``lora: {rank, alpha}`` and for every file a
  ``size`` and ``sha256`` record (the fused file also a ``tensors`` record: key -> shape and dtype). kt-kernel
  deletes the manifest before it rewrites a bundle and writes it last, so a bundle without it is a partial save.

KT's math (kt-kernel ``operators/amx/sft_moe.hpp``; ``lora_scaling = lora_alpha / lora_rank``, one rank and one
alpha for the whole bundle): for a token x routed to expert e,
    gate = x W_gate[e]^T + s · (x gate_a[e]^T) gate_b[e]^T     (before the activation)
    up   = x W_up[e]^T   + s · (x up_a[e]^T) up_b[e]^T
    out  = h W_down[e]^T + s · (h down_a[e]^T) down_b[e]^T,    h = act(gate) · up,   s = alpha / r.

hybridmoe's ``gate_up_proj`` LoRA has ONE A for the fused [gate; up] rows, so gate and up, which have separate A's,
become one LoRA of rank 2r with A = [gate_a; up_a] and block-diagonal B = [[gate_b, 0], [0, up_b]], and alpha 2·alpha
so the scale is still alpha / r: then B @ A = [gate_b @ gate_a; up_b @ up_a], the same ΔW exactly. ``down`` maps as is.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterError

MANIFEST = "kt_adapter_manifest.json"
FUSED_FILE = "fused_expert_lora.safetensors"
MANIFEST_VERSION = 1
KT_NAMES = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
KT_KEY = re.compile(r"^layers\.(?P<layer>\d+)\.experts\.(?P<name>[a-z_]+)$")
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


@dataclass(frozen=True)
class KTBundle:
    """A validated bundle's routed-expert part."""

    rank: int  # r, one for every layer and projection
    alpha: float  # scale = alpha / r
    layers: list[int]  # MoE layers with routed-expert LoRA
    manifest: dict
    tensors: dict[str, torch.Tensor]  # "layers.{L}.experts.{name}" -> tensor as stored (bf16); {} until read


def layer_of(module_name: str) -> int | None:
    """The decoder layer a module belongs to (``…layers.{L}.…``): KT names routed experts by that index alone."""
    hit = re.search(r"(?:^|\.)layers\.(\d+)\.", module_name)
    return int(hit[1]) if hit else None


def is_kt_bundle(adapter_dir: str | Path) -> bool:
    """True when the directory holds any part of a KT bundle (a partial one too: it must not pass as plain PEFT)."""
    d = Path(adapter_dir)
    return (d / MANIFEST).exists() or (d / FUSED_FILE).exists()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- reading and validating --------------------------------------------------------------------------------------
def read_manifest(adapter_dir: Path) -> dict:
    """The manifest, with its version and status checked; one line naming the file for anything wrong."""
    path = adapter_dir / MANIFEST
    if not path.is_file():
        raise AdapterError(f"'{adapter_dir}' has {FUSED_FILE} but no {MANIFEST}: a partial KTransformers bundle (its "
                           "save did not finish, or the manifest was not copied); copy the whole adapter directory "
                           "again or re-save it with KTransformers")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"'{path}' is not valid JSON ({e}); copy the KTransformers adapter again") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise AdapterError(f"'{path}' has version {manifest.get('version')!r}; hybridmoe reads KTransformers adapter "
                           f"manifests of version {MANIFEST_VERSION}")
    if manifest.get("status") != "ready":
        raise AdapterError(f"'{path}' says status {manifest.get('status')!r}, not 'ready': KTransformers had not "
                           "finished saving this adapter; use a checkpoint whose save completed")
    lora = manifest.get("lora")
    if (not isinstance(lora, dict) or isinstance(lora.get("rank"), bool) or not isinstance(lora.get("rank"), int)
            or lora["rank"] <= 0 or not isinstance(lora.get("alpha"), (int, float)) or lora["alpha"] <= 0):
        raise AdapterError(f"'{path}' has no valid 'lora': {{'rank': int, 'alpha': number}} record; the manifest is "
                           "damaged, re-save the adapter with KTransformers")
    artifacts = manifest.get("artifacts")
    # the three files hybridmoe reads must all be covered by the hashes (kt-kernel also allows adapter_model.bin as
    # the PEFT part; hybridmoe does not read pickle, and read_adapter says so)
    listed = ("adapter_config.json", "adapter_model.safetensors", FUSED_FILE)
    if not isinstance(artifacts, dict) or not all(n in artifacts for n in listed):
        raise AdapterError(f"'{path}' does not list {', '.join(listed)} in 'artifacts'; the manifest is damaged or the "
                           "PEFT part is not safetensors: re-save the adapter with KTransformers")
    return manifest


def _check_artifacts(adapter_dir: Path, manifest: dict) -> None:
    """Every listed file exists with the recorded size and sha256 (a tampered or truncated file is named)."""
    for name, record in manifest["artifacts"].items():
        if name != Path(name).name or not isinstance(record, dict):
            raise AdapterError(f"'{adapter_dir / MANIFEST}' has an invalid artifact record {name!r}")
        f = adapter_dir / name
        if not f.is_file():
            raise AdapterError(f"'{f}' is listed in {MANIFEST} but missing: a partial KTransformers bundle; copy the "
                               "whole adapter directory again")
        if record.get("size") != f.stat().st_size or record.get("sha256") != sha256_file(f):
            raise AdapterError(f"'{f}' does not match its size/sha256 in {MANIFEST}: the file was changed or "
                               "truncated after KTransformers saved it (or another adapter was saved over this "
                               "directory); copy the original bundle again")


def _header(path: Path) -> dict[str, tuple[list[int], str]]:
    """{key: (shape, dtype)} from the safetensors header, without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"'{path}' is not a readable safetensors file ({' '.join(str(e).split())}); it is "
                           "truncated or corrupt") from None


def _check_fused_layout(path: Path, header: dict[str, tuple[list[int], str]], rank: int) -> None:
    """Six tensors per layer with consistent [E, r, H] / [E, I, r] / [E, r, I] / [E, H, r] shapes and rank r."""
    layers: dict[int, dict[str, list[int]]] = {}
    for key, (shape, _) in header.items():
        m = KT_KEY.match(key)
        if not m or m["name"] not in KT_NAMES or len(shape) != 3:
            raise AdapterError(f"'{path}' holds '{key}' {shape}, which is not a KTransformers fused expert LoRA tensor "
                               f"(layers.{{L}}.experts.{{{'|'.join(KT_NAMES)}}}, 3-D)")
        layers.setdefault(int(m["layer"]), {})[m["name"]] = shape
    if not layers:
        raise AdapterError(f"'{path}' holds no tensors")
    for layer, t in sorted(layers.items()):
        missing = [n for n in KT_NAMES if n not in t]
        if missing:
            raise AdapterError(f"'{path}' lacks layers.{layer}.experts.{missing[0]}: a partial KTransformers bundle")
        e, r, h = t["gate_lora_a"]
        i = t["gate_lora_b"][1]
        want = {"gate_lora_a": [e, r, h], "gate_lora_b": [e, i, r], "up_lora_a": [e, r, h], "up_lora_b": [e, i, r],
                "down_lora_a": [e, r, i], "down_lora_b": [e, h, r]}
        for n in KT_NAMES:
            if t[n] != want[n]:
                raise AdapterError(f"'{path}': layers.{layer}.experts.{n} has shape {t[n]}, but the layer's other "
                                   f"tensors give {want[n]} (E={e}, r={r}, H={h}, I={i})")
        if r != rank:
            raise AdapterError(f"'{path}': layer {layer} has LoRA rank {r}, but {MANIFEST} says rank {rank}")


def read_kt_bundle(adapter_dir: str | Path, cfg: dict) -> KTBundle:
    """Validate a bundle (see :func:`validate_bundle`) and read its fused expert LoRA."""
    from dataclasses import replace

    from safetensors.torch import load_file

    b = validate_bundle(adapter_dir, cfg)
    return replace(b, tensors=load_file(str(Path(adapter_dir) / FUSED_FILE)))


def validate_bundle(adapter_dir: str | Path, cfg: dict) -> KTBundle:
    """Check a bundle without reading tensor data: manifest version/status, every file's size and sha256, the fused
    file's tensor records and shapes, and rank/alpha against adapter_config.json (``cfg``)."""
    d = Path(adapter_dir)
    manifest = read_manifest(d)
    _check_artifacts(d, manifest)
    fused = d / FUSED_FILE
    header = _header(fused)
    record = manifest["artifacts"][FUSED_FILE].get("tensors")
    if isinstance(record, dict):  # kt-kernel always writes it; compare key by key for a message that names one
        for key in sorted(set(record) | set(header)):
            want = record.get(key)
            got = header.get(key)
            if not isinstance(want, dict) or got is None or [list(want.get("shape", [])), want.get("dtype")] != list(got):
                raise AdapterError(f"'{fused}': tensor '{key}' is {got} in the file but {want} in {MANIFEST}")
    rank, alpha = int(manifest["lora"]["rank"]), float(manifest["lora"]["alpha"])
    _check_fused_layout(fused, header, rank)
    cfg_r = cfg.get("r")
    if cfg_r is not None and int(cfg_r) != rank:
        raise AdapterError(f"'{d / 'adapter_config.json'}' says r={cfg_r}, but {FUSED_FILE} and {MANIFEST} have rank "
                           f"{rank}; the files come from different runs: copy the whole bundle of one run")
    cfg_alpha = cfg.get("lora_alpha")
    if cfg_alpha is not None and float(cfg_alpha) != alpha:
        raise AdapterError(f"'{d / 'adapter_config.json'}' says lora_alpha={cfg_alpha}, but {MANIFEST} has alpha "
                           f"{alpha}; the files come from different runs: copy the whole bundle of one run")
    layers = sorted({int(KT_KEY.match(k)["layer"]) for k in header})
    return KTBundle(rank, alpha, layers, manifest, {})


# -- the math (see the module docstring) --------------------------------------------------------------------------
def kt_to_gate_up(gate_a, gate_b, up_a, up_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate gate/up LoRA (rank r each) -> one fused gate_up LoRA of rank 2r: A [E, 2r, H], B [E, 2I, 2r] with
    gate rows first and zero off-diagonal blocks. Use alpha 2·alpha with it (same scale alpha / r)."""
    e, r, _ = gate_a.shape
    i = gate_b.shape[1]
    a = torch.cat([gate_a, up_a], dim=1)  # [E, 2r, H]
    b = gate_b.new_zeros(e, 2 * i, 2 * r)  # [E, 2I, 2r]
    b[:, :i, :r] = gate_b
    b[:, i:, r:] = up_b
    return a, b


def write_kt_bundle(out: Path, fused: dict[str, torch.Tensor], rank: int, alpha: float, base_model: str | None,
                    expert_weight_format: str = "bf16") -> None:
    """Write ``fused_expert_lora.safetensors`` and then the manifest over the files already in ``out`` (the PEFT part
    must be there), as kt-kernel's ``save_kt_adapter_artifacts`` does: the manifest last, so it marks a whole bundle."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sorted(fused.items())}, str(out / FUSED_FILE))
    artifacts = {}
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            artifacts[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    artifacts[FUSED_FILE].update({
        "tensor_count": len(fused),
        "tensors": {k: {"shape": list(v.shape), "dtype": _DTYPE_NAMES[v.dtype]} for k, v in sorted(fused.items())},
    })
    manifest = {"version": MANIFEST_VERSION, "status": "ready", "expert_weight_format": expert_weight_format,
                "base": {"model_name_or_path": base_model}, "lora": {"rank": rank, "alpha": float(alpha)},
                "artifacts": artifacts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
