"""The static-cache decoder (hybridmoe.decode_graph): the same logits as transformers' DynamicCache decode.

On the CPU the decode step runs eagerly through the same cut at every routed-experts call (copy out, CPU experts,
copy back); on the GPU (`pytest -m gpu`) it is captured and replayed as CUDA graphs. fp32 throughout; the tolerance
(rel 1e-5) covers the static cache's explicit attention mask against the dynamic cache's causal kernel.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache

import hybridmoe
from hybridmoe.adapters import apply_lora
from hybridmoe.decode_graph import StaticDecoder
from hybridmoe.errors import NonFiniteError
from hybridmoe.experts import HybridExperts
from hybridmoe.generation import SamplingConfig, decode_one_token, generate, input_device, prefill
from hybridmoe.testing import TINY_ARCHS

from .conftest import DEVICES
from .helpers import randomize_lora


def _adapted(path, device):
    model, tok = hybridmoe.load(path, device=device, dtype="float32", progress=False)
    model = apply_lora(model, "all", rank=4, alpha=8, seed=0)  # LoRA on every target, routed experts included
    randomize_lora(model, seed=1)
    return model.eval(), tok


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@DEVICES
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_static_decoder_matches_dynamic_cache(arch, device, ckpt_dir):
    model, _ = _adapted(ckpt_dir(arch), device)
    dev = input_device(model)
    prompt = torch.arange(5, 25, device=dev).unsqueeze(0)  # [1, 20]
    with torch.inference_mode():
        want, cache = prefill(model, prompt, DynamicCache(config=model.config))
    dec = StaticDecoder(model, 64, dev)
    got = dec.prefill(prompt)
    assert _rel(got, want) < 1e-5
    token = want.argmax(-1)  # [1]
    for pos in range(20, 28):  # on CUDA: step 1 eager, step 2 captures, the rest replay
        with torch.inference_mode():
            want, cache = decode_one_token(model, token.view(1, 1), cache, pos)
        got = dec.step(token, pos)
        assert _rel(got, want) < 1e-5, (pos, dec.mode)
        token = want.argmax(-1)
    assert dec.mode == ("cuda_graphs" if device == "cuda" else "eager")
    moe_layers = sum(isinstance(m, HybridExperts) for m in model.modules())
    assert len(dec.cuts) == moe_layers  # one cut per MoE layer (dense layers have none)
    if device == "cuda":
        assert len(dec.graphs) == moe_layers + 1


def _share_decode_matches_dynamic_cache(path, share: float, device: str) -> StaticDecoder:
    """Six graph-decode steps with `share` of the experts on the compute device against transformers' dynamic cache
    (fp32 logits, 1e-5); returns the decoder."""
    model, _ = hybridmoe.load(path, device=device, dtype="float32", progress=False)
    dec = _decode_matches_dynamic_cache(model.eval(), share)
    k = dec.cuts[0].ids.shape[1]
    assert (dec.share.n if dec.share is not None else 0) == min(k, round(k * share))
    return dec


def _decode_matches_dynamic_cache(model, share: float) -> StaticDecoder:
    """Prefill of 20 tokens and six decode steps of the static decoder (GPU share `share`) against transformers'
    dynamic cache on the same model: fp32 logits within 1e-5 at every step; returns the decoder."""
    dev = input_device(model)
    prompt = torch.arange(5, 25, device=dev).unsqueeze(0)  # [1, 20]
    with torch.inference_mode():
        want, cache = prefill(model, prompt, DynamicCache(config=model.config))
    dec = StaticDecoder(model, 64, dev, gpu_share=share)
    assert _rel(dec.prefill(prompt), want) < 1e-5
    token = want.argmax(-1)
    for pos in range(20, 26):
        with torch.inference_mode():
            want, cache = decode_one_token(model, token.view(1, 1), cache, pos)
        got = dec.step(token, pos)
        assert _rel(got, want) < 1e-5, (pos, dec.mode)
        token = want.argmax(-1)
    assert dec.mode == ("cuda_graphs" if dev.type == "cuda" else "eager")
    return dec


@DEVICES
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("share", [0.5, 1.0])
def test_gpu_share_of_the_experts_matches_dynamic_cache(arch, share, device, ckpt_dir):
    """A share of each step's routed experts computed on the compute device (weights copied in) and the rest on the
    CPU: the same logits. share 1.0 leaves the CPU none. No LoRA on the experts (with it the share is off)."""
    _share_decode_matches_dynamic_cache(ckpt_dir(arch), share, device)


@DEVICES
@pytest.mark.parametrize("share", [0.0, 0.5])
def test_gpt_oss_biases_sinks_and_sliding_window_decode(share, device, tmp_path):
    """gpt-oss: expert biases and its clamped SwiGLU (the kernel on the CPU, the share on the device), attention
    sinks, sliding-window layers in the static cache (the window of 8 fills during the prompt): the same logits as
    transformers' dynamic cache, in CUDA graphs on a GPU."""
    from .helpers import make_zoo_checkpoint

    _share_decode_matches_dynamic_cache(make_zoo_checkpoint("gpt_oss", tmp_path / "gpt_oss"), share, device)


