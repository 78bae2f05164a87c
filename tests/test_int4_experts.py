"""4-bit routed experts: int4 (``expert_dtype: int4``, quantized group-wise as they load) and MXFP4 (kept as shipped).

What is exact and what is not:
- the format: codes · scale dequantize exactly in fp32 (hybridmoe.experts.packed); quantize → dequantize → quantize
  is the identity; the int4 error is at most half a step per weight;
- every path on the same stored codes agrees with fp32 math on the dequantized weights, up to the bf16 rounding of
  the expert GEMMs' inputs/outputs: the compiled kernel against the torch loop ≤ 2e-3 (summation order), the torch
  loop and the streamed path (dequantized to bf16 in the slot) against fp32 math ≤ 1e-2 per layer;
- LoRA trained on top of int4 experts gets the gradients it would get on the dequantized weights (QLoRA-style);
- the quantization itself is the accuracy cost, measured by benchmarks/accuracy.py (README "Accuracy of compact
  experts"), not asserted here beyond a loose sanity bound.
Sizes: hidden 64, expert intermediate 96 (multiples of 32, the kernel's block; 2I != H).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridmoe
from hybridmoe.adapters import merge_adapter
from hybridmoe.cli import main
from hybridmoe.experts import HybridExperts, cpu_kernel
from hybridmoe.experts.packed import (
    INT4_GROUP,
    PackedFormat,
    dequantize_packed,
    int4_group_for,
    mxfp4_scales,
    pack_nibbles,
    quantize_int4,
    quantize_mxfp4,
    unpack_nibbles,
)
from hybridmoe.experts.streaming import enable_streaming
from hybridmoe.generation import SamplingConfig, generate

from .helpers import make_checkpoint, randomize_lora, silu_experts, write_dataset

DIMS = dict(hidden_size=64, moe_intermediate_size=96, intermediate_size=96)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _experts(model):
    return [m for m in model.modules() if isinstance(m, HybridExperts)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4")
    cache = {}

    def make(arch):
        if arch not in cache:
            base, _, variant = arch.partition(":")  # "qwen3_moe:g64": expert dims that take int4's default group
            kw = {k: v for k, v in DIMS.items() if base != "mixtral" or k != "moe_intermediate_size"}
            if variant == "g64":
                kw.update(moe_intermediate_size=128)
            cache[arch] = make_checkpoint(base, root / arch.replace(":", "_"), **kw)
        return cache[arch]

    return make


# -- the format -----------------------------------------------------------------------------------------------------
def test_nibble_layout_and_round_trip():
    c = torch.arange(16, dtype=torch.uint8).repeat(2)  # [32]
    p = pack_nibbles(c)
    assert p[0] == 0x10 and p[1] == 0x32  # element 2j low nibble, 2j+1 high
    assert torch.equal(unpack_nibbles(p), c)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 128, generator=g) * torch.rand(3, 8, 1, generator=g)  # rows of very different scales
    for group in (32, 64, 128):
        fmt = PackedFormat("int4", group)
        q, s = quantize_int4(w, group)
        assert q.shape == (3, 8, 64) and s.shape == (3, 8, 128 // group) and s.dtype == torch.bfloat16
        d = dequantize_packed(q, s, fmt)
        q2, s2 = quantize_int4(d, group)
        assert torch.equal(q2, q) and torch.equal(s2, s)  # quantizing what int4 holds changes nothing
        step = s.float().repeat_interleave(group, -1).abs()
        err, top = (d - w).abs(), unpack_nibbles(q) == 15  # code 15 = +7: where +8 clamps
        # half a step, or (+8 clamped to +7, the peak's opposite side) one step plus the bf16 scale's rounding
        assert bool(((err <= step / 2 + 1e-6) | (top & (err <= 1.05 * step))).all())
    fmt = PackedFormat("mxfp4", 32)
    q, s = quantize_mxfp4(w)
    d = dequantize_packed(q, s, fmt)
    assert torch.equal(dequantize_packed(*quantize_mxfp4(d), fmt), d)
    assert _rel(d, w) < 0.2


def test_group_choice():
    assert int4_group_for((2048, 1408)) == INT4_GROUP
    assert int4_group_for((2880, 2880)) == 64  # gpt-oss: 2880 = 45 · 64
    assert int4_group_for((96, 160)) == 32
    assert int4_group_for((24, 40)) is None
    with pytest.raises(ValueError):
        PackedFormat("int4", 48)


# -- every path against fp32 math on the dequantized weights -------------------------------------------------------
def _fp32_twin(m: HybridExperts) -> HybridExperts:
    ref = HybridExperts(m.spec, nn.SiLU(), torch.float32)
    for p in ("gate_up_proj", "down_proj"):
        ref.weights.write(p, m.weights.dequantized(p))
    for p, lo in m.lora.items():
        r = ref.add_lora(p, lo.rank, lo.alpha)
        r.A.copy_(lo.A)
        r.B.copy_(lo.B)
    return ref


FORMATS = [PackedFormat("int4", 32), PackedFormat("int4", 64), PackedFormat("mxfp4", 32)]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
# (4, 320, 192): whole 128-input steps of the AVX-512 VNNI dots and a 64-input rest through the AVX2 ones
@pytest.mark.parametrize("shape", [(8, 64, 96), (6, 128, 64), (4, 320, 192)])
@pytest.mark.parametrize("t,k", [(1, 2), (5, 3), (32, 4)])
def test_kernel_and_loop_match_fp32_math(fmt, shape, t, k):
    if not fmt.fits(shape[1]) or not fmt.fits(shape[2]):
        pytest.skip("group does not divide")
    e, h, i = shape
    m = silu_experts(e, h, i, fmt)
    ref = _fp32_twin(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    want = torch.empty(t, h)
    ref.infer_cpu(x, ids, w, want)
    outs = {}
    for flag in (False, True):
        m.settings.cpu_kernel = flag
        outs[flag] = torch.empty(t, h)
        m.infer_cpu(x, ids, w, outs[flag])
    # bf16 rounding of the GEMM inputs and outputs; int4 in groups of 64: int8 activations per group (measured up to
    # 1.4% on these random layers, whose h has heavy tails)
    assert _rel(outs[False], want) <= (3e-2 if fmt.int8_activations else 1e-2)
    if cpu_kernel.available():
        for isa in cpu_kernel.isas():  # every instruction set this CPU has
            old = cpu_kernel.set_isa(isa)
            got = torch.empty(t, h)
            m.settings.cpu_kernel = True
            m.infer_cpu(x, ids, w, got)
            cpu_kernel.set_isa(old)
            assert _rel(got, outs[False]) <= 2e-3, isa  # the same rounding points, another summation order


def test_mxfp4_scales_are_kept_as_e8m0_bytes():
    """MXFP4's scales stay the checkpoint's e8m0 exponents, one byte per 32 weights (not a bf16 copy: 5.6% fewer bytes
    a decode step reads): stored uint8, quantized to uint8, and only uint8 accepted by write_packed (a copy of bf16
    values into exponent bytes would turn 0.5 into 0)."""
    m = silu_experts(3, 64, 32, PackedFormat("mxfp4", 32), lora=False)
    w = m.weights
    assert {s.dtype for s in w.scales.values()} == {torch.uint8}
    assert w.scales["gate_up_proj"].shape == (3, 64, 2) and w.scales["down_proj"].shape == (3, 64, 1)
    codes, exps = quantize_mxfp4(torch.randn(64, 64) * 0.02)
    assert exps.dtype == torch.uint8 and torch.equal(mxfp4_scales(exps), torch.exp2(exps.float() - 127).bfloat16())
    w.write_packed("gate_up_proj", codes, exps, expert=1)
    assert torch.equal(w.scales["gate_up_proj"][1], exps)
    with pytest.raises(ValueError, match="scales are torch.uint8, got torch.bfloat16"):
        w.write_packed("gate_up_proj", codes, mxfp4_scales(exps), expert=1)
    int4 = silu_experts(3, 64, 64, PackedFormat("int4", 64), lora=False).weights
    assert {s.dtype for s in int4.scales.values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="e8m0"):
        dequantize_packed(int4.gate_up, w.scales["gate_up_proj"].repeat(1, 2, 1), PackedFormat("int4", 64))


@pytest.mark.parametrize("shape", [(4, 64, 96), (4, 320, 192)])
def test_kernel_reads_e8m0_scales_as_their_bf16_values(shape):
    """The CPU kernel on MXFP4 weights with their e8m0 bytes gives, bit for bit, what it gives on the same scales as
    bf16 (every instruction set here: the exponents become bf16 in L1 before the same dots), and both what the torch
    loop computes; scales at the edges included (exponent 0 is the subnormal 2^-127)."""
    if not cpu_kernel.available():
        pytest.skip("no compiled kernel here")
    e, h, i = shape
    m = silu_experts(e, h, i, PackedFormat("mxfp4", 32), lora=False)
    for sc in m.weights.scales.values():  # the edges: 0 (the subnormal 2^-127), 1, and a few large and small ones
        sc.view(-1)[:8] = torch.tensor([0, 1, 0, 1, 100, 160, 0, 1], dtype=torch.uint8)
    twin = silu_experts(e, h, i, PackedFormat("mxfp4", 32), lora=False)
    twin.weights.scales = {p: mxfp4_scales(s) for p, s in m.weights.scales.items()}  # the same values, as bf16
    g = torch.Generator().manual_seed(2)
    x, ids, w = torch.randn(5, h, generator=g), torch.randint(0, e, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    loop = torch.empty(5, h)
    m.settings.cpu_kernel = False
    m.infer_cpu(x, ids, w, loop)
    m.settings.cpu_kernel = twin.settings.cpu_kernel = True
    for isa in cpu_kernel.isas():
        old = cpu_kernel.set_isa(isa)
        got, want = torch.empty(5, h), torch.empty(5, h)
        m.infer_cpu(x, ids, w, got)
        twin.infer_cpu(x, ids, w, want)
        cpu_kernel.set_isa(old)
        assert torch.equal(got, want), isa
        assert _rel(got, loop) <= 2e-3, isa


@pytest.mark.parametrize("fmt", FORMATS[1:], ids=str)
def test_int8_activations_at_the_edges(fmt):
    """The kernel quantizes its activations as the torch loop does (PackedFormat.int8_activations) at the edges: a
    group of zeros, a group whose values span 1e-30 to 1e3, ties of x / s; and a NaN in the input gives NaN outputs
    in both (the group's scale is NaN), never a finite number computed from what was not read."""
    if not cpu_kernel.available():
        pytest.skip("no compiled kernel here")
    m = silu_experts(4, 128, 64, fmt)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 128, generator=g)
    x[0, :64] = 0  # a group of zeros (MXFP4: two)
    x[1, :32] = torch.logspace(-30, 3, 32)
    x[2, :64] = torch.arange(64) * 0.5  # x / s lands on halves for several entries
    ids, w = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2, generator=g)
    outs = {}
    for flag in (False, True):
        m.settings.cpu_kernel = flag
        outs[flag] = torch.empty(3, 128)
        m.infer_cpu(x, ids, w, outs[flag])
    assert _rel(outs[True], outs[False]) <= 2e-3
    x[1, 5] = float("nan")
    for flag in (False, True):
        m.settings.cpu_kernel = flag
        m.infer_cpu(x, ids, w, outs[flag])
        assert torch.isnan(outs[flag][1]).all() and torch.isfinite(outs[flag][[0, 2]]).all(), flag


