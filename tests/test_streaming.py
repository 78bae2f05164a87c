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


@pytest.mark.parametrize("checkpointing", [True, False], ids=["grad-checkpointing", "no-checkpointing"])
def test_streamed_step_copies_expert_lora_before_the_next_prefetch_and_once_per_pass(deep_ckpt, checkpointing,
                                                                                      monkeypatch):
    """Host->device copies run in issue order on the copy engine, whatever their stream: a layer's LoRA factors
    copied after the next layer's weight prefetch was queued wait for that whole copy, and its compute with them (on
    the H200, S9-a: no overlap of copies and kernels). So each call makes its factors before it queues the prefetch,
    and the backward reuses the factors of the forward (or recompute) of its layer instead of copying them again."""
    from hybridmoe.experts.cpu_experts import ExpertLoRA

    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    streamer = enable_streaming(model, "cpu", min_tokens=8)
    owner = {id(lo): m.stream_index for m in model.modules() if isinstance(m, HybridExperts) for lo in m.lora.values()}
    events = []
    factors_on, fill = ExpertLoRA.factors_on, ExpertStreamer._fill

    def spy_factors(self, *a, **k):
        events.append(("factors", owner[id(self)]))
        return factors_on(self, *a, **k)

    def spy_fill(self, slot, idx, *a, **k):
        events.append(("copy", idx))
        return fill(self, slot, idx, *a, **k)

    monkeypatch.setattr(ExpertLoRA, "factors_on", spy_factors)
    monkeypatch.setattr(ExpertStreamer, "_fill", spy_fill)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    _step(model, ids)
    events.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    passes = 3 if checkpointing else 2  # forward, (recompute,) backward
    copies = [i for i, (kind, _) in enumerate(events) if kind == "copy"]
    assert copies, events
    for i in copies:  # the layer that queued this prefetch had made both its projections' factors just before
        before = [e for e in events[:i] if e[0] == "factors"]
        assert before[-2:] and before[-1][1] == before[-2][1], events
    made = sum(kind == "factors" for kind, _ in events)
    assert made == 2 * len(streamer.layers) * (passes - 1), events  # two projections a layer, none in backward


@pytest.mark.parametrize("checkpointing", [True, False], ids=["grad-checkpointing", "no-checkpointing"])
def test_forward_lora_factors_live_until_backward_only_without_checkpointing(deep_ckpt, checkpointing, monkeypatch):
    """The factors the backward reuses are saved like activations: under gradient checkpointing the forward's are
    dropped at once (every layer's device copies alive until backward would be ~0.2 GiB on V2-Lite; S9-c)."""
    import gc
    import weakref

    from hybridmoe.experts.cpu_experts import ExpertLoRA

    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    enable_streaming(model, "cpu", min_tokens=8)
    made = []
    factors_on = ExpertLoRA.factors_on

    def spy(self, *a, **k):
        out = factors_on(self, *a, **k)
        made.extend(weakref.ref(t) for t in out)
        return out

    monkeypatch.setattr(ExpertLoRA, "factors_on", spy)
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    alive = sum(r() is not None for r in made)
    assert made and alive == (0 if checkpointing else len(made))
    loss.backward()


def test_small_batches_stay_on_the_cpu(deep_ckpt):
    from hybridmoe.placement import format_report, placement_report

    model = load_model(deep_ckpt, device="cpu", dtype="float32", progress=False)
    assert placement_report(model)["streaming"] is None
    streamer = enable_streaming(model, "cpu", min_tokens=8)
    rep = placement_report(model)
    layer_bytes = max(m.weights.nbytes for m in model.modules() if isinstance(m, HybridExperts))
    num_experts = next(m for m in model.modules() if isinstance(m, HybridExperts)).num_experts
    from hybridmoe.experts import amx

    assert rep["streaming"] == {"device": "cpu", "min_tokens": 8, "slots": 2, "slot_bytes_reserved": 2 * layer_bytes,
                                "slot_bytes_inference": 2 * layer_bytes,
                                "resident_layers": 0, "resident_bytes": 0, "cpu_experts": 0,
                                "num_experts": num_experts, "cpu_math": "loop", "amx": amx.status()}
    assert "on the CPU below 8 tokens" in format_report(rep) and "meanwhile the CPU" not in format_report(rep)
    model.hybridmoe.settings.cpu_share = 0.5  # a CPU share of streamed calls: info says how many and how
    rep = placement_report(model)
    text = format_report(rep)
    assert (f"meanwhile the CPU computes {round(num_experts / 2)} of each layer's {num_experts} experts next to their "
            "weights (torch's GEMMs in the stored format)") in text  # fp32 experts: CPU_MATH "loop"
    half = 2 * layer_bytes * (num_experts - round(num_experts / 2)) // num_experts  # the slots hold the GPU's half
    assert rep["streaming"]["slot_bytes_inference"] == half and "in prompts the slots then hold the others" in text
    model.hybridmoe.settings.cpu_share = None
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