def test_gpu_share_is_off_with_expert_lora(ckpt_dir):
    model, _ = _adapted(ckpt_dir("deepseek_v2"), "cpu")
    dec = StaticDecoder(model, 64, torch.device("cpu"), gpu_share=0.5)
    assert dec.gpu_share == 0.0


@DEVICES
def test_decoder_is_reused_across_turns_and_grows(device, ckpt_dir):
    model, tok = _adapted(ckpt_dir("deepseek_v2"), device)
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    ids = list(range(5, 25))
    first = generate(model, tok, ids, cfg, static_cache=True)
    dec = model._hybridmoe_decoder
    again = generate(model, tok, ids, cfg, static_cache=True)  # the cache is reset in place; graphs replayed
    assert model._hybridmoe_decoder is dec and again.token_ids == first.token_ids
    assert first.token_ids == generate(model, tok, ids, cfg, static_cache=False).token_ids
    assert again.decode_mode == ("cuda_graphs" if device == "cuda" else "eager")
    long_ids = list(range(5, 5 + dec.max_len))  # does not fit: a larger decoder replaces it
    generate(model, tok, long_ids, SamplingConfig(temperature=0, max_new_tokens=2), static_cache=True)
    assert model._hybridmoe_decoder is not dec and model._hybridmoe_decoder.max_len > dec.max_len


@DEVICES
def test_nan_in_routed_expert_lora_is_named_not_sampled(device, ckpt_dir):
    """The seed's bug 5 on the static path: a NaN that only the CPU experts see still stops generation clearly."""
    model, tok = _adapted(ckpt_dir("qwen2_moe"), device)
    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    with torch.no_grad():
        experts[-1].lora["down_proj"].B.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        generate(model, tok, list(range(5, 25)), SamplingConfig(temperature=0, max_new_tokens=4), static_cache=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_uncapturable_model_decodes_eagerly_with_a_warning(ckpt_dir, caplog):
    """A forward that synchronises with the host cannot be captured: decode goes on eagerly, says so once, and gives
    the same tokens."""
    model, tok = _adapted(ckpt_dir("deepseek_v2"), "cuda")
    norm = model.get_base_model().model.norm
    plain = norm.forward

    def syncing(x):
        float(x.float().abs().sum())  # a device->host read: not allowed while a CUDA graph is being captured
        return plain(x)

    norm.forward = syncing
    cfg = SamplingConfig(temperature=0, max_new_tokens=6)
    ids = list(range(5, 25))
    want = generate(model, tok, ids, cfg, static_cache=False).token_ids
    with caplog.at_level(logging.WARNING, logger="hybridmoe.decode_graph"):
        res = generate(model, tok, ids, cfg, static_cache=True)
    assert res.decode_mode.startswith("eager (capture failed") and res.token_ids == want
    assert "without CUDA graphs" in caplog.text
    again = generate(model, tok, ids, cfg, static_cache=True)  # no second attempt, same tokens
    assert again.token_ids == want and again.decode_mode.startswith("eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen2_moe"])