@pytest.mark.parametrize("fmt", FORMATS[1:], ids=str)
def test_streamed_and_cpu_gradients_match_fp32_math(fmt):
    """Training: the CPU loop and the streamed path (codes dequantized to bf16 in the slot) give the gradients of
    fp32 math on the dequantized weights (QLoRA-style)."""
    m = silu_experts(8, 64, 128, fmt)
    ref = _fp32_twin(m)
    g = torch.Generator().manual_seed(2)
    x0, ids, w0 = torch.randn(12, 64, generator=g), torch.randint(0, 8, (12, 2), generator=g), torch.rand(12, 2)
    g_out = torch.randn(12, 64, generator=g)

    def run(mod):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        for lo in mod.lora.values():
            lo.requires_grad_(True)
            lo.A.grad = lo.B.grad = None
        mod(x, ids, w).backward(g_out)
        return [x.grad, w.grad] + [t.grad.clone() for lo in mod.lora.values() for t in (lo.A, lo.B)]

    want = run(ref)
    # CPU: int8 activations at group 64 (measured 0.6-1.1%); streamed: bf16 activations between the GEMMs
    cpu_tol = 3e-2 if fmt.int8_activations else 1e-2
    for streamed, tol in ((False, cpu_tol), (True, 3e-2)):
        if streamed:
            enable_streaming(m, "cpu", 1)
        for a, b in zip(run(m), want):
            assert _rel(a, b) <= tol, streamed


