"""Streamed inference calls split between the GPU and the CPU (hybridmoe.experts.split, ``ExpertSettings.cpu_share``).

On the CPU the streamer's slots are host copies (ExpertStreamer(device="cpu")): the split runs the same code as on
CUDA, its "GPU part" on the CPU, concurrently with the worker thread's part. The GPU host runs the CUDA case with
``-m gpu``.

Tolerances (‖split - unsplit‖ / ‖unsplit‖, both in fp32): the two sides compute the same slots with the same stored
weights; they differ only where the CPU keeps fp32 activations between its GEMMs and the streamed path keeps them in
the weight dtype (bf16 for bf16, int8 and 4-bit weights), and for 4-bit in the CPU path's int8/bf16-rounded
activations. So fp32 weights agree to summation order, the others to bf16 rounding of the activations.
"""

from __future__ import annotations

import pytest
import torch

from hybridmoe.experts import HybridExperts
from hybridmoe.experts.formula import reference_moe
from hybridmoe.experts.packed import PackedFormat
from hybridmoe.experts.row_lora import RowLoRA
from hybridmoe.experts.streaming import ExpertStreamer, enable_streaming

from .conftest import DEVICES
from .helpers import silu_experts

E, H, I, K, T = 8, 64, 32, 2, 40  # noqa: E741 - experts, hidden, intermediate, top-k, tokens
INT4 = PackedFormat("int4", 32)
FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int4": INT4}
TOLERANCE = {"fp32": 1e-6, "bf16": 1.5e-2, "int8": 1.5e-2, "int4": 1.5e-2}  # measured: 6e-8, 7e-3, 8e-3, 7e-3
__doc__ += "".join(f"    {k:5s} {v:g}\n" for k, v in TOLERANCE.items())


def _module(fmt, lora: bool, seed: int = 0, dims=(E, H, I), bias: bool = False) -> HybridExperts:
    m = silu_experts(*dims, fmt, lora=lora, seed=seed, bias=bias)
    for lo in m.lora.values():
        lo.requires_grad_(True)  # as after a trainer or adapter load: the split must not build a graph
    return m


def _inputs(t: int = T, e: int = E, h: int = H, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:K] for _ in range(t)])
    return x, ids, torch.rand(t, K, generator=g)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _call(m: HybridExperts, share: float, x, ids, w, device: str = "cpu") -> tuple[torch.Tensor, int]:
    """(output, bytes streamed) of one inference call with a fresh streamer (every call on the streamed path)."""
    streamer = enable_streaming(m, device, 1)
    m.settings.cpu_share = share
    with torch.inference_mode():
        out = m(x.to(device), ids.to(device), w.to(device)).cpu()
    return out, streamer.stats.bytes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_split_equals_unsplit(fmt, lora, share):
    m = _module(FORMATS[fmt], lora)
    x, ids, w = _inputs()
    want, full_bytes = _call(m, 0.0, x, ids, w)
    got, moved = _call(m, share, x, ids, w)
    assert _rel(got, want) <= TOLERANCE[fmt], (_rel(got, want), TOLERANCE[fmt])
    # Only the GPU's experts crossed: the first E - c of every tensor.
    c = round(E * share)
    assert moved == full_bytes * (E - c) // E
    # And both against the formula on the stored weights (the streamed path's own budget, tests/test_expert_backends).
    lo = {p: (f.A.detach(), f.B.detach(), f.scale) for p, f in m.lora.items()}
    ref = reference_moe(x, ids, w, m.weights.dequantized("gate_up_proj").float(),
                        m.weights.dequantized("down_proj").float(), m.mlp, lora=lo)
    assert _rel(got, ref) <= (1e-5 if fmt == "fp32" else 5e-2)


def test_biases_and_unaligned_rows_split_on_the_device_loop():
    """Expert biases cross with their experts' prefix; rows that the grouped GEMM cannot take (fp32, dims not a
    multiple of 4) run the per-expert loop over the slot on the GPU side."""
    for dims in ((6, 10, 6), (E, H, I)):  # device-loop, grouped
        m = _module(torch.float32, lora=True, dims=dims, bias=True)
        x, ids, w = _inputs(e=dims[0], h=dims[1])
        want, _ = _call(m, 0.0, x, ids, w)
        got, _ = _call(m, 0.5, x, ids, w)
        assert _rel(got, want) <= TOLERANCE["fp32"], dims


