"""Test helpers: tiny checkpoints with a tokenizer, small SFT datasets, LoRA randomisation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hybridmoe.adapters import to_peft_layout
from hybridmoe.experts import ExpertsSpec, HybridExperts
from hybridmoe.testing import build_tokenizer, save_tiny_model
from hybridmoe.testing.zoo import save_zoo_model


def run_in_triton_interpreter(code: str, timeout: int = 600, **env: str) -> str:
    """Run `code` in a child Python with TRITON_INTERPRET=1 (Triton reads it when a kernel is defined, so not in this
    process) and `env`; its stdout must end with "ok". Returns the stdout."""
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1", **env),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def make_checkpoint(arch: str, path: Path, **overrides) -> Path:
    tok = build_tokenizer()
    save_tiny_model(arch, path, tokenizer=tok, vocab_size=len(tok), **overrides)
    return path


def make_zoo_checkpoint(arch: str, path: Path, **overrides) -> Path:
    """A tiny random model of zoo architecture `arch` with the test tokenizer (vocab = the tokenizer's size)."""
    tok = build_tokenizer()
    save_zoo_model(arch, path, tokenizer=tok, vocab_size=len(tok), **overrides)
    return path


def rewrite_checkpoint(src: Path, dst: Path, transform, quant_config: dict | None = None) -> Path:
    """Copy checkpoint `src` (any sharding) to `dst` as one model.safetensors passed through transform(dict) -> dict,
    with `quant_config` (if any) declared in config.json."""
    shutil.copytree(src, dst)
    sd = {}
    for f in sorted(dst.glob("*.safetensors")):
        sd.update(load_file(str(f)))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(transform(sd), str(dst / "model.safetensors"), metadata={"format": "pt"})
    if quant_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant_config}))
    return dst


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    """`hybridmoe argv` fails as the CLI contract says: exit 2, exactly one `hybridmoe: error:` line naming every
    fragment, no traceback."""
    from hybridmoe.cli import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hybridmoe: error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in errors[0], errors[0]


def silu_experts(e: int, h: int, i: int, fmt, lora: bool = True, seed: int = 0, bias: bool = False) -> HybridExperts:
    """A SiLU-GLU HybridExperts block [E=e, H=h, I=i] in weight format `fmt` (a dtype or a PackedFormat) with random
    weights (std 0.3), random expert biases if `bias`, and, if `lora`, random expert LoRA on both projections (ranks
    3 and 2, non-zero B)."""
    g = torch.Generator().manual_seed(seed)
    m = HybridExperts(ExpertsSpec(e, h, i, has_bias=bias), nn.SiLU(), fmt)
    m.weights.write("gate_up_proj", torch.randn(e, 2 * i, h, generator=g) * 0.3)
    m.weights.write("down_proj", torch.randn(e, h, i, generator=g) * 0.3)
    if bias:
        m.weights.write_bias("gate_up_proj", torch.randn(e, 2 * i, generator=g) * 0.3)
        m.weights.write_bias("down_proj", torch.randn(e, h, generator=g) * 0.3)
    if lora:
        for proj, r in (("gate_up_proj", 3), ("down_proj", 2)):
            lo = m.add_lora(proj, rank=r, alpha=2.0 * r)
            lo.A.copy_(torch.randn(lo.A.shape, generator=g) * 0.3)
            lo.B.copy_(torch.randn(lo.B.shape, generator=g) * 0.3)
    return m


def write_dataset(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            rec = {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                {"role": "assistant", "content": f"It is {2 * i}."}]}
            f.write(json.dumps(rec) + "\n")
    return path


def randomize_lora(model, seed: int, scale: float = 0.1) -> None:
    """LoRA B starts at zero; give every B random values so the adapter changes outputs and gradients reach A."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, HybridExperts):
                for lo in m.lora.values():
                    lo.B.copy_(torch.randn(lo.B.shape, generator=g) * scale)


def read_log(out: Path, running: bool = False) -> list[dict]:
    """trainer_log.jsonl: the history of the adapter in `out`; running=True: the log of a run that did not finish."""
    name = "trainer_log.running.jsonl" if running else "trainer_log.jsonl"
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


# -- references: plain transformers + vanilla PEFT ----------------------------------------------------------------
def reference_model(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖ (b is the reference)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def peft_reference(path, hyb_peft, device="cpu"):
    """Vanilla PEFT on the plain transformers model with the same targets and the same LoRA values as `hyb_peft`
    (routed experts through PEFT's ``target_parameters``)."""
    from peft import LoraConfig, get_peft_model

    from hybridmoe.adapters import adapter_state_dict, no_peft_moe_rewrite

    ref = reference_model(path, device=device)
    cfg = hyb_peft.get_base_model().hybridmoe.lora_config
    experts = [(n, m) for n, m in hyb_peft.get_base_model().named_modules() if isinstance(m, HybridExperts)]
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=sorted(cfg.target_modules),
                      target_parameters=[f"{n}.{m.spec.param_name(p)}" for n, m in experts
                                         for p in ("gate_up_proj", "down_proj")])
    with no_peft_moe_rewrite():
        ref_peft = get_peft_model(ref, lcfg)
    # Copied by name rather than through set_peft_model_state_dict: PEFT 0.21 re-applies transformers' checkpoint
    # renames to keys already in the v5 layout, and Laguna's `mlp.shared_expert.` -> `mlp.shared_experts.` (an
    # unescaped regex) turns `shared_experts.down_proj` into `shared_experts..down_proj`. The key sets must be equal.
    params = {n.replace(".default", ""): p for n, p in ref_peft.named_parameters() if "lora_" in n}
    sd = adapter_state_dict(hyb_peft)
    assert set(sd) == set(params), set(sd) ^ set(params)
    with torch.no_grad():
        for k, v in sd.items():
            params[k].copy_(v)
    return ref_peft


def assert_grads_match(got: dict[str, torch.Tensor | None], want: dict[str, torch.Tensor | None], tol: float):
    """Same LoRA tensors, each gradient within `tol` relative error; a LoRA that gets no gradient in the reference
    (a mamba dt_proj whose weight is read directly, a sparse-attention indexer behind a top-k) gets none here."""
    assert set(got) == set(want)
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
        else:
            assert rel_err(got[k].cpu(), want[k].cpu()) <= tol, k


def lora_grads_peft(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}


def lora_grads_hybrid(model) -> dict[str, torch.Tensor]:
    """Our gradients, laid out like PEFT's parameters (expert LoRA converted to target_parameters layout)."""
    out = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}
    for name, m in model.get_base_model().named_modules():
        if not isinstance(m, HybridExperts):
            continue
        for proj, lo in m.lora.items():
            nest = ".base_layer" if proj == "gate_up_proj" else ""
            a, b = to_peft_layout(m.spec, lo.A.grad, lo.B.grad)  # PEFT's factor roles for this parameter
            out[f"base_model.model.{name}{nest}.lora_A.weight"] = a
            out[f"base_model.model.{name}{nest}.lora_B.weight"] = b
    return out


def tiny_gpt_oss():
    """A tiny random gpt-oss (transformers' own class): 2 layers (sliding + full attention), 4 experts top-2, every
    parameter N(0, 0.1) so the MXFP4 tests see non-trivial values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                               sliding_window=8, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                               pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return model
