"""A lone request in the server decodes through the static-cache decoder (hybridmoe.serve.batch: ``graphs``), as
``hybridmoe chat`` does on CUDA (there: CUDA graphs), and rows joining or leaving switch the batch back to the padded
DynamicCache. On the CPU the static decoder runs eagerly: the same cache hand-over runs for real.

Reference: the same decode steps with the padded DynamicCache only (``graphs`` off). fp32; logits within 1e-5
relative (the static path's explicit mask against the dynamic cache's, as in tests/test_decode_graph).
"""

from __future__ import annotations

import pytest
import torch

import hybridmoe
from hybridmoe.adapters import apply_lora, save_adapter
from hybridmoe.serve.adapters import AdapterSet
from hybridmoe.serve.prefill import prefill_batch

from .helpers import make_checkpoint, randomize_lora


@pytest.fixture(scope="module")
def aset(tmp_path_factory):
    model, _ = hybridmoe.load(make_checkpoint("deepseek_v2", tmp_path_factory.mktemp("solo")), device="cpu",
                              dtype="float32", progress=False)
    return AdapterSet(model)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _lone_steps(aset: AdapterSet, prompt: list[int], graphs: bool, steps: int, room: int, after_step=None):
    """One request alone: its prefill, then `steps` greedy decode steps with `graphs` on or off; (the logits of every
    step, the batch). after_step(batch) runs after each step."""
    out = []
    with torch.inference_mode():
        aset.use([None])
        logits, batch = prefill_batch(aset.model, [prompt], capacity=1)
        batch.graphs = graphs
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(steps):
            logits = batch.step(tok, room=room)
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
            if after_step is not None:
                after_step(batch)
    return out, batch


def _same_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def _script(aset: AdapterSet, graphs: bool) -> list[torch.Tensor]:
    """Request A alone for 4 steps, then B joins (2 steps together), then A leaves and B goes on alone for 3 steps:
    the logits of every step, in order."""
    a_prompt, b_prompt = list(range(5, 17)), list(range(30, 37))
    out = []
    with torch.inference_mode():
        aset.use([None])
        logits, batch = prefill_batch(aset.model, [a_prompt], capacity=4)
        batch.graphs = graphs
        tok = logits.argmax(-1, keepdim=True)  # [1, 1]
        for _ in range(4):
            logits = batch.step(tok, room=16)
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
        if graphs:
            assert batch.solo is not None and batch.cache is None  # the lone row lives in the static decoder
        b_logits, b_batch = prefill_batch(aset.model, [b_prompt], capacity=1)
        batch.join(b_batch)  # the static cache goes back into a padded DynamicCache first
        assert batch.solo is None and len(batch) == 2
        tok = torch.cat([tok, b_logits.argmax(-1, keepdim=True)])  # [2, 1]
        for _ in range(2):
            logits = batch.step(tok, room=16)
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
        batch.remove([0])  # A leaves: B is lone again (its padding columns trimmed)
        tok = tok[1:]
        for _ in range(3):
            logits = batch.step(tok, room=16)
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
        if graphs:
            assert batch.solo is not None
    return out


def test_lone_rows_on_the_static_decoder_equal_the_padded_batch(aset):
    want = _script(aset, graphs=False)
    got = _script(aset, graphs=True)
    assert len(got) == len(want) == 9
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and _rel(g, w) < 1e-5, i
    dec = aset.model._hybridmoe_decoder
    assert dec.chain.calls > 0  # the decoder ran the lone steps


def test_a_lone_row_moves_to_a_larger_static_cache_when_its_own_is_full(aset, monkeypatch):
    """A reply longer than its decoder (a request without max_tokens gets SOLO_HEADROOM positions at a time): the
    positions move to a decoder twice the size and the logits stay those of the padded batch."""
    import hybridmoe.decode_graph as dg
    import hybridmoe.serve.batch as batch_module

    monkeypatch.setattr(batch_module, "SOLO_HEADROOM", 4)
    monkeypatch.setattr(dg, "_bucket", lambda n: n)  # decoders of exactly the size asked for
    dg.drop_decoder(aset.model)  # a larger one from another test would be reused
    prompt = list(range(5, 12))
    want, _ = _lone_steps(aset, prompt, False, 20, room=10_000)
    sizes = set()
    got, _ = _lone_steps(aset, prompt, True, 20, room=10_000,
                         after_step=lambda batch: batch.solo is not None and sizes.add(batch.solo.max_len))
    assert sizes == {12, 24, 48}, sizes  # 7 + 1 + 4, then doubled twice
    _same_logits(got, want)


