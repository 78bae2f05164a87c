"""The streamed-experts path: the two-slot weight cache serves the right layer in any access order, predicts the
next layer in forward and (checkpointed) backward passes, and gives the same losses and gradients as the CPU path.

On the CPU the cache's slots are host copies (ExpertStreamer(device="cpu")): the bookkeeping and the device-agnostic
math run for real; the GPU run of the same tests is in test_equivalence (mode "streamed", device cuda).
Tolerance: fp32, ‖Δ‖/‖ref‖ ≤ 1e-6 (same ops on the same device; only the weights' buffer differs).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from hybridmoe.adapters import apply_lora
from hybridmoe.experts import HybridExperts
from hybridmoe.experts.streaming import ExpertStreamer, enable_streaming
from hybridmoe.loading import load_model

from .helpers import make_checkpoint, randomize_lora


def _fake_layer(i: int) -> SimpleNamespace:
    gu, d = torch.full((3, 4, 2), float(i)), torch.full((3, 2, 2), -float(i))
    return SimpleNamespace(gate_up=gu, down=d, nbytes=gu.nbytes + d.nbytes, host_tensors=lambda: [gu, d])


def test_cache_serves_the_requested_layer_in_any_order():
    s = ExpertStreamer("cpu", min_tokens=1)
    for i in range(5):
        s.register(_fake_layer(i))
    rng = random.Random(0)
    for idx in [rng.randrange(5) for _ in range(200)]:
        gu, d = s.acquire(idx)
        assert (gu == idx).all() and (d == -idx).all(), idx
    assert s.stats.hits + s.stats.copies == 200


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    """DeepSeek-V2 (dense layer 0 + shared experts) with 5 MoE layers: more layers than cache slots."""
    return make_checkpoint("deepseek_v2", tmp_path_factory.mktemp("deep"), num_hidden_layers=6)


def _step(model, ids):
    for p in model.parameters():
        p.grad = None
    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    for m in experts:
        for t in m.lora_tensors():
            t.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    grads += [t.grad.clone() for m in experts for t in m.lora_tensors()]
    return loss.detach(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("checkpointing", [True, False], ids=["grad-checkpointing", "no-checkpointing"])
def test_streamed_training_step_equals_cpu_path_and_prefetches(deep_ckpt, checkpointing):
    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))

    loss_cpu, grads_cpu = _step(model, ids)
    streamer = enable_streaming(model, "cpu", min_tokens=8)
    assert len(streamer.layers) == 5
    for _ in range(2):  # two steps: the second starts from what the first backward left in the slots
        loss_s, grads_s = _step(model, ids)
        assert torch.allclose(loss_s, loss_cpu, rtol=1e-6, atol=0)
        for a, b in zip(grads_s, grads_cpu):
            assert _rel(a, b) <= 1e-6
    # Only the very first layer of the first step was copied on request; every other one was prefetched or cached.
    assert streamer.stats.copies == 1, streamer.stats
    assert streamer.stats.prefetches >= 8 and streamer.stats.hits > 0


def test_small_batches_stay_on_the_cpu(deep_ckpt):
    from hybridmoe.placement import format_report, placement_report

    model = load_model(deep_ckpt, device="cpu", dtype="float32", progress=False)
    assert placement_report(model)["streaming"] is None
    streamer = enable_streaming(model, "cpu", min_tokens=8)
    rep = placement_report(model)
    layer_bytes = max(m.weights.nbytes for m in model.modules() if isinstance(m, HybridExperts))
    assert rep["streaming"] == {"device": "cpu", "min_tokens": 8, "slots": 2, "slot_bytes_reserved": 2 * layer_bytes}
    assert "on the CPU below 8 tokens" in format_report(rep)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))  # 3 tokens < 8
        assert streamer.stats.hits + streamer.stats.copies == 0
        model(input_ids=torch.arange(4, 14)[None])  # 10 tokens
        assert streamer.stats.hits + streamer.stats.copies == 5


def test_streaming_off_on_cpu_by_default_and_negative_rejected(deep_ckpt):
    from hybridmoe.errors import ConfigError

    model = load_model(deep_ckpt, device="cpu", dtype="float32", progress=False)
    assert all(m.streamer is None for m in model.modules() if isinstance(m, HybridExperts))
    with pytest.raises(ConfigError, match="stream_min_tokens"):
        load_model(deep_ckpt, device="cpu", dtype="float32", progress=False, stream_min_tokens=-1)


def test_streamed_bf16_no_further_from_fp32_than_the_cpu_path(deep_ckpt):
    """bf16 weights: the streamed path keeps activations and LoRA GEMMs in bf16 (transformers' own precision), the
    CPU path in fp32. Against the fp32 model, the streamed path's loss and worst LoRA gradient error must be within
    1.5x the bf16 CPU path's + 1e-2 (bf16 noise is the floor both stand on; a wrong layer or slot would be O(1))."""
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))

    def run(dtype, streamed):
        model = apply_lora(load_model(deep_ckpt, device="cpu", dtype=dtype, progress=False), "all", 4, 8, seed=1)
        randomize_lora(model, seed=2)
        if streamed:
            enable_streaming(model, "cpu", min_tokens=8)
        loss, grads = _step(model, ids)
        return loss.float(), [g.float() for g in grads]

    loss32, grads32 = run("float32", False)
    errs = {}
    for streamed in (False, True):
        loss, grads = run("bfloat16", streamed)
        errs[streamed] = (_rel(loss, loss32), max(_rel(a, b) for a, b in zip(grads, grads32)))
    assert errs[True][0] <= 1.5 * errs[False][0] + 1e-2, errs
    assert errs[True][1] <= 1.5 * errs[False][1] + 1e-2, errs