@pytest.mark.parametrize("part_bytes", [None, 8 * 64 * 2 * 16], ids=["whole", "parts_of_16_rows"])
def test_streamed_layer_holds_one_dequantized_part_at_a_time(monkeypatch, part_bytes):
    """The grouped path dequantizes each projection when its GEMM takes it and drops it after, in parts of output
    rows when a projection's floats pass DEQUANT_PART_BYTES (gpt-oss-120b: <= 1 GiB of bf16 at a time, not 4.3 or
    6.4 GB): each part once in the forward and once in the backward, never two alive at once, and the numbers of
    dequantizing both projections up front (forward bitwise; backward's dx summed over parts in fp32)."""
    import weakref

    from hybridmoe.experts import cpu_experts as ce
    from hybridmoe.experts import expert_math

    if part_bytes is not None:  # 16 rows of gate_up a part (8 experts x 64 inputs x 2 bytes), 8 of down
        monkeypatch.setattr(expert_math, "DEQUANT_PART_BYTES", part_bytes)
    m = silu_experts(8, 64, 128, FORMATS[1])
    g = torch.Generator().manual_seed(2)
    x0, ids, w0 = torch.randn(12, 64, generator=g), torch.randint(0, 8, (12, 2), generator=g), torch.rand(12, 2)
    enable_streaming(m, "cpu", 1)

    def run():
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        for lo in m.lora.values():
            lo.requires_grad_(True)
            lo.A.grad = lo.B.grad = None
        y = m(x, ids, w)
        y.backward(torch.ones_like(y))
        return [y.detach(), x.grad, w.grad] + [t.grad.clone() for lo in m.lora.values() for t in (lo.A, lo.B)]

    made, alive_at_make, rows_made = [], [], []
    real_init = ce.Dequantized.__init__

    def tracking_init(self, make, dtype, shape):
        def tracked(rows):
            alive_at_make.append(sum(r() is not None for r in made))
            t = make(rows)
            made.append(weakref.ref(t))
            rows_made.append((shape[1], rows.stop - rows.start))
            return t

        real_init(self, tracked, dtype, shape)

    with monkeypatch.context() as mp:
        mp.setattr(ce.Dequantized, "__init__", tracking_init)
        lazy = run()
    # gate_up [8, 256, 64] and down [8, 64, 128]: forward gate_up, down; backward down, gate_up
    parts = {256: 1, 64: 1} if part_bytes is None else {256: 16, 64: 8}  # rows of 8 x 64 and 8 x 128 inputs
    assert len(made) == 2 * sum(parts.values()) and not any(alive_at_make)
    for out, n in parts.items():
        assert sum(r for o, r in rows_made if o == out) == 2 * out and sum(o == out for o, _ in rows_made) == 2 * n
    real_weights_on = ce.HybridExperts.weights_on
    monkeypatch.setattr(ce.HybridExperts, "weights_on", lambda self, *a, lazy=False, **k: real_weights_on(self, *a, **k))
    eager = run()
    assert torch.equal(lazy[0], eager[0])  # the forward: the same columns from the same GEMMs
    for a, b in zip(lazy[1:], eager[1:]):
        assert torch.equal(a, b) if part_bytes is None else _rel(a, b) <= 1e-2


