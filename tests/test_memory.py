"""The GPU-memory estimate behind the out-of-memory line, checked against the real sizes of tiny models, and (on a
GPU) a real out-of-memory error through `hybridmoe train`: one line, exit 2, no traceback, the checkpoint intact.

Tolerances: weights, expert slots and the KV cache are exact byte counts; activations kept for backward are an
estimate from layer widths, required within a factor of 2 of what autograd really saves (measured by a
saved-tensors hook, per token, quadratic attention scores left out: flash/efficient attention keeps none).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hybridmoe.adapters import apply_lora
from hybridmoe.experts import HybridExperts
from hybridmoe.experts.streaming import enable_streaming
from hybridmoe.loading import load_model
from hybridmoe.loss import causal_lm_loss
from hybridmoe.memory import GiB, MemoryEstimate, estimate_memory, format_oom

from .helpers import make_checkpoint

ARCHS = pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe", "mixtral"])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    return {a: make_checkpoint(a, root / a) for a in ("deepseek_v2", "qwen3_moe", "mixtral")}


def _lora_model(path, streamed: bool):
    model = apply_lora(load_model(path, device="cpu", dtype="float32", progress=False), "all", rank=4, alpha=8, seed=1)
    enable_streaming(model.get_base_model(), "cpu", min_tokens=1 if streamed else 0)
    return model.train()


def _checkpoint_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every tensor in the checkpoint, bytes of its routed-expert tensors), read from the file itself."""
    total = experts = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
                experts += t.numel() * t.element_size() if ".experts." in k else 0
    return total, experts


def test_fixed_part_is_the_models_real_sizes(ckpts):
    path = ckpts["deepseek_v2"]
    model = _lora_model(path, streamed=True)
    est = estimate_memory(model, training=True, gradient_checkpointing=True)
    total, expert_bytes = _checkpoint_bytes(path)
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables: not in the checkpoint
    assert lora > 0 and expert_bytes > 0
    # everything on the compute device = the checkpoint without its routed experts + the GPU-side LoRA + buffers
    assert est.weights == total - expert_bytes + lora + buffers
    assert est.lora_state == 3 * lora  # gradient + AdamW's two moments
    ids = torch.randint(4, 100, (2, 16))
    model(input_ids=ids).logits.sum().backward()  # a streamed step fills the weight cache's two slots
    streamer = next(m.streamer for m in model.modules() if isinstance(m, HybridExperts))
    assert streamer.stats.copies > 0 and est.expert_slots == streamer.slot_bytes
    assert estimate_memory(_lora_model(path, streamed=False)).expert_slots == 0


def _saved_bytes_per_token(model, t1: int = 64, t2: int = 192) -> float:
    """Slope of the bytes autograd keeps for backward over the token count (each storage once)."""

    def saved(t: int) -> int:
        storages: dict[int, int] = {}

        def pack(x):
            if not (x.dim() >= 2 and x.shape[-1] == x.shape[-2] == t):  # [.., T, T] attention scores: quadratic
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        ids = torch.randint(4, 100, (1, t), generator=torch.Generator().manual_seed(t))
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = causal_lm_loss(model, batch, t)
        loss.backward()
        return sum(storages.values())

    return (saved(t2) - saved(t1)) / (t2 - t1)


@ARCHS
def test_kept_activations_per_token_match_autograd(arch, ckpts):
    model = _lora_model(ckpts[arch], streamed=True)  # as on the GPU: the experts' kept rows are device memory
    measured = _saved_bytes_per_token(model)
    est = estimate_memory(model, training=True, gradient_checkpointing=False)
    assert 0.5 <= est.kept_per_token / measured <= 2.0, (est.kept_per_token, measured)
    checkpointed = estimate_memory(model, training=True, gradient_checkpointing=True)
    assert checkpointed.kept_per_token < est.kept_per_token and checkpointed.fixed == est.fixed


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_kv_cache_per_token_is_exact(arch, tiny_ckpt):
    from transformers import DynamicCache

    model = load_model(tiny_ckpt(arch), device="cpu", dtype="float32", progress=False)
    t = 11
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(4, 100, (1, t)), past_key_values=cache, use_cache=True)
    real = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    assert estimate_memory(model, training=False).kept_per_token * t == real