def test_zero_share_is_todays_path():
    """A share that rounds to no expert (or 0, or the default off CUDA) runs the unsplit path bit for bit."""
    m = _module(torch.bfloat16, lora=True)
    x, ids, w = _inputs()
    today, full = _call(m, None, x, ids, w)
    for share in (0.0, 0.05):  # round(8 · 0.05) = 0
        out, moved = _call(m, share, x, ids, w)
        assert torch.equal(out, today) and moved == full


def test_grad_enabled_calls_never_split():
    m = _module(torch.float32, lora=True)
    x, ids, w = _inputs()
    streamer = enable_streaming(m, "cpu", 1)
    m.settings.cpu_share = 0.5
    xg = x.clone().requires_grad_(True)
    out = m(xg, ids, w)
    assert streamer.stats.bytes == m.weights.nbytes  # the whole layer crossed: the GPU computed it all
    out.sum().backward()
    assert xg.grad is not None and m.lora["down_proj"].B.grad is not None
    streamer = enable_streaming(m, "cpu", 1)
    with torch.no_grad():  # inference without inference_mode splits
        m(x, ids, w)
    assert streamer.stats.bytes == m.weights.nbytes // 2


def _fake_layer(i: int, e: int = 4):
    from types import SimpleNamespace

    gu, d = torch.full((e, 3, 2), float(i)), torch.full((e, 2, 2), -float(i))
    return SimpleNamespace(gate_up=gu, down=d, nbytes=gu.nbytes + d.nbytes, host_tensors=lambda: [gu, d])


def test_partial_slots():
    """A slot holding the first E - c experts serves requests for at most those; a request for the whole layer
    recopies it (into the same slot); a whole layer serves partial requests; the prefetch asks for the same share."""
    s = ExpertStreamer("cpu", min_tokens=1, num_slots=3)
    layers = [_fake_layer(i) for i in range(3)]
    for layer in layers:
        s.register(layer)
    gu, d = s.acquire(0, cpu_experts=1)
    assert gu.shape[0] == d.shape[0] == 3 and (gu == 0).all()
    assert s.stats.copies == 1 and s.stats.prefetches == 1  # layer 1's first 3 experts, ahead
    assert s.stats.bytes == 2 * layers[0].nbytes * 3 // 4
    assert s.slot_bytes == s.stats.bytes  # the two slots' buffers are sized for the 3 experts they hold
    assert not s.holds_all(0) and not s.holds_all(1)
    gu, d = s.acquire(1, cpu_experts=1)
    assert s.stats.hits == 1 and gu.shape[0] == 3 and (gu == 1).all()
    gu, d = s.acquire(1)  # the whole layer: a miss, recopied
    assert s.stats.copies == 2 and gu.shape[0] == 4 and (gu == 1).all() and (d == -1).all() and s.holds_all(1)
    assert sum(slot.layer == 1 for slot in s._slots) == 1  # in the slot that held its share, not a second one
    # that slot grew to the whole layer, and layer 2 came whole into the third (the prefetch asks for the same share)
    assert s.slot_bytes == layers[0].nbytes * 11 // 4
    gu, _ = s.acquire(1, cpu_experts=2)  # a share of a layer held whole: a hit
    assert s.stats.copies == 2 and gu.shape[0] == 2
    # A layer computed whole (held whole) still prefetches the next one for the share, so one whole layer does not
    # turn every later layer of the pass whole.
    s = ExpertStreamer("cpu", min_tokens=1, num_slots=3)
    for layer in layers:
        s.register(layer)
    s.acquire(0, prefetch_cpu_experts=1)
    assert s.holds_all(0) and not s.holds_all(1) and s.stats.bytes == layers[0].nbytes * 7 // 4
    # Slots do not shrink: a share copied into a whole layer's buffers uses their first rows.
    s = ExpertStreamer("cpu", min_tokens=1, num_slots=2)
    for layer in layers:
        s.register(layer)
    s.acquire(0)  # layers 0 and 1 whole
    gu, d = s.acquire(2, cpu_experts=1, prefetch=False)  # 3 experts into a 4-expert slot
    assert (gu == 2).all() and (d == -2).all() and gu.shape[0] == 3
    assert s.slot_bytes == 2 * layers[0].nbytes


def test_layer_held_whole_is_not_split():
    """With spare slots an inference pass keeps the layer whole on the GPU; the split then leaves it to the GPU."""
    m = _module(torch.bfloat16, lora=False)
    x, ids, w = _inputs()
    streamer = enable_streaming(m, "cpu", 1)
    with torch.inference_mode():
        want = m(x, ids, w)  # share 0: the whole layer in a slot
        m.settings.cpu_share = 0.5
        got = m(x, ids, w)
    assert torch.equal(got, want) and streamer.stats.bytes == m.weights.nbytes and streamer.stats.hits == 1