# -- through the loader and the user entry points -----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "mixtral", "qwen3_moe:g64"])
def test_int4_model_equals_its_dequantized_weights(arch, ckpt):
    path = ckpt(arch)
    q_model, _ = hybridmoe.load(path, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    ref, _ = hybridmoe.load(path, device="cpu", dtype="float32", progress=False)
    assert q_model.hybridmoe.expert_format.startswith("int4")
    if arch.endswith(":g64"):  # the default group: int8 activations on the CPU path (kernel and torch loop)
        assert all(m.weights.packed.group == 64 and m.weights.packed.int8_activations for m in _experts(q_model))
    for mq, mr in zip(_experts(q_model), _experts(ref)):
        assert mq.weights.packed is not None and mq.weights.gate_up.dtype == torch.uint8
        assert mq.weights.nbytes < 0.15 * mr.weights.nbytes  # 4 bits + bf16 scales against fp32
        for proj in ("gate_up_proj", "down_proj"):
            mr.weights.tensor(proj).copy_(mq.weights.dequantized(proj))
    # One MoE layer, every expert hit: CPU path and streamed path against fp32 math on the same weights.
    g = torch.Generator().manual_seed(0)
    mq, mr = _experts(q_model)[0], _experts(ref)[0]
    x = torch.randn(40, mq.spec.hidden_dim, generator=g)
    ids = torch.randint(0, mq.num_experts, (40, 2), generator=g)
    w = torch.rand(40, 2, generator=g)
    with torch.no_grad():
        want = mr(x, ids, w)
        # bf16 rounding of the GEMM inputs and outputs; group 64: int8 activations on the CPU path
        tol = 3e-2 if mq.weights.packed.int8_activations else 1e-2
        assert _rel(mq(x, ids, w), want) <= tol
        enable_streaming(mq, "cpu", min_tokens=8)
        assert _rel(mq(x, ids, w), want) <= 1e-2  # dequantized to bf16 in the slot, bf16 activations
        enable_streaming(mq, "cpu", min_tokens=0)
    ids = torch.arange(5, 45).view(2, 20)
    with torch.no_grad():
        want = ref(ids).logits
        got = q_model(ids).logits  # CPU path
        enable_streaming(q_model, "cpu", min_tokens=8)
        streamed = q_model(ids).logits  # dequantized in the slot, grouped GEMMs
    # Whole model: that rounding flips a few top-k choices, which moves the logits by up to ~4% on these tiny models
    # (measured: int4 CPU 5e-3 / streamed 4e-2; int8 on the same checkpoint 4e-2 / 6e-3).
    assert _rel(got, want) <= 6e-2
    assert _rel(streamed, want) <= 6e-2


def test_int4_adapter_training_merge_and_chat(ckpt, tmp_path):
    path = ckpt("qwen3_moe")
    data = write_dataset(tmp_path / "d.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name_or_path: {path}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\n"
                   "expert_dtype: int4\ndevice: cpu\nlora_target: all\nprogress: false\n")
    assert main(["train", str(cfg)]) == 0
    model, tok = hybridmoe.load(path, adapter=tmp_path / "out", device="cpu", dtype="float32", expert_dtype="int4",
                                progress=False)
    randomize_lora(model, seed=3)  # a LoRA that matters
    ids = torch.arange(5, 25).view(1, 20)
    with torch.no_grad():
        before = model(ids).logits
    merged = merge_adapter(model)  # expert LoRA folded in and requantized to int4
    assert all(m.weights.packed is not None and not m.lora for m in _experts(merged))
    fp32, _ = hybridmoe.load(path, device="cpu", dtype="float32", progress=False)
    base_q, _ = hybridmoe.load(path, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    with torch.no_grad():
        quantization = _rel(base_q(ids).logits, fp32(ids).logits)  # what int4 costs the base model (~0.2 here)
        requantization = _rel(merged(ids).logits, before)
    # Requantizing W + ΔW is one fresh int4 rounding: it costs about what quantizing the base did, not more.
    assert requantization <= 1.5 * quantization
    res = generate(merged, tok, ids[0].tolist(), SamplingConfig(temperature=0, max_new_tokens=4), static_cache=True)
    assert res.new_tokens >= 1


def test_info_names_the_expert_format(ckpt, capsys):
    assert main(["info", "--model", str(ckpt("qwen3_moe:g64")), "--device", "cpu", "--expert-dtype", "int4"]) == 0
    out = capsys.readouterr().out
    assert "routed experts: cpu (int4 (group 64))" in out
    if cpu_kernel.available():  # and which instructions its dots use (AVX-512 VNNI where the CPU has it)
        assert f"(4-bit integer dots: {cpu_kernel.four_bit_dots()})" in out


def test_chat_cli_with_int4_experts(ckpt, capsys):
    rc = main(["chat", "--model", str(ckpt("deepseek_v2")), "--prompt", "hi", "--device", "cpu", "--expert-dtype",
               "int4", "--temperature", "0", "--max-new-tokens", "4"])
    assert rc == 0 and capsys.readouterr().out.strip()


def test_int4_refused_where_no_group_fits(ckpt_dir, capsys):
    """The standard tiny models have expert dims 24/40: no group of 32 divides them; one line, exit 2."""
    rc = main(["chat", "--model", str(ckpt_dir("qwen3_moe")), "--prompt", "hi", "--device", "cpu", "--expert-dtype",
               "int4", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "int4" in err and "multiples of 32" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int4_on_cuda_both_paths_and_graph_decode(ckpt, monkeypatch):
    """On a GPU: short inputs take the CPU kernel, long ones stream int4 to the GPU and dequantize there; graph decode
    runs the CPU kernel between its graphs with the GPU share dequantizing its experts inside a graph."""
    path = ckpt("deepseek_v2")
    q_model, tok = hybridmoe.load(path, device="cuda", dtype="float32", expert_dtype="int4", stream_min_tokens=16,
                                  progress=False)
    ref, _ = hybridmoe.load(path, device="cuda", dtype="float32", stream_min_tokens=0, progress=False)
    for mq, mr in zip(_experts(q_model), _experts(ref)):
        for proj in ("gate_up_proj", "down_proj"):
            mr.weights.tensor(proj).copy_(mq.weights.dequantized(proj))
    for n in (8, 40):  # 8 tokens: CPU path; 40: streamed
        ids = torch.arange(5, 5 + n, device="cuda").view(1, n)
        with torch.no_grad():
            assert _rel(q_model(ids).logits, ref(ids).logits) <= 5e-3, n
    monkeypatch.setattr("hybridmoe.generation.eos_token_ids", lambda *a: set())  # all 6 tokens
    q_model.hybridmoe.settings.gpu_share = 0.5
    res = generate(q_model, tok, list(range(5, 25)), SamplingConfig(temperature=0, max_new_tokens=6))
    ref_res = generate(ref, tok, list(range(5, 25)), SamplingConfig(temperature=0, max_new_tokens=6))
    assert res.decode_mode == "cuda_graphs" and res.new_tokens == 6
    assert res.token_ids == ref_res.token_ids
