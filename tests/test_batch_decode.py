"""Batched decode on the static per-row cache (hybridmoe.batch_decode), as the server runs several rows on CUDA.

Reference: the server's padded ``DynamicCache`` batch (hybridmoe.serve.batch with ``graphs`` off), which
tests/test_mixed_adapters checks against lone runs and PEFT. On the CPU the batch decoder runs its cut eagerly (the
same cache, masks, buckets, cut and CPU-expert calls as the graphs); on the GPU (``-m gpu``) the steps replay CUDA
graphs. fp32; logits within 1e-5 relative (other matmul shapes and an explicit mask over the static cache's columns
against the dynamic cache's: ~3e-7 seen on the CPU).
"""

from __future__ import annotations

import pytest
import torch

import hybridmoe
from hybridmoe.adapters import apply_lora, save_adapter
from hybridmoe.batch_decode import BatchDecoder, _bucket_rows
from hybridmoe.experts.streaming import enable_streaming
from hybridmoe.generation import input_device
from hybridmoe.serve.adapters import AdapterSet
from hybridmoe.serve.prefill import prefill_batch
from hybridmoe.testing import TINY_ARCHS

from .helpers import make_checkpoint, randomize_lora

PROMPTS = [list(range(5, 17)), list(range(30, 37)), list(range(40, 60))]  # 12, 7 and 20 tokens


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _one_thread():
    # the tiny model's ops are too small to split; two OpenMP threads on a busy 2-core CI machine are slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _steps(aset: AdapterSet, batch, rows: list[str | None], tok: torch.Tensor, n: int, out: list) -> torch.Tensor:
    """n decode steps of ``batch`` as the engine runs them (adapters set for the path the step takes), greedy on the
    logits; appends each step's logits to ``out`` and returns the next tokens."""
    for _ in range(n):
        if batch.path(room=16) == "multi":
            aset.use_static(rows, batch.capacity, input_device(aset.model))
        else:
            aset.use(rows)
        logits = batch.step(tok, room=16)
        out.append(logits)
        tok = logits.argmax(-1, keepdim=True)
    return tok


def _run(aset: AdapterSet, rows: list[str | None], graphs: bool, steps: int = 4) -> list[torch.Tensor]:
    """The three PROMPTS prefilled together (row i with adapter rows[i]) and `steps` decode steps."""
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        aset.use(rows)
        logits, batch = prefill_batch(aset.model, PROMPTS, capacity=4)
        batch.graphs = graphs
        _steps(aset, batch, rows, logits.argmax(-1, keepdim=True), steps, out)
        if graphs:
            assert batch.multi is not None and batch.cache is None  # the rows live in the batch decoder
    return out