def test_a_failing_static_decoder_leaves_the_row_on_the_padded_batch(aset, monkeypatch, caplog):
    """If the static decoder raises (a model or device it cannot take), the lone row goes on in the padded batch from
    the positions it had, with one warning, and the batch stops trying; the logits are the padded batch's."""
    import logging

    from hybridmoe.decode_graph import StaticDecoder

    prompt = list(range(5, 14))
    calls = {"n": 0}
    real_step = StaticDecoder.step

    def flaky(self, token, position):
        calls["n"] += 1
        if calls["n"] == 3:  # the third static step fails, after two went through
            raise RuntimeError("capture not supported here")
        return real_step(self, token, position)

    want, _ = _lone_steps(aset, prompt, False, 6, room=8)
    monkeypatch.setattr(StaticDecoder, "step", flaky)
    with caplog.at_level(logging.WARNING, logger="hybridmoe.serve"):
        got, batch = _lone_steps(aset, prompt, True, 6, room=8)
    assert calls["n"] == 3 and not batch.graphs and batch.solo is None
    assert sum("the static-cache decoder failed" in r.message for r in caplog.records) == 1
    _same_logits(got, want)


def test_loading_or_unloading_an_adapter_drops_the_captured_decoder(tmp_path):
    """A decoder's CUDA graphs hold the addresses of the adapters' weights: a runtime load or unload (even of the
    same served name) must not replay them."""
    from hybridmoe.adapters import apply_lora, save_adapter

    ckpt = make_checkpoint("deepseek_v2", tmp_path / "m")
    model, _ = hybridmoe.load(ckpt, device="cpu", progress=False)
    save_adapter(apply_lora(model, "all", rank=4, alpha=8, seed=0), tmp_path / "a")
    model, _ = hybridmoe.load(ckpt, device="cpu", dtype="float32", progress=False)
    aset = AdapterSet(model)
    aset.load("a", tmp_path / "a")
    with torch.inference_mode():
        aset.use(["a"])
        logits, batch = prefill_batch(aset.model, [list(range(5, 12))], capacity=1)
        batch.graphs = True
        batch.step(logits.argmax(-1, keepdim=True), room=4)
    dec = aset.model._hybridmoe_decoder
    aset.unload("a")
    assert aset.model._hybridmoe_decoder is None and dec.graphs is None and dec.cache is None  # closed
    aset.load("a", tmp_path / "a")
    assert getattr(aset.model, "_hybridmoe_decoder", None) is None


def test_a_failure_while_moving_to_a_larger_decoder_leaves_a_consistent_padded_batch(aset, monkeypatch):
    """The larger decoder cannot be made (e.g. out of memory): the row goes on in the padded batch, mask and all."""
    import hybridmoe.decode_graph as dg
    import hybridmoe.serve.batch as batch_module

    monkeypatch.setattr(batch_module, "SOLO_HEADROOM", 2)
    monkeypatch.setattr(dg, "_bucket", lambda n: n)
    dg.drop_decoder(aset.model)
    real, calls = dg.decoder_for, {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("no room for a larger static cache")
        return real(*args, **kwargs)

    prompt = list(range(5, 12))
    want, _ = _lone_steps(aset, prompt, False, 8, room=100)
    monkeypatch.setattr(dg, "decoder_for", second_fails)
    got, batch = _lone_steps(aset, prompt, True, 8, room=100)
    assert calls["n"] == 2 and not batch.graphs and batch.solo is None
    assert batch.mask.shape == (1, batch.lengths[0])
    _same_logits(got, want)


def test_lone_rows_of_the_base_model_and_of_an_adapter_get_their_own_decoders(tmp_path):
    """The server switches adapters layer by layer (and disables LoRA for the base model), while a PeftModel keeps
    naming the adapter it set last: the batch-1 decoder (whose CUDA graphs hold what ran at capture) is keyed by the
    LoRA the layers actually run, so base and adapter requests never replay each other's graphs; each keeps its
    decoder (no capture again at every switch)."""
    from hybridmoe.decode_graph import decoder_for

    path = make_checkpoint("deepseek_v2", tmp_path / "m")
    for seed, name in enumerate(("alpha", "beta"), start=1):
        model, _ = hybridmoe.load(path, device="cpu", dtype="float32", progress=False)
        peft_model = apply_lora(model, "q_proj,kv_b_proj", rank=4, alpha=8, seed=seed)  # Linear LoRA only
        randomize_lora(peft_model, seed, 0.2)
        save_adapter(peft_model, path / name)
    model, _ = hybridmoe.load(path, device="cpu", dtype="float32", progress=False)
    aset = AdapterSet(model)
    aset.load("alpha", path / "alpha")
    aset.load("beta", path / "beta")  # PEFT's model-level active adapter stays whichever it set last
    dev = torch.device("cpu")
    decoders = {}
    for name in ("alpha", None, "beta"):
        aset.use([name])
        decoders[name] = decoder_for(aset.model, 64, dev)
    assert len({id(d) for d in decoders.values()}) == 3 and len({d.key for d in decoders.values()}) == 3
    for name in ("alpha", "beta", None):
        aset.use([name])
        assert decoder_for(aset.model, 64, dev) is decoders[name]  # kept, graphs and all
