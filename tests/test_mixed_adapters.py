"""Rows of different adapters, and base-model rows, in ONE forward (the server's mixed batches).

A mixed batch (base row + adapter `alpha` row + adapter `beta` row; both adapters with attention LoRA and
routed-expert LoRA, random non-zero B) must give each row the logits it gets when it runs alone with its adapter,
through a batched prefill and decode steps fed the same tokens. The Linear LoRA adds each adapter's LoRA on its rows
(hybridmoe.serve.mixed_lora; checked against PEFT's own ``adapter_names`` path too) and the routed experts run one
call per adapter group (hybridmoe.experts.row_lora).

Tolerance: fp32 throughout; a batched forward has other matmul shapes than a lone one (and left padding), so rows
may differ from their lone runs by float rounding. Seen here: ≤ 1e-6 absolute on logits of magnitude ~2; asserted
with atol 1e-5. That the adapters matter at all is checked too (a row with its adapter differs from the base model
by ~2, far more than the tolerance), so a mixed path that dropped the LoRA could not pass.
"""

from __future__ import annotations

import pytest
import torch

import hybridmoe
from hybridmoe.adapters import apply_lora, base_model_of, save_adapter
from hybridmoe.experts import HybridExperts
from hybridmoe.experts.row_lora import RowLoRA
from hybridmoe.experts.streaming import enable_streaming
from hybridmoe.generation import input_device
from hybridmoe.serve.adapters import AdapterSet
from hybridmoe.serve.prefill import padded_inputs, prefill_batch

from .helpers import make_checkpoint, make_zoo_checkpoint, randomize_lora

ATOL = 1e-5
# alpha: every Linear and the routed experts; beta: two attention projections (MLA's, or q/v elsewhere) and the
# routed experts
TARGETS = {"deepseek_v2": ("all", "q_proj,kv_b_proj,experts"), "qwen2_moe": ("all", "q_proj,v_proj,experts"),
           "llama4_text": ("all", "q_proj,v_proj,experts")}
FED = [7, 42, 99]  # tokens fed after the prefill, the same for every run (no sampling: greedy ties cannot diverge)