def test_compiled_stretches_decode_matches_dynamic_cache(arch, ckpt_dir):
    """settings.compile_decode: the GPU stretches between the cuts run torch.compile'd forwards (captured into the
    graphs), with the same logits as transformers' dynamic cache (fp32, 1e-5); prefill keeps the model's own."""
    from hybridmoe.decode_compile import stretch_modules

    model, _ = hybridmoe.load(ckpt_dir(arch), device="cuda", dtype="float32", progress=False)
    model.hybridmoe.settings.compile_decode = True
    dec = _decode_matches_dynamic_cache(model.eval(), 0.0)
    assert dec.chain.compiled and len(dec.chain.compiled) == len(stretch_modules(model))
    assert all("forward" not in vars(m) for m, _ in dec.chain.compiled)  # the model's own forwards outside the step


def test_compiled_forwards_stand_in_during_the_decode_step_only(ckpt_dir):
    """The chain's compiled forwards (here recording stand-ins for torch.compile's, which needs CUDA to be used) run
    for every stretch module during a decode step, the logits are the plain step's, and outside the step (prefill)
    the model's own forwards run."""
    from hybridmoe.decode_compile import stretch_modules

    model, _ = hybridmoe.load(ckpt_dir("deepseek_v2"), device="cpu", dtype="float32", progress=False)
    model.eval()
    prompt = torch.arange(5, 25).unsqueeze(0)
    plain = StaticDecoder(model, 64, torch.device("cpu"))
    want = [plain.prefill(prompt)]
    want.append(plain.step(want[-1].argmax(-1), 20))
    calls = []

    def recording(m):
        own = m.forward

        def fwd(*a, **kw):
            calls.append(m)
            return own(*a, **kw)
        return fwd

    dec = StaticDecoder(model, 64, torch.device("cpu"))
    dec.chain.compiled = [(m, recording(m)) for m in stretch_modules(model)]
    got = dec.prefill(prompt)
    assert not calls and torch.equal(got, want[0])  # prefill: the model's own forwards
    assert torch.equal(dec.step(got.argmax(-1), 20), want[1])
    assert {id(m) for m in calls} == {id(m) for m, _ in dec.chain.compiled}
    assert all("forward" not in vars(m) for m, _ in dec.chain.compiled)


