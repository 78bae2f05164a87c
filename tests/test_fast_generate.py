"""Every entry point reaches the fast path: ``hybridmoe.load(...)``'s ``model.generate`` (the README's Python
example), ``hybridmoe.generate`` and ``chat --prompt -v``. Greedy replies equal transformers' ``generate`` token for
token; calls the fast path does not take go to transformers unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hybridmoe
from hybridmoe.cli import main

from .conftest import DEVICES


@DEVICES
@pytest.mark.parametrize("adapter", [False, True])
def test_readme_generate_is_fast_and_equals_transformers(device, adapter, ckpt_dir, tmp_path):
    path = ckpt_dir("deepseek_v2")
    adapter_dir = None
    if adapter:  # a trained adapter, so the PeftModel's generate is the one replaced
        cfg = tmp_path / "t.yaml"
        from .helpers import write_dataset

        cfg.write_text(f"model_name_or_path: {path}\ndataset: {write_dataset(tmp_path / 'd.jsonl', n=4)}\n"
                       f"output_dir: {tmp_path / 'a'}\ndevice: cpu\nmax_steps: 2\nprogress: false\nlora_rank: 2\n"
                       "learning_rate: 0.05\n")
        assert main(["train", str(cfg)]) == 0
        adapter_dir = str(tmp_path / "a")
    model, tok = hybridmoe.load(str(path), adapter=adapter_dir, device=device, dtype="float32", progress=False)

    def refuse(*a, **k):
        raise AssertionError("the README call went to transformers' eager generate")

    model._hybridmoe_slow_generate, slow = refuse, model._hybridmoe_slow_generate  # the README call must not use it
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc.to(device), max_new_tokens=8)
    assert out.shape[0] == 1 and out.shape[1] > enc["input_ids"].shape[1]

    # The reference: transformers (+ PEFT) generate on the same weights.
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    if adapter:
        from peft import PeftModel

        from hybridmoe.adapters import no_peft_moe_rewrite

        with no_peft_moe_rewrite():
            ref = PeftModel.from_pretrained(ref, adapter_dir).eval()
    want = ref.generate(**enc.to(device), max_new_tokens=8, do_sample=False)
    assert out.tolist() == want.tolist()

    # A batch of two is not the fast path's: it goes to transformers' generate, unchanged.
    model._hybridmoe_slow_generate = slow
    batch = torch.cat([enc["input_ids"], enc["input_ids"]]).to(device)
    calls = []
    import hybridmoe.fast_generate as fg

    orig = fg._fast
    fg._fast = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        two = model.generate(batch, max_new_tokens=3, do_sample=False)
    finally:
        fg._fast = orig
    assert not calls and two.shape[0] == 2


def test_package_generate_and_chat_verbose(ckpt_dir, capsys):
    path = str(ckpt_dir("qwen3_moe"))
    model, tok = hybridmoe.load(path, device="cpu", progress=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)["input_ids"]
    res = hybridmoe.generate(model, tok, ids, max_new_tokens=4, temperature=0)
    assert res.new_tokens >= 1 and res.decode_mode == "dynamic_cache"
    capsys.readouterr()
    assert main(["chat", "--model", path, "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "4",
                 "--device", "cpu", "-v"]) == 0
    cap = capsys.readouterr()
    assert "prefill" in cap.err and "decode" in cap.err and "tok/s" in cap.err and "tok/s" not in cap.out