@pytest.fixture(scope="module")
def adapter_sets(tmp_path_factory):
    """arch -> its AdapterSet, built once per module (tests reset what they change: kernel switch, streaming)."""
    built: dict[str, AdapterSet] = {}

    def get(arch: str) -> AdapterSet:
        if arch not in built:
            built[arch] = _adapter_set(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    # One torch thread: the tiny model's ops are too small to split, and on a busy 2-core CI machine two OpenMP
    # threads make each forward many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield get
    finally:
        torch.set_num_threads(threads)


def _adapter_set(root, arch: str, **load) -> AdapterSet:
    """The tiny `arch` model with adapters `alpha` and `beta` loaded (random non-zero LoRA B everywhere); ``load``:
    extra arguments of the served model's hybridmoe.load (device, dtype, streaming)."""
    make = make_zoo_checkpoint if arch == "llama4_text" else make_checkpoint
    ckpt = make(arch, root / "base")
    for seed, (name, target) in enumerate(zip(("alpha", "beta"), TARGETS[arch]), start=1):
        model, _ = hybridmoe.load(ckpt, device="cpu", progress=False)
        peft_model = apply_lora(model, target, rank=4, alpha=8, seed=seed)
        randomize_lora(peft_model, seed, 0.2)
        save_adapter(peft_model, root / name)
    model, _ = hybridmoe.load(ckpt, progress=False, **{"device": "cpu", **load})
    aset = AdapterSet(model)
    aset.load("alpha", root / "alpha")
    aset.load("beta", root / "beta")
    assert all(aset.expert_lora[n][m] for n in ("alpha", "beta") for m in aset.experts)  # both carry routed-expert LoRA
    return aset


def _run(aset: AdapterSet, prompts: list[list[int]], rows: list[str | None]) -> torch.Tensor:
    """Prefill ``prompts`` in one left-padded batch, row i with adapter ``rows[i]``, then one decode step per token
    of FED: logits [B, 1 + len(FED), V] fp32."""
    with torch.inference_mode():
        aset.use(rows)
        logits, batch = prefill_batch(aset.model, prompts, capacity=len(prompts))
        out = [logits]
        for t in FED:
            aset.use(rows)
            out.append(batch.step(torch.full((len(prompts), 1), t, dtype=torch.long, device=input_device(aset.model))))
    return torch.stack(out, dim=1).cpu()


@pytest.mark.parametrize("arch,experts", [("deepseek_v2", "kernel"), ("deepseek_v2", "loop"),
                                          ("deepseek_v2", "streamed"), ("qwen2_moe", "kernel"),
                                          ("llama4_text", "kernel")])
def test_mixed_batch_rows_equal_lone_rows(adapter_sets, arch, experts):
    """base + alpha + beta in one batch == each alone, prefill and decode. deepseek_v2 three times: the compiled CPU
    kernel, the torch per-expert loop (kernel off), and the streamed path (here onto the CPU: a 27-token prefill
    streams, its three 9-token adapter groups alone would not; each group still runs streamed, the later ones from
    the slot cache). qwen2_moe: its shared expert and shared-expert gate see [B·T, H] inputs (our hook repeats each
    row's adapter name per token). llama4_text: dense expert dispatch; its chunked attention is not left-padding
    safe (the server serves it one row per batch), so its prompts here have equal lengths."""
    aset = adapter_sets(arch)
    base = base_model_of(aset.model)
    base.hybridmoe.settings.cpu_kernel = experts != "loop"  # shared by the model's experts blocks
    streamer = enable_streaming(base, "cpu", min_tokens=12) if experts == "streamed" else None
    try:
        _check_mixed_equals_lone(aset, arch, streamer)
    finally:
        base.hybridmoe.settings.cpu_kernel = True
        enable_streaming(base, "cpu", min_tokens=0)  # off


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stream_min_tokens", [0, 12])
def test_mixed_batch_on_cuda(tmp_path, stream_min_tokens):
    """On the GPU host, fp32: the model on cuda with its experts on the CPU (their activations cross to the CPU once
    per layer for all adapter groups), or streamed to the GPU from 12 tokens on (the 27-token prefill's groups then
    run grouped GEMMs on the GPU, the decode steps' on the CPU)."""
    aset = _adapter_set(tmp_path, "deepseek_v2", device="cuda", dtype="float32", stream_min_tokens=stream_min_tokens)
    streamer = next(iter(aset.experts.values())).streamer
    assert (streamer is not None) == bool(stream_min_tokens)
    _check_mixed_equals_lone(aset, "deepseek_v2", streamer)


def _check_mixed_equals_lone(aset: AdapterSet, arch: str, streamer) -> None:
    if arch == "llama4_text":
        prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38], [46, 26, 43, 38, 32]]
    else:
        prompts = [[3, 14, 15, 92, 65, 35, 89], [79, 32, 38], [46, 26, 43, 38, 32, 79, 50, 28, 84]]
    rows = [None, "alpha", "beta"]
    mixed = _run(aset, prompts, rows)
    if streamer is not None:  # the prefill: every layer acquired once per adapter group, copied once
        assert streamer.stats.hits + streamer.stats.copies == 3 * len(aset.experts)
    for i, (prompt, adapter) in enumerate(zip(prompts, rows)):
        alone = _run(aset, [prompt], [adapter])[0]
        err = (mixed[i] - alone).abs().max().item()
        assert err <= ATOL, (adapter, err)
        if adapter is not None:  # the adapter changes this row by far more than the tolerance
            assert (alone - _run(aset, [prompt], [None])[0]).abs().max().item() > 100 * ATOL
    # the rows are also independent of their order and of repeats of an adapter
    again = _run(aset, [prompts[2], prompts[0], prompts[1], prompts[2]], ["beta", None, "alpha", "beta"])
    for got, want in zip(again, [mixed[2], mixed[0], mixed[1], mixed[2]]):
        assert (got - want).abs().max().item() <= ATOL
    # back to one adapter for every row: the plain paths, no per-row state left behind
    aset.use(["alpha", "alpha"])
    assert aset._rows is None and all(ex.row_lora is None for ex in aset.experts.values())


