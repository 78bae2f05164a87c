"""`hybridmoe train` on tiny models: learning, exact gradients vs PEFT, PEFT round trip, resume, non-finite safety."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hybridmoe
from hybridmoe import training as train_mod
from hybridmoe.adapters import adapter_state_dict, apply_lora, no_peft_moe_rewrite
from hybridmoe.data import SFTDataset, collate, load_records
from hybridmoe.errors import ConfigError, NonFiniteError
from hybridmoe.experts import HybridExperts
from hybridmoe.loading import load_model, load_tokenizer

from .conftest import DEVICES
from .helpers import make_checkpoint, randomize_lora, read_log, write_dataset

ARCHS = pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data.jsonl")
    return {a: make_checkpoint(a, root / a) for a in ("deepseek_v2", "qwen3_moe")}, data


def _cfg(model, data, out, **kw):
    cfg = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), max_steps=8, learning_rate=3e-3,
               per_device_train_batch_size=4, logging_steps=1, device="cpu", progress=False, lora_rank=4, lora_alpha=8,
               gradient_checkpointing=False)
    cfg.update(kw)
    return cfg


@DEVICES
@ARCHS
def test_loss_falls(arch, device, ckpts, tmp_path):
    models, data = ckpts
    res = hybridmoe.train(_cfg(models[arch], data, tmp_path / "out", max_steps=12, gradient_checkpointing=True,
                               device=device))
    assert res.steps == 12 and res.skipped_steps == 0
    assert sum(res.losses[-3:]) / 3 < res.losses[0] - 0.3
    log = read_log(tmp_path / "out")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps", "host_rss_gib"} <= set(log[0])
    assert 0 < log[0]["host_rss_gib"] < 64
    assert ("peak_gpu_gib" in log[0]) == (device == "cuda")


@ARCHS
def test_step_gradients_match_peft(arch, ckpts):
    """A padded batch through the training loss: every LoRA gradient (routed experts included) equals PEFT's."""
    models, data = ckpts
    path = models[arch]
    tok = load_tokenizer(path)
    ds = SFTDataset(load_records(data), tok, cutoff_len=64)
    batch = collate([ds[i] for i in (0, 5, 11)], tok.pad_token_id)  # different lengths -> right padding
    n_items = int((batch["labels"][:, 1:] != -100).sum())

    hyb = apply_lora(load_model(path, device="cpu", dtype="float32", progress=False), "all", rank=4, alpha=8, seed=1)
    randomize_lora(hyb, seed=2)
    base = hyb.get_base_model()
    experts = [n for n, m in base.named_modules() if isinstance(m, HybridExperts)]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=sorted(base.hybridmoe.lora_config.target_modules),
                      target_parameters=[f"{n}.{p}" for n in experts for p in ("gate_up_proj", "down_proj")])
    with no_peft_moe_rewrite():
        ref = get_peft_model(ref, lcfg)
    set_peft_model_state_dict(ref, adapter_state_dict(hyb))

    for m in (hyb, ref):
        m.train()
        m(**batch, num_items_in_batch=n_items).loss.backward()
    want = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    got = {n.replace(".default", ""): p.grad for n, p in hyb.named_parameters() if "lora_" in n}
    for name, m in base.named_modules():
        if isinstance(m, HybridExperts):
            for proj, lo in m.lora.items():
                nest = ".base_layer" if proj == "gate_up_proj" else ""
                e, r, i = lo.A.shape
                got[f"base_model.model.{name}{nest}.lora_A.weight"] = lo.A.grad.reshape(e * r, i)
                got[f"base_model.model.{name}{nest}.lora_B.weight"] = lo.B.grad.permute(1, 2, 0).reshape(-1, r * e)
    assert set(got) == set(want)
    for k in want:
        assert ((got[k] - want[k]).norm() / want[k].norm()).item() <= 1e-5, k


