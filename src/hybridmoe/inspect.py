"""`hybridmoe inspect`: adapter health by component, without loading a model.

The seed system's chat died in ``torch.multinomial`` because 534 adapter tensors were NaN (attention, shared
experts and the dense MLP; routed experts fine). This module finds that in seconds: it reads
``adapter_model.safetensors`` one tensor at a time, sorts each tensor into a component by name
(:func:`hybridmoe.components.component_of`) and counts NaN/Inf tensors and finite-value statistics per component.

Report shape (also the ``--json`` output)::

    {"components": {name: {"tensors", "params", "nan_tensors", "inf_tensors", "min", "max", "mean_abs", "norm"}},
     "nonfinite": [tensor names], "ok": bool}

A KTransformers bundle (:mod:`hybridmoe.kt_bundle`) is checked first (manifest, hashes, tensor records), its
``fused_expert_lora.safetensors`` tensors are counted under ``routed_experts``, and the report gains
``"kt_bundle": {"file", "rank", "alpha", "layers", "expert_weight_format"}``.

All six components are always present. Statistics are over finite values only, as floats, and ``None`` when a
component has no tensors (or no finite values).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hybridmoe import kt_bundle
from hybridmoe.components import COMPONENTS, component_of
from hybridmoe.errors import AdapterError

ADAPTER_FILE = "adapter_model.safetensors"
_CHUNK = 1 << 22  # elements per float64 pass: bounds the temporary copy at 32 MiB even for an adapted lm_head
_LIST_LIMIT = 20  # non-finite tensor names shown by the table


@dataclass
class _ComponentStats:
    """Running counts and finite-value statistics of one component."""

    tensors: int = 0
    params: int = 0
    nan_tensors: int = 0
    inf_tensors: int = 0
    finite: int = 0
    min: float = math.inf
    max: float = -math.inf
    sum_abs: float = 0.0
    sum_sq: float = 0.0

    def add(self, tensor: torch.Tensor) -> bool:
        """Account one tensor; return True when it holds any NaN or Inf."""
        self.tensors += 1
        self.params += tensor.numel()
        has_nan = has_inf = False
        for chunk in tensor.reshape(-1).split(_CHUNK):
            # float64: sums of squares of large bf16/fp32 values must not overflow into a fake Inf.
            values = chunk.to(torch.float64)
            has_nan = has_nan or bool(torch.isnan(values).any())
            has_inf = has_inf or bool(torch.isinf(values).any())
            self._add_finite(values[torch.isfinite(values)])
        self.nan_tensors += has_nan
        self.inf_tensors += has_inf
        return has_nan or has_inf

    def _add_finite(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        self.finite += values.numel()
        self.min = min(self.min, values.min().item())
        self.max = max(self.max, values.max().item())
        self.sum_abs += values.abs().sum().item()
        self.sum_sq += values.square().sum().item()

    def as_dict(self) -> dict:
        """The JSON form: counts, and stats that are None when there is no finite value to describe."""
        seen = self.finite > 0
        return {
            "tensors": self.tensors,
            "params": self.params,
            "nan_tensors": self.nan_tensors,
            "inf_tensors": self.inf_tensors,
            "min": float(self.min) if seen else None,
            "max": float(self.max) if seen else None,
            "mean_abs": self.sum_abs / self.finite if seen else None,
            "norm": math.sqrt(self.sum_sq) if seen else None,
        }


def _adapter_file(adapter_dir: str | Path) -> Path:
    """Resolve ``adapter_dir`` to its ``adapter_model.safetensors`` (a path to a .safetensors file is taken as is)."""
    path = Path(adapter_dir)
    if not path.exists():
        raise AdapterError(f"adapter directory not found: {path}; pass the directory that holds {ADAPTER_FILE} "
                           f"(a training run's output_dir)")
    if path.is_file():
        if path.suffix == ".safetensors":
            return path
        raise AdapterError(f"{path} is a file, not an adapter directory; pass the directory that holds {ADAPTER_FILE}")
    file = path / ADAPTER_FILE
    if not file.is_file():
        raise AdapterError(_missing_file_message(path))
    return file


def _missing_file_message(path: Path) -> str:
    """One line saying why ``path`` has no adapter file and what to pass instead."""
    if (path / "adapter_model.bin").is_file():
        return (f"{path} has adapter_model.bin but no {ADAPTER_FILE}; re-save the adapter with "
                f"save_pretrained(..., safe_serialization=True)")
    checkpoints = sorted(p.name for p in path.glob("checkpoint-*") if (p / ADAPTER_FILE).is_file())
    hint = f" (found {', '.join(checkpoints)}: pass one of those)" if checkpoints else ""
    return f"no {ADAPTER_FILE} in {path}; pass the directory a training run wrote its adapter to{hint}"


def _tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, so peak memory is one tensor, not the adapter."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is not a dict; keys() is its API
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())  # safetensors messages may span lines; ours is one line
        raise AdapterError(f"cannot read {file}: {reason}; the file is truncated or not safetensors, "
                           f"copy or save the adapter again") from err


def inspect_adapter(adapter_dir: str | Path) -> dict:
    """Per-component tensor counts, NaN/Inf counts and finite-value stats of the adapter in ``adapter_dir``.

    Raises :class:`AdapterError` when the directory or its ``adapter_model.safetensors`` is missing or unreadable.
    """
    stats = {component: _ComponentStats() for component in COMPONENTS}
    nonfinite: list[str] = []
    file = _adapter_file(adapter_dir)
    bundle = _kt_bundle_summary(file.parent)
    files = [file] + ([file.parent / kt_bundle.FUSED_FILE] if bundle else [])
    for f in files:
        # the fused file's keys ("layers.{L}.experts.gate_lora_a") sort into routed_experts by their segments
        for name, tensor in _tensors(f):
            if not tensor.is_floating_point():  # not a LoRA weight: chat and export refuse it too, so no "OK"
                raise AdapterError(f"adapter tensor '{name}' in {f} is {str(tensor.dtype).removeprefix('torch.')}; "
                                   "LoRA weights must be floating point: the file is not a LoRA adapter")
            if stats[component_of(name)].add(tensor):
                nonfinite.append(name)
    report = {
        "components": {component: s.as_dict() for component, s in stats.items()},
        "nonfinite": nonfinite,
        "ok": not nonfinite,
    }
    if bundle:
        report["kt_bundle"] = bundle
    return report


def _kt_bundle_summary(adapter_dir: Path) -> dict | None:
    """A KTransformers bundle's manifest, checked (version, status, hashes, tensor records, rank vs
    adapter_config.json) before its tensors are counted: a tampered or partial bundle is an error, not a report."""
    if not kt_bundle.is_kt_bundle(adapter_dir):
        return None
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    b = kt_bundle.validate_bundle(adapter_dir, cfg if isinstance(cfg, dict) else {})
    return {"file": kt_bundle.FUSED_FILE, "rank": b.rank, "alpha": b.alpha, "layers": b.layers,
            "expert_weight_format": b.manifest.get("expert_weight_format")}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _max_abs(row: dict) -> float | None:
    return None if row["min"] is None else max(abs(row["min"]), abs(row["max"]))


def _table_rows(report: dict) -> list[str]:
    header = f"{'component':<16}{'tensors':>9}{'params':>15}{'NaN':>7}{'Inf':>7}{'max|x|':>12}{'norm':>12}"
    rows = [header, "-" * len(header)]
    for component, row in report["components"].items():
        rows.append(f"{component:<16}{row['tensors']:>9,}{row['params']:>15,}{row['nan_tensors']:>7,}"
                    f"{row['inf_tensors']:>7,}{_fmt(_max_abs(row)):>12}{_fmt(row['norm']):>12}")
    return rows


def _nonfinite_rows(report: dict) -> list[str]:
    names = report["nonfinite"]
    if not names:
        return []
    rows = ["", f"non-finite tensors ({len(names)}):"]
    rows += [f"  {name}  [{component_of(name)}]" for name in names[:_LIST_LIMIT]]
    if len(names) > _LIST_LIMIT:
        rows.append(f"  ... and {len(names) - _LIST_LIMIT} more")
    return rows


def verdict(report: dict) -> str:
    total = sum(row["tensors"] for row in report["components"].values())
    if report["ok"]:
        return f"OK: all {total} tensors are finite"
    per_component = Counter(component_of(name) for name in report["nonfinite"])
    where = ", ".join(f"{component} {count}" for component, count in per_component.most_common())
    return (f"NOT OK: {len(report['nonfinite'])} of {total} tensors contain NaN/Inf ({where}); this adapter would "
            f"make the model output NaN: do not use it, retrain or take the last checkpoint that inspects OK")


def _bundle_rows(report: dict) -> list[str]:
    b = report.get("kt_bundle")
    if not b:
        return []
    return [f"KTransformers bundle: manifest verified; {b['file']} holds the routed-expert LoRA of layers "
            f"{b['layers']} (rank {b['rank']}, alpha {b['alpha']:g}), counted under routed_experts", ""]


def format_table(report: dict) -> str:
    """Human-readable report: a per-component table, the first non-finite tensors, and a one-line verdict."""
    return "\n".join([*_bundle_rows(report), *_table_rows(report), *_nonfinite_rows(report), "", verdict(report)])


def run_inspect(adapter_dir: str | Path, as_json: bool) -> int:
    """Print the report (table or JSON) to stdout; return the exit code: 1 if any tensor is non-finite, else 0."""
    report = inspect_adapter(adapter_dir)
    print(json.dumps(report, indent=2) if as_json else format_table(report))
    return 0 if report["ok"] else 1