def _same(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and _rel(g, w) < tol, i


def _aset(path, adapters: dict[str, str] | None = None, **load) -> AdapterSet:
    """The tiny model at `path` (fp32, CPU unless `load` says otherwise) with `adapters` {name: LoRA targets} made
    with random non-zero B and loaded."""
    for seed, (name, target) in enumerate((adapters or {}).items(), start=1):
        model, _ = hybridmoe.load(path, device="cpu", dtype="float32", progress=False)
        peft_model = apply_lora(model, target, rank=4, alpha=8, seed=seed)
        randomize_lora(peft_model, seed, 0.2)
        save_adapter(peft_model, path / name)
    model, _ = hybridmoe.load(path, progress=False, **{"device": "cpu", "dtype": "float32", **load})
    aset = AdapterSet(model)
    for name in adapters or {}:
        aset.load(name, path / name)
    return aset


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rows_of_different_lengths_decode_like_the_padded_batch(arch, tmp_path):
    """Three rows of 12, 7 and 20 tokens (bucket of 4: one padding row) on the batch decoder, every architecture."""
    aset = _aset(make_checkpoint(arch, tmp_path / "m"))
    _same(_run(aset, [None] * 3, graphs=True), _run(aset, [None] * 3, graphs=False))


def test_buckets_are_powers_of_two_up_to_the_capacity():
    assert [_bucket_rows(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert _bucket_rows(11, 12) == 12


def _script(aset: AdapterSet, graphs: bool) -> list[torch.Tensor]:
    """Rows A, B decode; C joins; B leaves; then C leaves (A alone: the batch-1 decoder) and D joins: the logits of
    every step, in order. Every membership change copies the rows out of the decoder and back."""
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        aset.use([None, None])
        logits, batch = prefill_batch(aset.model, PROMPTS[:2], capacity=4)
        batch.graphs = graphs
        tok = _steps(aset, batch, [None] * 2, logits.argmax(-1, keepdim=True), 3, out)
        c_logits, c_batch = prefill_batch(aset.model, [PROMPTS[2]], capacity=1)
        batch.join(c_batch)
        assert batch.multi is None and len(batch) == 3
        tok = _steps(aset, batch, [None] * 3, torch.cat([tok, c_logits.argmax(-1, keepdim=True)]), 2, out)
        batch.remove([1])
        tok = _steps(aset, batch, [None] * 2, tok[[0, 2]], 2, out)
        batch.remove([1])
        tok = _steps(aset, batch, [None], tok[:1], 2, out)
        if graphs:
            assert batch.solo is not None and batch.multi is None
        d_logits, d_batch = prefill_batch(aset.model, [list(range(60, 64))], capacity=1)
        batch.join(d_batch)
        _steps(aset, batch, [None] * 2, torch.cat([tok, d_logits.argmax(-1, keepdim=True)]), 3, out)
    return out


def test_rows_joining_and_leaving_move_between_the_decoders(tmp_path):
    aset = _aset(make_checkpoint("deepseek_v2", tmp_path / "m"))
    _same(_script(aset, graphs=True), _script(aset, graphs=False))


def test_rows_of_different_adapters_on_static_row_masks(tmp_path):
    """alpha: LoRA on every Linear and the routed experts; beta: two attention projections. Rows alpha, base, beta
    through the static row masks (every adapter on every row, masked) against the padded batch's per-row hooks; the
    adapters change the logits far beyond the tolerance, so dropping one could not pass."""
    aset = _aset(make_checkpoint("deepseek_v2", tmp_path / "m"), {"alpha": "all", "beta": "q_proj,kv_b_proj"})
    rows = ["alpha", None, "beta"]
    want = _run(aset, rows, graphs=False)
    _same(_run(aset, rows, graphs=True), want)
    assert _rel(_run(aset, [None] * 3, graphs=False)[0], want[0]) > 1e-2
    _same(_run(aset, ["beta", "beta", None], graphs=True), _run(aset, ["beta", "beta", None], graphs=False))


@pytest.mark.parametrize("adapters", [{}, {"alpha": "q_proj,kv_b_proj"}, {"alpha": "all"}])
def test_resident_layers_compute_every_expert_in_the_step(adapters, tmp_path):
    """Every MoE layer resident (the streamer's "device" is the CPU here, which runs the same code): a batch's
    experts are computed in the step over every expert of the layer, not cut, with each row's routed-expert LoRA
    (alpha "all") through the static row masks."""
    aset = _aset(make_checkpoint("deepseek_v2", tmp_path / "m"), adapters)
    enable_streaming(aset.model, "cpu", min_tokens=0, resident=99)
    rows = ["alpha", None, "alpha"] if adapters else [None] * 3
    _same(_run(aset, rows, graphs=True), _run(aset, rows, graphs=False))
    dec = aset.model._hybridmoe_batch_decoder
    assert len(dec.chains[4].cuts) == 0


def test_two_batches_take_turns_on_the_shared_decoder(tmp_path):
    """The model has one batch decoder: a second batch taking it hands the first one's rows back (padded) first, and
    both decode as they do alone."""
    aset = _aset(make_checkpoint("deepseek_v2", tmp_path / "m"))

    def pair(prompts, graphs, shared=None):
        logits, batch = prefill_batch(aset.model, prompts, capacity=4)
        batch.graphs = graphs
        return batch, logits.argmax(-1, keepdim=True)

    with torch.inference_mode():
        runs = {}
        for graphs in (False, True):
            (a, ta), (b, tb) = pair(PROMPTS[:2], graphs), pair([PROMPTS[2], PROMPTS[0]], graphs)
            out_a, out_b = [], []
            for _ in range(3):  # alternating steps: each takes the decoder from the other
                ta = _steps(aset, a, [None] * 2, ta, 1, out_a)
                tb = _steps(aset, b, [None] * 2, tb, 1, out_b)
            runs[graphs] = out_a + out_b
    _same(runs[True], runs[False])


def test_an_adapter_load_hands_the_rows_back_before_closing_the_decoder(tmp_path):
    """Loading an adapter at run time closes the decoders (their graphs hold the adapters' weights): the batch whose
    rows they held gets them back first and decodes on."""
    path = make_checkpoint("deepseek_v2", tmp_path / "m")
    aset = _aset(path, {"alpha": "q_proj,kv_b_proj"})
    runs = {}
    for graphs in (False, True):
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            aset.use([None] * 3)
            logits, batch = prefill_batch(aset.model, PROMPTS, capacity=4)
            batch.graphs = graphs
            tok = _steps(aset, batch, ["alpha", None, None], logits.argmax(-1, keepdim=True), 2, out)
            held = batch.multi
            aset.load(f"again{int(graphs)}", path / "alpha")
            if graphs:
                assert held.cache is None and batch.multi is None and batch.cache is not None
            _steps(aset, batch, ["alpha", None, None], tok, 2, out)
        runs[graphs] = out
    _same(runs[True], runs[False])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("resident", [0, 99])
def test_cuda_graphs_of_a_batch_decode_like_the_padded_batch(resident, tmp_path):
    """On the GPU: the bucket's second step captures, later ones replay; the same logits as the padded batch. alpha
    has routed-expert LoRA (in the graph for resident layers; in the GPU share and the CPU part otherwise), beta only
    attention LoRA."""
    path = make_checkpoint("deepseek_v2", tmp_path / "m")
    aset = _aset(path, {"alpha": "all", "beta": "q_proj,kv_b_proj"}, device="cuda", resident_expert_layers=resident)
    rows = ["alpha", None, "beta"]
    _same(_run(aset, rows, graphs=True, steps=6), _run(aset, rows, graphs=False, steps=6))
    dec: BatchDecoder = aset.model._hybridmoe_batch_decoder
    assert dec.mode == "cuda_graphs" and dec.chains[4].graphs is not None
    assert len(dec.chains[4].cuts) == (0 if resident else 2)


@pytest.mark.parametrize("expert_dtype", [None, "int8"])
def test_a_gpu_share_of_the_picked_experts_decodes_like_the_padded_batch(expert_dtype, tmp_path):
    """The GPU share of a batched step (decode_graph._BatchShare; the "GPU" is the CPU here, which runs the same
    code): the most picked half of the experts computed apart, with dense per-row weights, the rest by the CPU kernel
    with those picks zero-weighted; the same logits as the padded batch, with routed-expert LoRA on some rows too (the
    GPU part adds it through the static row masks, the CPU part through the rows' groups). int8 experts: the GPU part dequantizes to bf16 and runs bf16 GEMMs (the streamed
    path's rounding), the CPU kernel its own int8 GEMV, so the two parts agree to ~1e-3, not fp32's 1e-5 (seen: 6e-4)."""
    from hybridmoe.batch_decode import batch_decoder_for

    aset = _aset(make_checkpoint("deepseek_v2", tmp_path / "m"), {"alpha": "all"},
                 **({"expert_dtype": expert_dtype} if expert_dtype else {}))
    enable_streaming(aset.model, "cpu", min_tokens=10**6)  # page-locked-style host weights; no layer streams
    dec = batch_decoder_for(aset.model, 4, 64, torch.device("cpu"))
    dec.gpu_share = 0.5
    for rows in ([None] * 3, ["alpha", None, "alpha"], [None] * 3):  # the last: LoRA buffers there, no LoRA rows
        _same(_run(aset, rows, graphs=True), _run(aset, rows, graphs=False), 1e-5 if expert_dtype is None else 3e-3)
    share = dec.chains[4].share
    assert share is not None and share.n == 3  # round(min(4 x 2, 6) x 0.5) slots
    assert share.lora is not None and float(share.y.abs().sum()) > 0  # the "GPU" took picks (and LoRA rows before)
    assert float(share.w.abs().sum()) > 0