@pytest.mark.parametrize("slots,resident", [(2, 0), (3, 0), (5, 0), (2, 2)])
def test_more_slots_fewer_copies(deep_ckpt, slots, resident):
    """Passes alternate direction (forward up, backward down), so the last `slots` layers of one pass are hits at the
    start of the next: after the first step, a step copies exactly 2·(MoE layers - slots) layers, same results. With
    `resident` layers kept on the device besides the slots: 2·(MoE layers - resident - slots)."""
    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    loss_cpu, grads_cpu = _step(model, ids)
    streamer = enable_streaming(model, "cpu", min_tokens=8, slots=slots, resident=resident)
    _step(model, ids)
    before = streamer.stats.copies + streamer.stats.prefetches
    loss_s, grads_s = _step(model, ids)
    assert streamer.stats.copies + streamer.stats.prefetches - before == 2 * (5 - resident - slots)
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


# -- resident layers: the first N MoE layers' experts stay on the device and run there for every batch ---------------
def test_resident_layers_run_on_the_device_for_any_batch_and_the_rest_on_the_cpu(deep_ckpt):
    """With 2 of 5 MoE layers resident, a 3-token forward (below min_tokens) computes those two on the device from
    their pinned slots (hits, no copy after load) and the other three on the CPU; same logits as all-CPU (fp32)."""
    from hybridmoe.placement import format_report, placement_report

    model = load_model(deep_ckpt, device="cpu", dtype="float32", progress=False).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        streamer = enable_streaming(model, "cpu", min_tokens=8, slots=2, resident=2)
        assert streamer.stats.bytes == sum(streamer.layers[i].nbytes for i in range(2))  # copied once, at pinning
        got = model(input_ids=ids).logits
    assert (streamer.stats.hits, streamer.stats.copies, streamer.stats.prefetches) == (2, 0, 0)
    assert _rel(got, want) <= 1e-6
    rep = placement_report(model)
    assert rep["streaming"]["resident_layers"] == 2
    assert "the first 2 MoE layers' experts stay on cpu" in format_report(rep)


def test_resident_layers_without_streaming_and_clamped(deep_ckpt):
    """min_tokens 0 (no streaming) with resident layers: only those run on the device, a long batch keeps the others
    on the CPU; asking for more layers than the model has keeps them all."""
    model = load_model(deep_ckpt, device="cpu", dtype="float32", progress=False).eval()
    ids = torch.arange(4, 40)[None]  # 36 tokens
    with torch.no_grad():
        want = model(input_ids=ids).logits
        streamer = enable_streaming(model, "cpu", min_tokens=0, resident=1)
        got = model(input_ids=ids).logits
        assert (streamer.stats.hits, streamer.stats.copies, streamer.stats.prefetches) == (1, 0, 0)
        assert _rel(got, want) <= 1e-6
        streamer = enable_streaming(model, "cpu", min_tokens=0, resident=99)
        assert streamer.resident == 5
        assert _rel(model(input_ids=ids).logits, want) <= 1e-6
        assert (streamer.stats.hits, streamer.stats.copies) == (5, 0)


def test_resident_layers_refreshed_after_a_merge(deep_ckpt):
    """--merge changes the host weights after the resident layers were copied: their pinned slots are refilled, so
    the merged model on resident layers equals the merged model on the CPU."""
    from hybridmoe.adapters import merge_adapter

    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    merged = merge_adapter(model).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = merged(input_ids=ids).logits
    model = apply_lora(load_model(deep_ckpt, device="cpu", dtype="float32", progress=False), "all", 4, 8, seed=1)
    randomize_lora(model, seed=2)
    streamer = enable_streaming(model, "cpu", min_tokens=0, resident=5)
    merged = merge_adapter(model).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert streamer.stats.copies == 5  # each pinned slot refilled once after the merge
    assert _rel(got, want) <= 1e-5