def test_oom_line_says_what_fits():
    est = MemoryEstimate(weights=3 * GiB, lora_state=GiB // 2, expert_slots=2 * GiB, logits=GiB // 4,
                         kept_per_token=2**20, working_per_token=2**19)
    card = 80 * GiB
    line = format_oom(est, "at step 3 (batch 4 x 1024 tokens)", card, 71 * GiB, "lower per_device_train_batch_size")
    fits = est.tokens_that_fit(card)
    assert est.bytes_for(fits) <= card < est.bytes_for(fits + 1)
    assert line == ("GPU out of memory at step 3 (batch 4 x 1024 tokens) (80.0 GiB card, 71.0 GiB in use): an estimate "
                    f"for this model is 5.75 GiB fixed + 1.500 GiB per 1k tokens, so about {fits} tokens fit at once; "
                    "lower per_device_train_batch_size")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_oom_is_one_line_and_keeps_the_checkpoint(tmp_path):
    """Train two steps (saving checkpoint-1), then leave the GPU too little memory for a step: exit 2, one line."""
    model = make_checkpoint("qwen3_moe", tmp_path / "m", hidden_size=256, moe_intermediate_size=512,
                            max_position_embeddings=16384)
    data = tmp_path / "long.jsonl"
    text = " ".join(f"word{i}" for i in range(600))  # ~4000 tokens with the test tokenizer: both turns fit 8192
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": text},
                                                       {"role": "assistant", "content": text}]}) for _ in range(16)))
    out = tmp_path / "out"
    cfg = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), per_device_train_batch_size=16,
               cutoff_len=8192, max_steps=3, save_steps=1, logging_steps=1, device="cuda", progress=False,
               gradient_checkpointing=False)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    # The child takes all but 1 GiB of the card before training, after the first checkpoint is written: a real
    # allocation failure in the second step, with the first checkpoint already on disk.
    code = f"""
import sys, torch
from hybridmoe import training
from hybridmoe.cli import main
hog = []
original = training._checkpoint
def checkpoint_then_fill(path, setup):
    done = original(path, setup)
    torch.cuda.empty_cache()  # step 1's cached blocks go back to the card, so the hog really takes them
    free, _ = torch.cuda.mem_get_info()
    hog.append(torch.empty(free - 2**30, dtype=torch.uint8, device="cuda"))
    return done
training._checkpoint = checkpoint_then_fill
sys.exit(main(["train", {str(cfg_path)!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("hybridmoe: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(err_lines) == 1 and "GPU out of memory at step 2 (batch 16 x" in err_lines[0], proc.stderr[-3000:]
    assert "GiB per 1k tokens, so about" in err_lines[0] and "per_device_train_batch_size" in err_lines[0]
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and not (out / "checkpoint-2").exists()
    assert not (out / "adapter_model.safetensors").exists()


def test_inference_slots_hold_the_gpus_share_only(ckpts):
    """In a split prompt the slots hold the experts the GPU computes: the inference estimate counts those bytes, as
    the slots then hold (CPU streamer: the same bookkeeping as on a GPU)."""
    model = load_model(ckpts["deepseek_v2"], device="cpu", dtype="float32", progress=False)
    streamer = enable_streaming(model, "cpu", min_tokens=1)
    model.hybridmoe.settings.cpu_share = 0.5
    with torch.inference_mode():
        model(input_ids=torch.randint(4, 100, (1, 16)))
    est = estimate_memory(model, training=False)
    assert 0 < est.expert_slots == streamer.slot_bytes < streamer.num_slots * max(
        m.weights.nbytes for m in model.modules() if isinstance(m, HybridExperts))