def test_per_row_lora_applies_on_both_sides():
    """The server's mixed batches: rows of two adapters and a base row, each group's expert LoRA on both sides."""
    m = _module(torch.float32, lora=True)
    other = _module(torch.float32, lora=True, seed=5).lora
    x, ids, w = _inputs(t=3 * 12)
    m.row_lora = RowLoRA([m.lora, other, {}])  # 3 rows of 12 tokens
    want, _ = _call(m, 0.0, x, ids, w)
    got, _ = _call(m, 0.5, x, ids, w)
    assert _rel(got, want) <= TOLERANCE["fp32"]
    m.row_lora = None
    alone, _ = _call(m, 0.0, x[:12], ids[:12], w[:12])  # the first row with its adapter alone
    assert _rel(got[:12], alone) <= TOLERANCE["fp32"]


@DEVICES
def test_split_on_device(device):
    """The split on the model device (CUDA on the GPU host: page-locked weights, side-stream copies, the worker
    thread overlapping the grouped GEMMs) against the unsplit streamed call."""
    for fmt in ("bf16", "int8", "int4"):
        m = _module(FORMATS[fmt], lora=True)
        if device == "cuda":
            assert m.weights.pin()
        x, ids, w = _inputs(t=256)
        want, full = _call(m, 0.0, x, ids, w, device)
        got, moved = _call(m, 0.25, x, ids, w, device)
        assert _rel(got, want) <= TOLERANCE[fmt] and moved == full * 3 // 4, fmt


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("math", ["loop", "bf16", "kernel"])
def test_every_cpu_math(fmt, math, monkeypatch):
    """Each CPU math (split.CPU_MATH, chosen per format by measurement) gives the unsplit result."""
    from hybridmoe.experts import cpu_kernel, split

    if math == "kernel" and not cpu_kernel.available():
        pytest.skip("no C compiler / OpenMP for the CPU kernel")

    monkeypatch.setattr(split, "CPU_MATH", {split.format_key(FORMATS[fmt]): math})
    calls = []
    kernel = cpu_kernel.moe_forward
    monkeypatch.setattr(cpu_kernel, "moe_forward", lambda *a: calls.append(a[1].shape[0]) or kernel(*a))
    m = _module(FORMATS[fmt], lora=True)
    x, ids, w = _inputs(t=80)
    want, _ = _call(m, 0.0, x, ids, w)
    got, _ = _call(m, 0.5, x, ids, w)
    assert _rel(got, want) <= TOLERANCE[fmt]
    if math == "kernel":  # the CPU's slots (about half of the 160) in chunks of at most MAX_TOKENS pairs
        assert sum(calls) == int((ids >= E // 2).sum()) and max(calls) <= cpu_kernel.MAX_TOKENS and len(calls) >= 2
    else:
        assert not calls


def test_model_with_cpu_share(tmp_path, capsys):
    """The setting through load_model (and its range check, one CLI error line), and a whole model's streamed
    inference forward split vs unsplit."""
    from hybridmoe.errors import ConfigError
    from hybridmoe.loading import load_model

    from .helpers import make_checkpoint, one_line_error, randomize_lora

    ckpt = make_checkpoint("deepseek_v2", tmp_path / "m", num_hidden_layers=3)
    with pytest.raises(ConfigError, match=r"stream_cpu_share must be a fraction in \[0, 1\]"):
        load_model(ckpt, device="cpu", progress=False, stream_cpu_share=1.5)
    one_line_error(capsys, ["chat", "--model", str(ckpt), "--prompt", "hi", "--stream-cpu-share", "-1"],
                   "stream_cpu_share", "[0, 1]")
    model = load_model(ckpt, device="cpu", progress=False, stream_cpu_share=0.5)
    assert model.hybridmoe.settings.cpu_share == 0.5
    from hybridmoe.adapters import apply_lora

    model = apply_lora(model, "all", rank=4, alpha=8, seed=0)
    randomize_lora(model, seed=1)
    streamer = enable_streaming(model, "cpu", min_tokens=8)  # on the CPU streaming is off unless asked for
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        split = model(ids).logits
        moved = streamer.stats.bytes
        model.hybridmoe.settings.cpu_share = 0.0
        enable_streaming(model, "cpu", min_tokens=8)
        whole = model(ids).logits
    assert _rel(split, whole) <= 1e-5
    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    assert moved == sum(m.weights.nbytes for m in experts) // 2


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("lora,bias", [(False, False), (True, False), (True, True)], ids=["base", "lora", "bias"])
def test_bf16_math_on_amx_tiles(fmt, lora, bias, monkeypatch):
    """The "bf16" CPU math's GEMMs on AMX tiles (emulated here; real on AMX CPUs, tests/test_amx.py): bf16-stored
    experts in two grouped calls a layer (every CPU expert's gate_up, then every down), int8 ones (dequantized one
    expert at a time) one call an expert and projection; the result is the unsplit one."""
    from hybridmoe.experts import amx, split

    if amx.status().startswith("unavailable"):
        pytest.skip(f"AMX library {amx.status()}")
    monkeypatch.setattr(amx, "EMULATE", True)
    monkeypatch.setattr(split, "CPU_MATH", {split.format_key(FORMATS[fmt]): "bf16"})
    calls = []
    grouped = amx.grouped_linear
    monkeypatch.setattr(amx, "grouped_linear", lambda x, w, ex, n, **kw: calls.append((tuple(w.shape), len(ex)))
                        or grouped(x, w, ex, n, **kw))
    monkeypatch.setattr(amx, "linear", lambda x, w, **kw: calls.append((tuple(w.shape), 1))
                        or grouped(x, w[None], [0], [x.shape[0]], **kw))
    m = _module(FORMATS[fmt], lora=lora, bias=bias)
    x, ids, w = _inputs(t=80)
    want, _ = _call(m, 0.0, x, ids, w)
    got, _ = _call(m, 0.5, x, ids, w)
    assert _rel(got, want) <= TOLERANCE[fmt]
    cpu_experts = len(set(ids[ids >= E // 2].tolist()))  # experts E/2 .. E-1 are the CPU's at share 0.5
    if fmt == "bf16":
        assert calls == [((E, 2 * I, H), cpu_experts), ((E, H, I), cpu_experts)]
        # The GEMMs wrote into the worker thread's buffers (no fresh memory a call): a second call with other rows
        # reuses them and is right again
        def buffers():  # the worker thread's (thread-local)
            return split._submit(lambda: [getattr(amx._scratch, f"split_{p}").data_ptr() for p in ("gate_up_proj",
                                                                                                   "down_proj")]).result()[0]

        before = buffers()
        x2, ids2, w2 = _inputs(t=64, seed=5)  # fewer rows: the same buffers
        assert _rel(_call(m, 0.5, x2, ids2, w2)[0], _call(m, 0.0, x2, ids2, w2)[0]) <= TOLERANCE[fmt]
        assert buffers() == before
    else:
        assert calls.count(((2 * I, H), 1)) == cpu_experts and calls.count(((H, I), 1)) == cpu_experts


def test_default_cpu_share_by_format_and_amx(monkeypatch):
    """By default the CPU takes a share of a streamed call only for bf16 experts on an AMX CPU, on CUDA."""
    from hybridmoe.experts import amx
    from hybridmoe.experts.backends import AMX_PREFILL_CPU_SHARE, ExpertSettings

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    s = ExpertSettings()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # the measured host's
    for has_amx in (False, True):
        monkeypatch.setattr(amx, "available", lambda v=has_amx: v)
        want = round(64 * AMX_PREFILL_CPU_SHARE) if has_amx else 0
        assert s.prefill_cpu_experts(torch.bfloat16, 64, cuda) == want
        assert s.prefill_cpu_experts(torch.bfloat16, 64, cpu) == 0
        assert s.prefill_cpu_experts(torch.int8, 64, cuda) == 0 and s.prefill_cpu_experts(INT4, 64, cuda) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # half the cores: half the share
    assert s.prefill_cpu_experts(torch.bfloat16, 64, cuda) == round(64 * AMX_PREFILL_CPU_SHARE / 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 56)  # more: not assumed to take more
    assert s.prefill_cpu_experts(torch.bfloat16, 64, cuda) == round(64 * AMX_PREFILL_CPU_SHARE)
    s.cpu_share = 0.25  # an explicit share wins everywhere
    assert s.prefill_cpu_experts(torch.int8, 64, cpu) == 16


def test_a_failing_cpu_part_raises_in_the_caller(monkeypatch):
    """The caller waits for the CPU part to reach its GEMMs before queueing the GPU part: an error before that (or
    after) reaches the caller instead of leaving it waiting."""
    from hybridmoe.experts import split

    def fail(*args):
        raise RuntimeError("the CPU part failed")

    monkeypatch.setattr(split, "_cpu_slots", fail)
    m = _module(torch.bfloat16, lora=False)
    x, ids, w = _inputs()
    with pytest.raises(RuntimeError, match="the CPU part failed"):
        _call(m, 0.5, x, ids, w)
