"""bf16 GEMMs on AMX tiles (hybridmoe.experts.amx, amx_gemm.c): the CPU share of a streamed prefill.

The emulated tiles (the same blocking, the tile instructions in C) run on any x86-64 CPU; the real tiles only where
the CPU has AMX-BF16 (the GPU host's Xeon), skipped elsewhere. Reference: x rounded to bf16, times the bf16 weights,
in fp32 (torch); both sum fp32 products, in different orders: relative max error <= 1e-5 (measured 5e-8 to 1.3e-6).
"""

from __future__ import annotations

import platform

import pytest
import torch

from hybridmoe.experts import amx

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AMX is x86-64")

# (tokens, out rows, inputs): whole blocks, a 16-row tail block, 16-token tails and partial tiles, V2-Lite's shapes
SHAPES = [(1, 16, 32), (5, 48, 64), (17, 32, 96), (40, 80, 160), (96, 2816, 2048), (33, 2048, 1408)]
TOL = 1e-5


def _built():
    if amx.status().startswith("unavailable"):
        pytest.skip(f"AMX library {amx.status()}")


def _case(n, m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    w = torch.randn(m, k, generator=g).to(torch.bfloat16)
    ref = x.to(torch.bfloat16).float() @ w.float().T  # [n, M]
    return x, w, ref


def _err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_tiles_match_the_reference(shape):
    _built()
    x, w, ref = _case(*shape)
    y = amx.linear(x, w, emulate=True)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _err(y, ref) <= TOL


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_every_prefetch_variant_gives_the_same_numbers(variant):
    """The prefetches (amx.VARIANT's bits) change no number: bit for bit the default's."""
    _built()
    x, w, _ = _case(40, 80, 160)
    want = amx.linear(x, w, emulate=True)
    amx.set_variant(variant)
    try:
        assert torch.equal(amx.linear(x, w, emulate=True), want)
        if amx.available():
            assert torch.equal(amx.linear(x, w), amx.linear(x, w))
    finally:
        amx.set_variant(amx.VARIANT)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_amx_tiles_match_the_reference(shape):
    _built()
    if not amx.available():
        pytest.skip("no AMX on this CPU")
    x, w, ref = _case(*shape)
    y = amx.linear(x, w)
    assert _err(y, ref) <= TOL
    assert _err(y, amx.linear(x, w, emulate=True)) <= TOL


def test_weights_with_a_row_stride_and_bf16_inputs():
    """A weight that is a slice of a wider matrix (row stride > K) and bf16 activations (as the split passes)."""
    _built()
    x, w, _ = _case(20, 64, 128)
    wide = torch.zeros(64, 192, dtype=torch.bfloat16)
    wide[:, :128] = w
    view = wide[:, :128]
    assert amx.supports(view) and view.stride(0) == 192
    xb = x.to(torch.bfloat16)
    ref = xb.float() @ w.float().T
    assert _err(amx.linear(xb, view, emulate=True), ref) <= TOL


@pytest.mark.parametrize("shape", [(8, 31), (15, 32), (16, 48)])
def test_shapes_that_do_not_tile_are_refused(shape):
    _built()
    w = torch.zeros(*shape, dtype=torch.bfloat16)
    assert not amx.supports(w)
    with pytest.raises(ValueError, match="does not tile"):
        amx.linear(torch.zeros(2, shape[1]), w, emulate=True)
    assert not amx.supports(torch.zeros(16, 32))  # fp32 weights: torch's GEMM


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setattr(amx, "_state", "unloaded")
    monkeypatch.setattr(amx, "_lib", None)
    monkeypatch.setattr(amx, "_ok", None)
    monkeypatch.setenv("HYBRIDMOE_AMX", "0")
    assert not amx.available() and not amx.usable(torch.zeros(16, 32, dtype=torch.bfloat16))
    assert "HYBRIDMOE_AMX=0" in amx.status()


def test_bf16_output_is_the_fp32_result_rounded():
    """out_dtype=bf16 rounds the same fp32 sums to nearest even (as torch's .to(bfloat16) of the fp32 output)."""
    _built()
    x, w, _ = _case(40, 80, 160)
    y32 = amx.linear(x, w, emulate=True)
    y16 = amx.linear(x, w, emulate=True, out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))
    with pytest.raises(ValueError, match="out_dtype"):
        amx.linear(x, w, emulate=True, out_dtype=torch.float16)


