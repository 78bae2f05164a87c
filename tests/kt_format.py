"""Tiny KTransformers adapter bundles written the way kt-kernel writes them (it needs AMX hardware, so tests cannot
run it), and the two references they are compared against.

On-disk format (kt-kernel ``python/sft/artifacts.py`` ``save_kt_adapter_artifacts`` and ``lora.py``
``_save_fused_expert_lora``): the PEFT part (adapter_config.json + adapter_model.safetensors, saved by PEFT for
the Linear targets: attention, dense MLP, shared experts), then ``fused_expert_lora.safetensors`` with
``layers.{L}.experts.{gate,up,down}_lora_{a,b}`` in bf16, then ``kt_adapter_manifest.json`` (version 1, status
ready, expert_weight_format, base, lora {rank, alpha}, artifacts {name: {size, sha256}} with the fused file's
``tensor_count`` and ``tensors`` {key: {shape, dtype}}) written last.

This module does not use hybridmoe's own KT code, so a shared mistake cannot hide.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hybridmoe.adapters import no_peft_moe_rewrite

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
          "gate_proj", "up_proj", "down_proj"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha(path)}


def expert_modules(model) -> dict[int, str]:
    """{layer: name} of the fused experts modules of a transformers model (3-D gate_up_proj)."""
    out = {}
    for name, m in model.named_modules():
        p = m._parameters.get("gate_up_proj")
        if p is not None and p.dim() == 3:
            out[int(name.split("layers.")[1].split(".")[0])] = name
    return out


def write_kt_bundle(ckpt, out: Path, rank: int = 2, alpha: float = 6.0, seed: int = 0, scale: float = 0.3) -> dict:
    """A KT bundle for the tiny model at ``ckpt``: random Linear LoRA (A and B) and random bf16 fused expert LoRA.
    Returns {"linear": PEFT state dict, "fused": {key: bf16 tensor}, "rank", "alpha"}."""
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[n for n in LINEAR if n in names])
    with no_peft_moe_rewrite():
        peft_model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(str(out))  # the PEFT part, as LLaMA-Factory saves it
    from safetensors.torch import load_file

    linear = load_file(str(out / "adapter_model.safetensors"))

    fused = {}
    for layer, name in sorted(expert_modules(base).items()):
        ex = base.get_submodule(name)
        e, two_i, h = ex.gate_up_proj.shape
        i = two_i // 2
        shapes = {"gate_lora_a": (e, rank, h), "gate_lora_b": (e, i, rank), "up_lora_a": (e, rank, h),
                  "up_lora_b": (e, i, rank), "down_lora_a": (e, rank, i), "down_lora_b": (e, h, rank)}
        for kt_name, shape in shapes.items():
            fused[f"layers.{layer}.experts.{kt_name}"] = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
    save_file(fused, str(out / "fused_expert_lora.safetensors"))
    write_manifest(out, rank, alpha, fused)
    return {"linear": linear, "fused": fused, "rank": rank, "alpha": alpha}


def write_manifest(out: Path, rank: int, alpha: float, fused: dict[str, torch.Tensor], status: str = "ready") -> None:
    """kt_adapter_manifest.json over the files in ``out``, as kt-kernel writes it."""
    artifacts = {n: _record(out / n) for n in ("adapter_config.json", "adapter_model.safetensors",
                                                "fused_expert_lora.safetensors")}
    artifacts["fused_expert_lora.safetensors"].update({
        "tensor_count": len(fused),
        "tensors": {k: {"shape": list(v.shape), "dtype": "BF16"} for k, v in sorted(fused.items())},
    })
    manifest = {"version": 1, "status": status, "expert_weight_format": "bf16",
                "base": {"model_name_or_path": "/models/tiny"}, "lora": {"rank": rank, "alpha": float(alpha)},
                "artifacts": artifacts}
    (out / "kt_adapter_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def peft_reference(ckpt, bundle: dict):
    """The same weights as a vanilla transformers + PEFT model: dense/shared LoRA via target_modules, routed-expert
    LoRA via target_parameters. Gate and up have separate A's in KT, so the fused gate_up LoRA is rank 2r with
    A = [gate_a; up_a] and B = blockdiag(gate_b, up_b), alpha 2·alpha (PEFT rank_pattern/alpha_pattern)."""
    r, alpha = bundle["rank"], bundle["alpha"]
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    experts = expert_modules(base)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=[n for n in LINEAR if n in names],
                     target_parameters=[f"{n}.{p}" for n in experts.values() for p in ("gate_up_proj", "down_proj")],
                     rank_pattern={f"{n}.gate_up_proj": 2 * r for n in experts.values()},
                     alpha_pattern={f"{n}.gate_up_proj": 2 * alpha for n in experts.values()})
    # PEFT 0.21 warns that these patterns "matched no targeted module": its check looks at module names only. They
    # do apply to the parameters (a rank-r gate_up LoRA could not take the rank-2r tensors loaded below).
    with no_peft_moe_rewrite():
        ref = get_peft_model(base, cfg)
    sd = dict(bundle["linear"])
    f = {k: v.float() for k, v in bundle["fused"].items()}
    for layer, name in experts.items():
        t = {k.rsplit(".", 1)[1]: v for k, v in f.items() if k.startswith(f"layers.{layer}.")}
        n_exp = t["gate_lora_a"].shape[0]
        a_gu = torch.stack([torch.cat([t["gate_lora_a"][e], t["up_lora_a"][e]]) for e in range(n_exp)])  # [E, 2r, H]
        b_gu = torch.stack([torch.block_diag(t["gate_lora_b"][e], t["up_lora_b"][e]) for e in range(n_exp)])
        p = f"base_model.model.{name}"
        # PEFT target_parameters: lora_A [E·r, in] expert-major, lora_B [out, r·E] rank-major; gate_up is the
        # inner wrapper (registered first), down_proj the outer one
        sd[f"{p}.base_layer.lora_A.weight"] = a_gu.reshape(-1, a_gu.shape[-1])
        sd[f"{p}.base_layer.lora_B.weight"] = b_gu.permute(1, 2, 0).reshape(b_gu.shape[1], -1)
        sd[f"{p}.lora_A.weight"] = t["down_lora_a"].reshape(-1, t["down_lora_a"].shape[-1])
        sd[f"{p}.lora_B.weight"] = t["down_lora_b"].permute(1, 2, 0).reshape(t["down_lora_b"].shape[1], -1)
    res = set_peft_model_state_dict(ref, sd)
    assert not res.unexpected_keys, res.unexpected_keys[:3]
    return ref.eval()


def merged_reference(ckpt, bundle: dict):
    """KT's semantics written out directly: ΔW_gate[e] = s·gate_b[e] @ gate_a[e] on gate_up_proj's first I rows,
    ΔW_up on the last I rows, ΔW_down[e] = s·down_b[e] @ down_a[e], s = alpha / r; Linear LoRA via PEFT."""
    s = bundle["alpha"] / bundle["rank"]
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    f = {k: v.float() for k, v in bundle["fused"].items()}
    with torch.no_grad():
        for layer, name in expert_modules(base).items():
            ex = base.get_submodule(name)
            t = {k.rsplit(".", 1)[1]: v for k, v in f.items() if k.startswith(f"layers.{layer}.")}
            i = ex.gate_up_proj.shape[1] // 2
            ex.gate_up_proj[:, :i] += s * torch.bmm(t["gate_lora_b"], t["gate_lora_a"])
            ex.gate_up_proj[:, i:] += s * torch.bmm(t["up_lora_b"], t["up_lora_a"])
            ex.down_proj += s * torch.bmm(t["down_lora_b"], t["down_lora_a"])
    names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    cfg = LoraConfig(r=bundle["rank"], lora_alpha=bundle["alpha"], target_modules=[n for n in LINEAR if n in names])
    with no_peft_moe_rewrite():
        ref = get_peft_model(base, cfg)
    res = set_peft_model_state_dict(ref, bundle["linear"])
    assert not res.unexpected_keys
    return ref.eval()