def test_resident_layers_config_and_cli(deep_ckpt, tmp_path, capsys):
    """The config key is range-checked; on a machine without a GPU the setting is ignored with an INFO line."""
    from hybridmoe.cli import main
    from hybridmoe.config import load_config
    from hybridmoe.errors import ConfigError

    from .helpers import one_line_error

    base = {"model_name_or_path": str(deep_ckpt), "output_dir": str(tmp_path), "dataset": "x"}
    assert load_config({**base, "resident_expert_layers": 4}).resident_expert_layers == 4
    with pytest.raises(ConfigError, match="resident_expert_layers"):
        load_config({**base, "resident_expert_layers": -1})
    with pytest.raises(ConfigError, match="resident_expert_layers"):
        load_model(deep_ckpt, device="cpu", progress=False, resident_expert_layers=-1)
    model = load_model(deep_ckpt, device="cpu", progress=False, resident_expert_layers=3)
    assert all(m.streamer is None for m in model.modules() if isinstance(m, HybridExperts))
    # the chat and serve flag: one error line; on a machine without a GPU the setting is ignored and chat replies
    one_line_error(capsys, ["chat", "--model", str(deep_ckpt), "--prompt", "hi", "--resident-expert-layers", "-1"],
                   "resident_expert_layers", ">= 0")
    assert main(["chat", "--model", str(deep_ckpt), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2",
                 "--resident-expert-layers", "3"]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resident_layers_on_the_gpu_equal_the_cpu_experts(deep_ckpt):
    """On a GPU: every layer resident (loaded once, decode-sized batches on the GPU) against the experts on the CPU;
    fp32 logits within 1e-5, and a LoRA training step's loss within 1e-5."""
    ids = torch.tensor([[5, 6, 7, 8]], device="cuda")
    out = {}
    for resident in (0, 99):
        model = load_model(deep_ckpt, device="cuda", dtype="float32", progress=False, stream_min_tokens=0,
                           resident_expert_layers=resident)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        model = apply_lora(model, "all", 4, 8, seed=1)
        randomize_lora(model, seed=2)
        model.train()
        out[resident] = (logits, model(input_ids=ids, labels=ids).loss.detach())
    assert _rel(out[99][0], out[0][0]) <= 1e-5
    assert _rel(out[99][1], out[0][1]) <= 1e-5


def test_inference_reuses_expert_lora_copies_until_the_masters_change():
    """Streamed inference calls copy an expert LoRA's factors to the compute device once and reuse them (the server
    would otherwise copy every adapter's factors at every layer of every step); an in-place change of the masters (an
    reload) is seen at the next call; trainable factors are copied afresh at every call (the session-7 regression:
    autograd's backward runs without grad mode, and cached copies of trained factors went stale across optimizer
    steps, which tests/test_resume_exact caught)."""
    from torch import nn

    from hybridmoe.experts import ExpertsSpec

    g = torch.Generator().manual_seed(0)
    m = HybridExperts(ExpertsSpec(4, 16, 32), nn.SiLU(), torch.bfloat16)
    m.weights.gate_up.copy_(torch.randn(m.weights.gate_up.shape, generator=g))
    m.weights.down.copy_(torch.randn(m.weights.down.shape, generator=g))
    lo = m.add_lora("down_proj", rank=4, alpha=8)
    lo.reset_parameters(g)
    s = ExpertStreamer("cpu", min_tokens=1)
    m.streamer, m.stream_index = s, s.register(m.weights)
    x, ids, w = torch.randn(9, 16, generator=g), torch.randint(0, 4, (9, 2), generator=g), torch.rand(9, 2, generator=g)
    with torch.no_grad():
        first = m.lora_on(torch.device("cpu"), torch.bfloat16, pad_rank=True)["down_proj"]
        again = m.lora_on(torch.device("cpu"), torch.bfloat16, pad_rank=True)["down_proj"]
        assert again.A is first.A and again.B is first.B and first.A.shape[1] == 8  # rank 4 padded to 16 bytes
        y0 = m(x, ids, w)
        lo.B.add_(torch.randn(lo.B.shape, generator=g))  # the masters change in place
        changed = m.lora_on(torch.device("cpu"), torch.bfloat16, pad_rank=True)["down_proj"]
        assert changed.B is not first.B and torch.equal(changed.B[..., :4], lo.B.to(torch.bfloat16))
        y1 = m(x, ids, w)
    assert not torch.equal(y0, y1)
    lo.requires_grad_(True)  # trainable: never cached, in any grad mode
    with torch.no_grad():
        assert m.lora_on(torch.device("cpu"), torch.bfloat16)["down_proj"].A is not \
            m.lora_on(torch.device("cpu"), torch.bfloat16)["down_proj"].A
