"""`hybridmoe adapter convert` between the peft, per-expert and kt layouts: exact round trips (tensor for tensor) and
the same model (logits within 1e-5 in fp32, equal greedy replies) whatever the layout it is loaded from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hybridmoe
from hybridmoe.adapter_convert import layout_of
from hybridmoe.adapters import apply_lora, no_peft_moe_rewrite, save_adapter
from hybridmoe.chat import render_prompt
from hybridmoe.cli import main
from hybridmoe.experts import HybridExperts
from hybridmoe.generation import SamplingConfig, generate
from hybridmoe.loading import load_model

from .kt_format import write_kt_bundle


def _convert(src, to, out, capsys=None):
    assert main(["adapter", "convert", str(src), "--to", to, "--output", str(out)]) == 0
    return out


def _tensors(d):
    sd = load_file(str(d / "adapter_model.safetensors"))
    if (d / "fused_expert_lora.safetensors").exists():
        sd.update(load_file(str(d / "fused_expert_lora.safetensors")))
    return sd


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _logits_and_reply(ckpt, adapter, ids, x):
    model, tok = hybridmoe.load(ckpt, adapter=adapter, device="cpu", dtype="float32", progress=False)
    with torch.no_grad():
        logits = model(x).logits
    reply = generate(model, tok, ids, SamplingConfig(temperature=0, max_new_tokens=8)).token_ids
    return logits, reply


@pytest.fixture(scope="module")
def kt(tmp_path_factory, ckpt_dir):
    out = tmp_path_factory.mktemp("kt") / "bundle"
    return ckpt_dir("deepseek_v2"), out, write_kt_bundle(ckpt_dir("deepseek_v2"), out, seed=5)


def test_kt_round_trips_and_same_model(kt, tmp_path, monkeypatch):
    ckpt, bundle, tensors = kt
    peft_dir = _convert(bundle, "peft", tmp_path / "peft")
    per_dir = _convert(bundle, "per-expert", tmp_path / "per")
    assert [layout_of(d) for d in (bundle, peft_dir, per_dir)] == ["kt", "peft", "per-expert"]
    # exact round trips: KT -> peft -> KT and KT -> per-expert -> KT give back the same tensors and rank/alpha
    for d in (peft_dir, per_dir):
        back = _convert(d, "kt", tmp_path / f"{d.name}_kt")
        assert _same(_tensors(back), _tensors(bundle))
        cfg = json.loads((back / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (tensors["rank"], tensors["alpha"])
    # per-expert -> peft equals KT -> peft
    assert _same(_tensors(_convert(per_dir, "peft", tmp_path / "per_peft")), _tensors(peft_dir))
    # SGLang's key form (kt-kernel's convert_kt_to_sglang_adapter.py strips "base_model.model.") reads the same
    sglang = tmp_path / "sglang"
    sglang.mkdir()
    save_file({k.removeprefix("base_model.model."): v for k, v in _tensors(per_dir).items()},
              str(sglang / "adapter_model.safetensors"))
    shutil.copy(per_dir / "adapter_config.json", sglang / "adapter_config.json")
    assert _same(_tensors(_convert(sglang, "kt", tmp_path / "sglang_kt")), _tensors(bundle))

    # the same model from every layout: logits and greedy replies
    monkeypatch.setattr("hybridmoe.generation.eos_token_ids", lambda *a: set())
    tok = hybridmoe.loading.load_tokenizer(ckpt)
    ids = render_prompt(tok, [{"role": "user", "content": "What is 3 plus 3?"}])
    x = torch.tensor([ids])
    # the bundle as loaded (equal to vanilla PEFT: tests/test_kt_bundle.py) is the reference
    ref_logits, reply = _logits_and_reply(ckpt, bundle, ids, x)
    replies = [reply]
    for d in (peft_dir, per_dir):
        logits, reply = _logits_and_reply(ckpt, d, ids, x)
        assert (logits - ref_logits).abs().max().item() <= 1e-5 * max(1.0, ref_logits.abs().max().item()), d.name
        replies.append(reply)
    assert replies[0] == replies[1] == replies[2]
    # the peft layout is vanilla PEFT's: it loads with PeftModel.from_pretrained on plain transformers
    with no_peft_moe_rewrite():
        vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                            str(peft_dir)).eval()
    with torch.no_grad():
        got = vanilla(x).logits
    assert (got - ref_logits).abs().max().item() <= 1e-5 * max(1.0, ref_logits.abs().max().item())


def test_hybridmoe_adapter_to_kt_and_back(ckpt_dir, tmp_path, capsys):
    """An adapter trained here (one A shared by gate and up) -> KT bundle -> peft: the same tensors. Values are bf16
    numbers, as after KT's own training, so the bf16 file loses nothing; an fp32 one gets a note on stderr."""
    ckpt = ckpt_dir("qwen3_moe")
    model = apply_lora(load_model(ckpt, device="cpu", dtype="float32", progress=False), "all", rank=2, alpha=4, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(torch.bfloat16))
        for m in model.modules():
            if isinstance(m, HybridExperts):
                for lo in m.lora.values():
                    lo.B.copy_((torch.randn(lo.B.shape, generator=g) * 0.3).to(torch.bfloat16))
                    lo.A.copy_(lo.A.to(torch.bfloat16))
    save_adapter(model, tmp_path / "ours")
    capsys.readouterr()
    kt_dir = _convert(tmp_path / "ours", "kt", tmp_path / "kt")
    assert "not bit-exact" not in capsys.readouterr().err
    fused = load_file(str(kt_dir / "fused_expert_lora.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in fused.values())
    assert torch.equal(fused["layers.1.experts.gate_lora_a"], fused["layers.1.experts.up_lora_a"])  # the shared A
    back = _convert(kt_dir, "peft", tmp_path / "back")
    orig, again = _tensors(tmp_path / "ours"), _tensors(back)
    assert set(orig) == set(again) and all(torch.equal(orig[k], again[k].float()) for k in orig)

    tok = hybridmoe.loading.load_tokenizer(ckpt)
    ids = render_prompt(tok, [{"role": "user", "content": "Hello"}])
    x = torch.tensor([ids])
    outs = [_logits_and_reply(ckpt, d, ids, x) for d in (tmp_path / "ours", kt_dir)]
    assert (outs[0][0] - outs[1][0]).abs().max().item() <= 1e-5 * max(1.0, outs[0][0].abs().max().item())
    assert outs[0][1] == outs[1][1]

    # fp32 values: converting to kt rounds them to bf16 and says so
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HybridExperts):
                m.lora["down_proj"].B.add_(1e-4)
    save_adapter(model, tmp_path / "fp32")
    _convert(tmp_path / "fp32", "kt", tmp_path / "kt32")
    assert "hybridmoe: note: not bit-exact: bf16 rounding of layers." in capsys.readouterr().err


def test_convert_errors_are_one_line(kt, tmp_path, capsys):
    _, bundle, _ = kt
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        (["adapter", "convert", str(bundle), "--to", "peft", "--output", str(tmp_path / "taken")], "exists and is not empty"),
        (["adapter", "convert", str(bundle), "--to", "kt", "--output", str(bundle)], "exists and is not empty"),
        (["adapter", "convert", str(tmp_path / "nope"), "--to", "peft", "--output", str(tmp_path / "o")], "does not exist"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hybridmoe: error: ") and message in err[0], err
    assert (tmp_path / "taken" / "x").read_text() == "x"
    # --force replaces an existing output as a whole
    assert main(["adapter", "convert", str(bundle), "--to", "peft", "--output", str(tmp_path / "taken"), "--force"]) == 0
    assert not (tmp_path / "taken" / "x").exists() and layout_of(tmp_path / "taken") == "peft"


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapter", "convert", "--help"])
    assert e.value.code == 0 and "--to {peft,per-expert,kt}" in capsys.readouterr().out


def test_model_checks_the_result(kt, ckpt_dir, tmp_path, capsys):
    """--model: the converted adapter passes the loader's checks against the model, or nothing is written."""
    ckpt, bundle, _ = kt
    assert main(["adapter", "convert", str(bundle), "--to", "peft", "--output", str(tmp_path / "ok"),
                 "--model", str(ckpt)]) == 0
    assert _same(_tensors(tmp_path / "ok"), _tensors(_convert(bundle, "peft", tmp_path / "plain")))
    capsys.readouterr()
    # the DeepSeek-V2 bundle (MoE layers 1, 2; 6 experts) against OLMoE (MoE layers 0-2) and DeepSeek-V3 (MoE layers
    # 1, 2; 8 experts): layers, then shapes, do not fit
    for arch, message in (("olmoe", "for layers [1, 2], but the model's MoE layers are [0, 1, 2]"),
                          ("deepseek_v3", "has 8 experts")):
        out, other = tmp_path / arch, ckpt_dir(arch)
        capsys.readouterr()
        assert main(["adapter", "convert", str(bundle), "--to", "kt", "--output", str(out), "--model", str(other)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def _delta(f):
    return f.scale * torch.bmm(f.B.double(), f.A.double())  # ΔW [E, out, in]


def test_common_form_keeps_delta_w():
    """The tensor steps of every conversion keep ΔW: splitting/joining gate_up (shared A and block-diagonal),
    zero-padding to a common rank (bit-exact), and folding a different scale into B (one rounding)."""
    from hybridmoe.adapter_convert import Factor, _conform, _join_gate_up, _Notes, _split_gate_up, _uniform

    g = torch.Generator().manual_seed(0)
    e, h, i = 3, 8, 5
    shared = Factor(torch.randn(e, 2, h, generator=g), torch.randn(e, 2 * i, 2, generator=g), 3.0)
    parts = _split_gate_up(shared.A, shared.B, shared.alpha)
    assert torch.equal(torch.cat([_delta(parts["gate"]), _delta(parts["up"])], 1), _delta(shared))
    assert torch.equal(_join_gate_up("m", parts).B, shared.B)  # the shared A is recognised: rank stays 2

    gate, up = (Factor(torch.randn(e, 2, h, generator=g), torch.randn(e, i, 2, generator=g), 6.0) for _ in range(2))
    joined = _join_gate_up("m", {"gate": gate, "up": up})  # separate A's: rank 4, block-diagonal
    assert joined.rank == 4 and joined.scale == gate.scale
    assert torch.equal(_delta(joined), torch.cat([_delta(gate), _delta(up)], 1))
    back = _split_gate_up(joined.A, joined.B, joined.alpha)
    assert all(torch.equal(back[p].A, f.A) and torch.equal(back[p].B, f.B) and back[p].alpha == f.alpha
               for p, f in (("gate", gate), ("up", up)))

    notes = _Notes()
    small = Factor(torch.randn(e, 1, i, generator=g), torch.randn(e, h, 1, generator=g), 5.0)  # rank 1, scale 5
    rank, alpha = _uniform([gate, up, small], notes)
    assert (rank, alpha) == (2, 6.0) and len(notes.folded) == 1  # scale 3 kept exact, 5 folded into B
    a, b = _conform(small, rank, alpha / rank)
    padded = Factor(a, b, alpha)
    assert not a[:, 1:].any() and not b[:, :, 1:].any()
    assert torch.allclose(_delta(padded), _delta(small), rtol=1e-6, atol=0)
    a, b = _conform(gate, rank, alpha / rank)
    assert torch.equal(a, gate.A) and torch.equal(b, gate.B)
