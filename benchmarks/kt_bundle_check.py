"""Check hybridmoe against KTransformers' own code on a KT adapter bundle; prints one JSON line.

    python benchmarks/kt_bundle_check.py --model MODEL_DIR --bundle KT_ADAPTER_DIR [--kt-src KTRANSFORMERS/kt-kernel]

1. logits: the bundle loaded by hybridmoe (fp32, CPU) against KT's formula written out on a plain transformers model
   (tests/kt_format.py ``merged_reference``: ΔW = alpha/r · B @ A per expert, gate/up rows of gate_up_proj) with the
   PEFT part through vanilla PEFT. Use it on a bundle kt-kernel itself saved (LLaMA-Factory ``use_kt``, needs AMX);
   a tiny model keeps the fp32 reference in RAM.
2. with ``--kt-src`` (a kt-kernel source tree: ``python/sft/artifacts.py``, ``scripts/convert_kt_to_sglang_adapter.py``):
   kt-kernel's manifest validator accepts the bundle ``hybridmoe adapter convert --to kt`` writes back from it (its
   runtime stood in by an object with the wrapper attributes it reads), and kt-kernel's SGLang converter output loads
   in hybridmoe with the same logits.

Session 2026-11-29 (2-core dev box, kt-kernel sources at ktransformers 95009ea6, bundles written by tests/kt_format.py
on tiny DeepSeek-V2 and Qwen3-MoE): both checks passed; max |Δ| 7.2e-7 / 1.9e-6 for the bundle and for kt-kernel's
SGLang conversion of it. Not yet run on a bundle kt-kernel saved.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bundle_tensors(bundle: Path) -> dict:
    cfg = json.loads((bundle / "adapter_config.json").read_text())
    return {"linear": load_file(str(bundle / "adapter_model.safetensors")),
            "fused": load_file(str(bundle / "fused_expert_lora.safetensors")),
            "rank": int(cfg["r"]), "alpha": float(cfg["lora_alpha"])}


def _logits(model_dir: Path, adapter: Path, x: torch.Tensor) -> torch.Tensor:
    import hybridmoe

    m, _ = hybridmoe.load(model_dir, adapter=adapter, device="cpu", dtype="float32", progress=False)
    with torch.no_grad():
        return m(x).logits


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _kt_artifacts(kt_src: Path):
    """kt-kernel's artifacts.py and the two modules it imports, as a package (the rest of sft/ needs the kernel)."""
    pkg = tempfile.mkdtemp(prefix="ktsft-")
    (Path(pkg) / "ktsft").mkdir()
    (Path(pkg) / "ktsft" / "__init__.py").write_text("")
    for f in ("artifacts", "weight_manifest", "backend"):
        (Path(pkg) / "ktsft" / f"{f}.py").write_text((kt_src / "python" / "sft" / f"{f}.py").read_text())
    sys.path.insert(0, pkg)
    from ktsft import artifacts  # noqa: PLC0415

    return artifacts


def _kt_validates(artifacts, bundle: Path, model) -> bool:
    m = json.loads((bundle / "kt_adapter_manifest.json").read_text())
    layers = sorted({int(k.split(".")[1]) for k in m["artifacts"]["fused_expert_lora.safetensors"]["tensors"]})
    ex = next(mod for name, mod in model.named_modules() if mod._parameters.get("gate_up_proj") is not None)
    e, two_i, h = ex.gate_up_proj.shape
    wrappers = [SimpleNamespace(layer_idx=layer, _lora_rank=m["lora"]["rank"], _lora_alpha=m["lora"]["alpha"],
                                _use_fused_expert_lora=True, _fused_expert_lora_params=None, hidden_size=h,
                                moe_config=SimpleNamespace(expert_num=e, intermediate_size=two_i // 2))
                for layer in layers]
    runtime = SimpleNamespace(_kt_wrappers=wrappers, config=SimpleNamespace(_name_or_path=m["base"]["model_name_or_path"]))
    artifacts._validate_adapter_manifest(runtime, bundle)  # raises KTArtifactError when it refuses
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--kt-src", type=Path, help="kt-kernel source tree (optional)")
    args = ap.parse_args()
    from tests.kt_format import merged_reference

    from hybridmoe.adapter_convert import convert

    x = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = merged_reference(args.model, _bundle_tensors(args.bundle))
    with torch.no_grad():
        want = ref(x).logits
    got = _logits(args.model, args.bundle, x)
    scale = max(1.0, want.abs().max().item())
    out = {"check": "kt_bundle", "bundle": str(args.bundle), "max_abs_diff": (got - want).abs().max().item(),
           "ok_1e-5": (got - want).abs().max().item() <= 1e-5 * scale}
    if args.kt_src is not None:
        work = Path(tempfile.mkdtemp(prefix="kt-check-"))
        convert(args.bundle, "peft", work / "peft")
        convert(work / "peft", "kt", work / "kt")
        out["kt_validator_accepts_our_bundle"] = _kt_validates(_kt_artifacts(args.kt_src), work / "kt", ref)
        conv = _module(args.kt_src / "scripts" / "convert_kt_to_sglang_adapter.py", "kt_sglang_convert")
        conv.convert_kt_to_sglang_adapter(args.bundle, work / "sglang", base_model_name_or_path=str(args.model))
        sg = _logits(args.model, work / "sglang", x)
        out["sglang_adapter_max_abs_diff"] = (sg - want).abs().max().item()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