def test_grouped_linear_is_each_experts_linear():
    """All of a layer's expert GEMMs in one call: experts in any order, some without rows, ragged row counts
    (partial tiles), each row against its own expert's matrix."""
    _built()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 48, 64, generator=g).to(torch.bfloat16)  # [E, M, K]
    experts, counts = [4, 0, 5, 2, 1], [17, 0, 1, 40, 16]
    x = torch.randn(sum(counts), 64, generator=g)
    ref = torch.cat([x[sum(counts[:j]):sum(counts[:j + 1])].to(torch.bfloat16).float() @ w[e].float().T
                     for j, e in enumerate(experts)])
    y = amx.grouped_linear(x, w, experts, counts, emulate=True)
    assert y.shape == (74, 48) and _err(y, ref) <= TOL
    if amx.available():
        assert _err(amx.grouped_linear(x, w, experts, counts), ref) <= TOL
    with pytest.raises(ValueError, match="partition"):
        amx.grouped_linear(x, w, experts, [17, 0, 1, 40, 15], emulate=True)
    # The rows gathered while packing from an unsorted x (bf16 or fp32): the same numbers as the sorted copy's
    perm = torch.randperm(len(x), generator=g)
    unsorted = torch.empty_like(x)
    unsorted[perm] = x  # x's row i is unsorted's row perm[i]
    for xs in (unsorted, unsorted.to(torch.bfloat16)):
        assert torch.equal(amx.grouped_linear(xs, w, experts, counts, emulate=True, rows=perm), y)
    with pytest.raises(ValueError, match="outside"):
        amx.grouped_linear(unsorted, w, experts, counts, emulate=True, rows=perm + 1)
    with pytest.raises(ValueError, match="outside the weight"):
        amx.grouped_linear(x, w, [4, 0, 6, 2, 1], counts, emulate=True)
    # Into a caller's buffer: the same numbers, in it; a buffer of another shape, dtype or layout is refused
    out = torch.full((74, 48), float("nan"))
    assert amx.grouped_linear(x, w, experts, counts, emulate=True, out=out) is out and torch.equal(out, y)
    for bad in (torch.empty(74, 47), torch.empty(74, 48, dtype=torch.bfloat16), torch.empty(48, 74).T):
        with pytest.raises(ValueError, match="out must be"):
            amx.grouped_linear(x, w, experts, counts, emulate=True, out=bad)


def test_calls_from_two_threads_at_once():
    """The split calls from its worker thread while another thread may call too: each calling thread has its own
    packing buffer and each OpenMP thread its own scratch, so concurrent calls give each their own numbers."""
    import threading

    _built()
    cases = [_case(24, 64, 96, seed=s) for s in range(2)]
    want = [amx.linear(x, w, emulate=True) for x, w, _ in cases]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(i):
        x, w, _ = cases[i]
        for _ in range(5):
            got[i].append(amx.linear(x, w, emulate=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(got[i]) == 5 and all(torch.equal(y, want[i]) for y in got[i])


def test_scatter_rows_is_index_add_bit_for_bit():
    """The split's weighted sum by token in one parallel pass: the same bits as y * w index-added into zeros (slots
    in any token order, several a token, tokens without any, negative zeros), and its refusals."""
    _built()
    g = torch.Generator().manual_seed(7)
    for t, h, s in ((1024, 2048, 1536), (7, 64, 30), (5, 16, 0), (3, 8, 12)):
        y = torch.randn(s, h, generator=g)
        w = torch.rand(s, generator=g)
        tok = torch.randint(0, t, (s,), generator=g)
        if s:
            y[0, :3] = -0.0
            w[-1] = -0.0
        want = torch.zeros(t, h).index_add_(0, tok, y * w[:, None])
        got = amx.scatter_rows(y, tok, w, t)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (t, h, s)
        out = torch.full((t, h), float("nan"))
        assert amx.scatter_rows(y, tok, w, t, out=out) is out and torch.equal(out, want)
    y, tok, w = torch.randn(4, 8), torch.tensor([0, 1, 2, 5]), torch.rand(4)
    with pytest.raises(ValueError, match="outside"):
        amx.scatter_rows(y, tok, w, 5)
    with pytest.raises(ValueError, match="out must be"):
        amx.scatter_rows(y, tok, w, 6, out=torch.empty(6, 7))
    with pytest.raises(ValueError, match="fp32"):
        amx.scatter_rows(y.double(), tok, w, 6)