@ARCHS
def test_adapter_loads_in_vanilla_peft_with_same_logits(arch, ckpts, tmp_path):
    models, data = ckpts
    out = tmp_path / "out"
    hybridmoe.train(_cfg(models[arch], data, out, max_steps=3))
    sd = load_file(str(out / "adapter_model.safetensors"))
    if arch == "deepseek_v2":  # dense layer-0 and shared-expert LoRA are kept (the seed's bug 3)
        assert any(".layers.0.mlp.gate_proj." in k for k in sd) and any(".shared_experts." in k for k in sd)
    assert any(".experts." in k for k in sd)

    model, tok = hybridmoe.load(models[arch], adapter=out, device="cpu", dtype="float32", progress=False)
    ref = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32)
    with no_peft_moe_rewrite():  # PEFT <= 0.21 would otherwise drop dense/shared-expert LoRA (issue 3711)
        ref = PeftModel.from_pretrained(ref, str(out)).eval()
    ids = torch.randint(4, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32)(ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter does change the output
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_resume_gives_same_losses(ckpts, tmp_path):
    models, data = ckpts
    full = tmp_path / "full"
    hybridmoe.train(_cfg(models["deepseek_v2"], data, full, max_steps=6, save_steps=3, lora_dropout=0.0))
    want = [r["loss"] for r in read_log(full)]

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoint-3", part / "checkpoint-3")
    hybridmoe.train(_cfg(models["deepseek_v2"], data, part, max_steps=6, resume_from_checkpoint=True))
    got = [r["loss"] for r in read_log(part)]
    assert len(got) == 6  # the adapter's whole history: steps 1-3 come with checkpoint-3
    assert got == pytest.approx(want, rel=1e-5)


def _inject_nan(monkeypatch, at_calls):
    """Poison the routed-expert LoRA gradient after the micro-steps numbered in `at_calls` (1-based)."""
    original = train_mod._micro_step
    calls = {"n": 0}

    def poisoned(model, batch, device, n_items):
        loss = original(model, batch, device, n_items)
        calls["n"] += 1
        if calls["n"] in at_calls:
            ex = next(m for m in model.modules() if isinstance(m, HybridExperts))
            ex.lora["down_proj"].B.grad[0, 0, 0] = float("nan")
        return loss

    monkeypatch.setattr(train_mod, "_micro_step", poisoned)


def test_nonfinite_gradient_is_skipped(ckpts, tmp_path, monkeypatch):
    models, data = ckpts
    _inject_nan(monkeypatch, {3})
    out = tmp_path / "out"
    res = hybridmoe.train(_cfg(models["deepseek_v2"], data, out, max_steps=5))
    assert res.skipped_steps == 1 and res.steps == 5
    log = read_log(out)
    skipped = [r for r in log if r.get("skipped")]
    assert skipped[0]["step"] == 3 and "routed_experts" in skipped[0]["nonfinite_grad_components"]
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in sd.values())


def test_repeated_nonfinite_stops_without_writing(ckpts, tmp_path, monkeypatch):
    models, data = ckpts
    _inject_nan(monkeypatch, set(range(1, 100)))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        hybridmoe.train(_cfg(models["deepseek_v2"], data, out, max_steps=10, max_consecutive_skipped=3))
    assert not (out / "adapter_model.safetensors").exists()


def test_skip_leaves_parameters_unchanged(ckpts, tmp_path, monkeypatch):
    """A skipped step changes nothing: a run with a poisoned step 1 ends where the unpoisoned run's steps 2.. would."""
    models, data = ckpts
    _inject_nan(monkeypatch, {1, 2, 3})
    res = hybridmoe.train(_cfg(models["deepseek_v2"], data, tmp_path / "o", max_steps=3, max_consecutive_skipped=5))
    assert res.skipped_steps == 3 and math.isnan(res.final_loss)
    # no step was applied, so the adapter equals the fresh LoRA init (B = 0)
    sd = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(v) == 0 for k, v in sd.items() if "lora_B" in k)


@pytest.mark.parametrize(
    ("override", "message"),
    [({"learning_rat": 1e-3}, "did you mean 'learning_rate'"),
     ({"lora_rank": "eight"}, "'lora_rank' must be an integer"),
     ({"lora_target": "q_proj,nonsense"}, "lora_target 'nonsense'"),
     ({"lr_scheduler_type": "cosin"}, "lr_scheduler_type 'cosin'"),
     ({"stream_min_tokens": -1}, r"'stream_min_tokens' must be in \[0, inf\)"),
     ({"stream_slots": 1}, r"'stream_slots' must be in \[2, inf\)")],
)
def test_bad_config_is_named(override, message, ckpts, tmp_path):
    models, data = ckpts
    with pytest.raises(ConfigError, match=message):
        hybridmoe.train(_cfg(models["deepseek_v2"], data, tmp_path / "o", **override))