def test_one_compiled_attention_serves_every_layer(monkeypatch, tmp_path):
    """compile_decode's compiled forwards, traced for real (dynamo with its eager backend: the guards and graphs are
    the real ones, only inductor's code generation is left out; CUDA is not needed): the cache update runs outside the
    compiled code and the layer index is symbolic, so the number of compiled graphs does not grow with the depth (it
    grew by one attention a layer), and the logits are the plain step's."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    from hybridmoe import decode_compile

    from .helpers import make_checkpoint

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    graphs = {}
    for layers in (2, 5):
        model, _ = hybridmoe.load(make_checkpoint("deepseek_v2", tmp_path / f"l{layers}", num_hidden_layers=layers),
                                  device="cpu", dtype="float32", progress=False)
        model.eval()
        prompt = torch.arange(5, 25).unsqueeze(0)
        plain = StaticDecoder(model, 64, torch.device("cpu"))
        want = plain.step(plain.prefill(prompt).argmax(-1), 20)
        dec = StaticDecoder(model, 64, torch.device("cpu"))
        dec.chain.compiled, dec.chain.cache = decode_compile.compile_pairs(model), dec.cache  # as on CUDA
        torch._dynamo.reset()
        counters.clear()
        got = dec.step(dec.prefill(prompt).argmax(-1), 20)
        graphs[layers] = counters["stats"]["unique_graphs"]
        assert torch.allclose(got, want, atol=1e-6, rtol=0), layers
        assert "update" not in vars(dec.cache)  # the cache's own update outside the step
    assert graphs[5] == graphs[2] > 0, graphs


def test_compiled_stretches_are_the_modules_beside_the_routed_experts(ckpt_dir):
    """What settings.compile_decode compiles: in every decoder layer the modules without routed experts (attention,
    norms, a dense layer's MLP) and the MoE block's other children (router, shared experts), never the experts."""
    from hybridmoe.decode_compile import stretch_modules

    model, _ = hybridmoe.load(ckpt_dir("deepseek_v2"), device="cpu", dtype="float32", progress=False)
    mods = stretch_modules(model)
    layers = model.model.layers
    assert not any(isinstance(m, HybridExperts) or any(isinstance(c, HybridExperts) for c in m.modules())
                   for m in mods)
    for layer in layers:
        assert layer.self_attn in mods and layer.input_layernorm in mods and layer.post_attention_layernorm in mods
    moe = [layer.mlp for layer in layers if hasattr(layer.mlp, "experts")]
    assert moe and all(b.gate in mods and b.shared_experts in mods for b in moe)
    assert all(layer.mlp in mods for layer in layers if not hasattr(layer.mlp, "experts"))  # a dense layer's MLP


def test_a_step_at_the_wrong_position_is_refused(ckpt_dir):
    """The static cache writes where its own counter says and RoPE uses the given position: they must agree."""
    model, _ = _adapted(ckpt_dir("deepseek_v2"), "cpu")
    dec = StaticDecoder(model, 32, torch.device("cpu"))
    logits = dec.prefill(torch.arange(5, 15).unsqueeze(0))  # 10 positions
    with pytest.raises(ValueError, match="position 11, but the cache holds 10 of 32"):
        dec.step(logits.argmax(-1), 11)
    dec.step(logits.argmax(-1), 10)
    assert dec.length == 11


def test_capturable_eager_mask_equals_transformers_and_is_restored():
    """The eager-attention mask used while a decode step is captured (a fill instead of a host->device scalar copy)
    is transformers' own, value for value, for causal and sliding-window masks; the override ends with the capture."""
    from transformers import masking_utils as mu

    from hybridmoe.decode_graph import _eager_mask, capturable_eager_mask

    for kw in (dict(batch_size=1, q_length=1, kv_length=64, q_offset=20), dict(batch_size=2, q_length=5, kv_length=16)):
        for fn in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(8)):
            for dtype in (torch.float32, torch.bfloat16):
                want = mu.eager_mask(mask_function=fn, dtype=dtype, **kw)
                assert torch.equal(_eager_mask(mask_function=fn, dtype=dtype, **kw), want)
    masks = mu.ALL_MASK_ATTENTION_FUNCTIONS
    with capturable_eager_mask():
        assert masks["eager"] is _eager_mask
    assert masks["eager"] is mu.eager_mask and "eager" not in masks._local_mapping



@DEVICES
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("resident", [1, 99])
def test_resident_layers_decode_inside_the_step_without_a_cut(arch, resident, device, ckpt_dir):
    """Resident expert layers (``resident_expert_layers``) are computed on the device inside the decode step: no cut
    at them (on CUDA: inside the captured graphs), the other layers cut as usual with a GPU share of 0.5; the same
    logits as transformers' dynamic cache (fp32, 1e-5). 99 keeps every layer resident: one graph, no CPU experts."""
    from hybridmoe.experts.streaming import enable_streaming

    if device == "cuda":
        model, _ = hybridmoe.load(ckpt_dir(arch), device=device, dtype="float32", progress=False,
                                  resident_expert_layers=resident)
    else:  # no GPU: the streamer's "device" is the CPU (host copies), which runs the same code
        model, _ = hybridmoe.load(ckpt_dir(arch), device=device, dtype="float32", progress=False)
        enable_streaming(model, "cpu", min_tokens=0, resident=resident)
    moe_layers = sum(isinstance(m, HybridExperts) for m in model.modules())
    dec = _decode_matches_dynamic_cache(model.eval(), 0.5)
    assert len(dec.cuts) == max(0, moe_layers - resident)
    if device == "cuda":
        assert len(dec.graphs) == len(dec.cuts) + 1