def test_streamed_layer_with_unaligned_dims_falls_back_to_the_loop():
    """Grouped GEMMs need 16-byte row strides; a layer whose dims are not (bf16, intermediate 20 = 40 bytes) runs
    the per-expert loop on the device instead of failing, with the same result as the CPU path."""
    from torch import nn

    from hybridmoe.experts import ExpertsSpec

    g = torch.Generator().manual_seed(0)
    m = HybridExperts(ExpertsSpec(4, 16, 20), nn.SiLU(), torch.bfloat16)
    m.weights.gate_up.copy_(torch.randn(m.weights.gate_up.shape, generator=g))
    m.weights.down.copy_(torch.randn(m.weights.down.shape, generator=g))
    x, ids, w = torch.randn(9, 16, generator=g), torch.randint(0, 4, (9, 2), generator=g), torch.rand(9, 2, generator=g)
    with torch.no_grad():
        want = m(x, ids, w)
        s = ExpertStreamer("cpu", min_tokens=1)
        m.streamer, m.stream_index = s, s.register(m.weights)
        got = m(x, ids, w)
    assert s.stats.copies == 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("slots", [2, 3, 5])
def test_more_slots_fewer_copies(deep_ckpt, slots):
    """Passes alternate direction (forward up, backward down), so the last `slots` layers of one pass are hits at the
    start of the next: after the first step, a step copies exactly 2·(MoE layers - slots) layers, same results."""
    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    loss_cpu, grads_cpu = _step(model, ids)
    streamer = enable_streaming(model, "cpu", min_tokens=8, slots=slots)
    _step(model, ids)
    before = streamer.stats.copies + streamer.stats.prefetches
    loss_s, grads_s = _step(model, ids)
    assert streamer.stats.copies + streamer.stats.prefetches - before == 2 * (5 - slots)
    assert torch.allclose(loss_s, loss_cpu, rtol=1e-6, atol=0)
    assert max(_rel(a, b) for a, b in zip(grads_s, grads_cpu)) <= 1e-6


@pytest.mark.parametrize("slots", [2, 3, 5])
def test_inference_passes_keep_the_first_layers_resident(deep_ckpt, slots):
    """Inference only walks up, pass after pass (prompt after prompt): the slots keep the layers needed soonest, so
    after the first pass a pass copies at most MoE layers - (slots - 2) layers and none once every layer has a slot
    (LRU would copy all 5 at any slot count below 5); same logits."""
    model = load_model(deep_ckpt, device="cpu", dtype="float32", progress=False).eval()
    ids = torch.randint(4, 100, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        streamer = enable_streaming(model, "cpu", min_tokens=8, slots=slots)
        model(input_ids=ids)
        for _ in range(2):
            before = streamer.stats.copies + streamer.stats.prefetches
            got = model(input_ids=ids).logits
            copied = streamer.stats.copies + streamer.stats.prefetches - before
            assert copied <= 5 - (slots - 2), copied
            assert copied == 0 or slots < 5, copied
            assert _rel(got, want) <= 1e-6


def test_inference_after_training_steps_serves_the_right_layers(deep_ckpt):
    """Switching between the two eviction rules (training steps, then inference passes, then training) never serves a
    wrong layer."""
    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    model.train()
    loss_cpu, _ = _step(model, ids)
    with torch.inference_mode():
        logits_cpu = model(input_ids=ids).logits
    enable_streaming(model, "cpu", min_tokens=8, slots=3)
    for _ in range(2):
        loss, _ = _step(model, ids)
        assert torch.allclose(loss, loss_cpu, rtol=1e-6, atol=0)
        with torch.inference_mode():
            assert _rel(model(input_ids=ids).logits, logits_cpu) <= 1e-6


def test_slots_first_filled_in_inference_mode_serve_later_training(deep_ckpt):
    """Slots first allocated under torch.inference_mode (a prefill, the server, hybridmoe's generate) are inference
    tensors; a training step or a plain no_grad forward afterwards (transformers' generate) gets new ones, not
    "Inplace update to inference tensor outside InferenceMode" (seen on the GPU host, run S5-2)."""
    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    model.train()
    loss_cpu, _ = _step(model, ids)
    enable_streaming(model, "cpu", min_tokens=8, slots=2)
    with torch.inference_mode():
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)
    loss, _ = _step(model, ids)
    assert torch.allclose(loss, loss_cpu, rtol=1e-6, atol=0)