def test_mixed_linear_lora_equals_peft_adapter_names(adapter_sets):
    """Our per-row Linear LoRA (hybridmoe.serve.mixed_lora: base layer + each adapter's LoRA where its rows are) ==
    PEFT's own mixed-batch path (``adapter_names``, ``_mixed_batch_forward``) on the whole model, with the same
    per-row expert LoRA: deepseek_v2, whose LoRA layers all see [B, T, ...] inputs (PEFT's path needs one name per
    input row), three left-padded rows. The two differ only in matmul shapes (PEFT gathers each adapter's rows)."""
    aset = adapter_sets("deepseek_v2")
    ids, mask, positions = padded_inputs([[3, 14, 15, 92, 65, 35, 89], [79, 32, 38], [46, 26, 43, 38, 32, 79, 50]])
    rows = [None, "alpha", "beta"]
    try:
        with torch.inference_mode():
            aset.use(rows)
            ours = aset.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # [3, W, V]
            row_lora = {n: ex.row_lora for n, ex in aset.experts.items()}
            aset.activate("alpha")  # PEFT's path needs every LoRA layer enabled; our hooks are off outside use()
            for n, ex in aset.experts.items():
                ex.row_lora = row_lora[n]
            names = ["__base__", aset._peft_name["alpha"], aset._peft_name["beta"]]
            ref = aset.model(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=names).logits
    finally:
        aset.use([None])
    real = mask.bool()  # padding slots compute garbage in both; compare the real tokens
    err = (ours[real] - ref[real]).abs().max().item()
    assert err <= ATOL, err
    assert (ours[1][real[1]] - ours[0][real[1]]).abs().max().item() > 100 * ATOL  # (rows differ: LoRA matters)


def test_row_lora_groups_tokens_and_is_inference_only(adapter_sets):
    """RowLoRA: rows with the same LoRA objects (or none) share a group; tokens of a flattened [B·T] batch map to
    their row; a forward with gradients is refused (autograd's backward would read the wrong LoRA)."""
    aset = adapter_sets("deepseek_v2")
    name, ex = next(iter(aset.experts.items()))
    a, b = aset.expert_lora["alpha"][name], aset.expert_lora["beta"][name]
    rl = RowLoRA([{}, a, dict(a), b, {}])  # a copy of a's dict holds the same LoRA objects: the same group
    assert rl.row_group.tolist() == [0, 1, 1, 2, 0] and rl.loras[0] == {}
    assert rl.token_groups(10).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 0, 0]
    with pytest.raises(RuntimeError, match="row-major"):
        rl.token_groups(7)
    aset.use([None])
    x = torch.randn(5, ex.spec.hidden_dim, requires_grad=True)
    ids = torch.zeros(5, 2, dtype=torch.long)
    ids[:, 1] = 1
    ex.row_lora = rl
    try:
        with pytest.raises(RuntimeError, match="inference only"):
            ex(x, ids, torch.full((5, 2), 0.5))
        assert ex.lora == {}  # nothing swapped in was left behind
    finally:
        ex.row_lora = None


def test_row_lora_on_experts_block_equals_group_alone(adapter_sets):
    """One experts block, straight: tokens of three groups in one call == each group's tokens called alone with its
    LoRA (bit for bit: each group runs the same call on the same rows)."""
    aset = adapter_sets("deepseek_v2")
    name, ex = next(iter(aset.experts.items()))
    loras = [{}, aset.expert_lora["alpha"][name], aset.expert_lora["beta"][name]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, ex.spec.hidden_dim, generator=g)
    ids = torch.randint(0, ex.num_experts, (6, 2), generator=g)
    w = torch.rand(6, 2, generator=g)
    aset.use([None])
    try:
        with torch.inference_mode():
            ex.row_lora = RowLoRA(loras)  # 3 rows x 2 tokens
            got = ex(x, ids, w)
            ex.row_lora = None
            for r, lora in enumerate(loras):
                ex.lora = lora
                want = ex(x[2 * r : 2 * r + 2], ids[2 * r : 2 * r + 2], w[2 * r : 2 * r + 2])
                assert torch.equal(got[2 * r : 2 * r + 2], want)
            ex.lora = loras[1]
            assert not torch.equal(ex(x[:2], ids[:2], w[:2]), got[:2])  # the LoRA matters for these tokens
    finally:
        ex.lora, ex.row_lora = {}, None  # the base model, as aset.use([None]) left it
    assert isinstance(ex, HybridExperts)
