"""Generation loop: greedy equals ``model.generate``, seeded sampling, streaming, stop strings, EOS, NaN handling."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from hybridmoe.errors import ConfigError, NonFiniteError
from hybridmoe.generation import (
    IncrementalDecoder,
    SamplingConfig,
    apply_repetition_penalty,
    apply_top_p,
    generate,
    sample,
)

VOCAB = 160
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, matching pad/bos/eos below
PROMPT = "w10 w57 w33 w91 w12 w140 w77"
N = 16


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer: specials then words w4..w{vocab_size-1}; decodes as space-joined words."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_model(seed: int = 0, vocab_size: int = VOCAB):
    """Tiny random Qwen3-MoE, fp32, eval; weights ~N(0, 0.1) so next-token distributions are peaked, not flat."""
    config = AutoConfig.for_model("qwen3_moe", vocab_size=vocab_size, hidden_size=32, intermediate_size=40,
                                  moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return tok(PROMPT, return_tensors="pt").input_ids  # [1, 7]


@pytest.fixture(scope="module")
def full(model, tok, prompt_ids):
    """Greedy reference run (no stop strings, default EOS)."""
    return _greedy(model, tok, prompt_ids)


def _greedy(model, tok, prompt_ids, n=N, **kw):
    return generate(model, tok, prompt_ids, SamplingConfig(max_new_tokens=n, temperature=0, **kw))


def _hf_greedy(model, prompt_ids, n=N, **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt_ids, do_sample=False, max_new_tokens=n, **kw)
    return out[0, prompt_ids.shape[1]:].tolist()


# --- greedy ---------------------------------------------------------------------------------------------------------


def test_greedy_equals_model_generate(model, tok, prompt_ids, full):
    res = full
    ref = _hf_greedy(model, prompt_ids)
    assert res.token_ids == ref
    assert len(set(ref)) > 3, "degenerate test model: greedy output should not be one repeated token"
    assert res.prompt_tokens == prompt_ids.shape[1] and res.new_tokens == len(res.token_ids)
    if 2 not in ref:
        assert res.stop_reason == "length" and res.new_tokens == N
    assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def test_greedy_with_repetition_penalty_equals_model_generate(model, tok, prompt_ids, full):
    res = _greedy(model, tok, prompt_ids, repetition_penalty=1.7)
    assert res.token_ids == _hf_greedy(model, prompt_ids, repetition_penalty=1.7)
    assert res.token_ids != full.token_ids, "penalty should change this output, or the test proves nothing"


def test_prompt_as_list_or_1d(model, tok, prompt_ids):
    a = _greedy(model, tok, prompt_ids, n=6)
    b = _greedy(model, tok, prompt_ids[0].tolist(), n=6)
    c = _greedy(model, tok, prompt_ids[0], n=6)
    assert a.token_ids == b.token_ids == c.token_ids


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2"])
def test_hybrid_model_greedy_equals_transformers(tiny_ckpt, arch):
    """The real target: our loader's hybrid model (experts on CPU modules) against plain transformers."""
    from hybridmoe.loading import load_model

    path = tiny_ckpt(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hyb = load_model(path, device="cpu", dtype="float32", progress=False)
    tok = make_tokenizer(ref.config.vocab_size)
    ids = torch.tensor([[3, 60, 14, 120, 9]])  # a prompt for which neither tiny model just repeats one token
    res = generate(hyb, tok, ids, SamplingConfig(max_new_tokens=16, temperature=0))
    assert res.token_ids == _hf_greedy(ref, ids, n=16)
    assert len(set(res.token_ids)) > 3


# --- sampling -------------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model, tok, prompt_ids, full):
    cfg = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.95, seed=1234)
    torch.manual_seed(0)
    a = generate(model, tok, prompt_ids, cfg)
    torch.manual_seed(99)  # the global RNG must not matter
    b = generate(model, tok, prompt_ids, cfg)
    assert a.token_ids == b.token_ids
    other = generate(model, tok, prompt_ids, SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.95, seed=1))
    assert other.token_ids != a.token_ids, "a different seed should give a different sample"
    assert a.token_ids != full.token_ids, "temperature 1 should not reproduce greedy"


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_equal_greedy(model, tok, prompt_ids, full, kw):
    res = generate(model, tok, prompt_ids, SamplingConfig(max_new_tokens=N, temperature=1.5, seed=3, **kw))
    assert res.token_ids == full.token_ids


def test_sample_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda cfg: {int(sample(logits, cfg, g)) for _ in range(300)}  # noqa: E731
    assert draws(SamplingConfig(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingConfig(temperature=1.0, top_p=0.5)) == {0}
    assert draws(SamplingConfig(temperature=1.0, top_p=0.7)) == {0, 1}
    assert draws(SamplingConfig(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(SamplingConfig(temperature=1e-30)) == {0}  # tiny temperature: no overflow, just greedy
    assert draws(SamplingConfig(temperature=0)) == {0}


def test_top_p_keeps_at_least_one_and_restores_order():
    logits = torch.tensor([[1.0, 5.0, 2.0]])
    out = apply_top_p(logits, 0.01)
    assert torch.isinf(out).tolist() == [[True, False, True]]
    out = apply_top_p(logits, 0.99)
    assert torch.isfinite(out).tolist() == [[True, True, True]]


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 4.0]]
    assert logits.tolist() == [[2.0, -2.0, 1.0, 4.0]], "input must not be modified"


# --- streaming, stop strings, EOS -----------------------------------------------------------------------------------


def test_streaming_deltas_concatenate_to_text(model, tok, prompt_ids):
    deltas: list[str] = []
    res = generate(model, tok, prompt_ids, SamplingConfig(max_new_tokens=N, temperature=0.8, seed=5),
                   on_text=deltas.append)
    assert len(deltas) > 3 and all(deltas)
    assert "".join(deltas) == res.text
    assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def test_stop_string_trims_and_stops(model, tok, prompt_ids, full):
    words = full.text.split(" ")
    k = next(i for i in range(3, len(words)) if words[i] not in words[:i])  # first fresh word from the 4th on
    stop = f" {words[k]}"
    deltas: list[str] = []
    res = generate(model, tok, prompt_ids, SamplingConfig(max_new_tokens=N, temperature=0, stop_strings=[stop]),
                   on_text=deltas.append)
    assert res.stop_reason == "stop_string"
    assert res.text == " ".join(words[:k])
    assert res.token_ids == full.token_ids[:k + 1]  # stopped at the token that completed the stop string
    assert "".join(deltas) == res.text
    assert not any(words[k] in d for d in deltas), "the stop string must never be streamed"


def test_eos_stops(model, tok, prompt_ids, full):
    k = next(i for i in range(2, len(full.token_ids)) if full.token_ids[i] not in full.token_ids[:i])
    eos_id = full.token_ids[k]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [2, eos_id]
    try:
        res = _greedy(model, tok, prompt_ids)
        ref = _hf_greedy(model, prompt_ids)
    finally:
        model.generation_config.eos_token_id = old
    assert res.stop_reason == "eos"
    assert res.token_ids == full.token_ids[:k + 1] == ref  # EOS included in ids, like model.generate
    assert res.text == tok.decode(full.token_ids[:k], skip_special_tokens=True)


class ByteTokenizer:
    """Decodes ids as raw UTF-8 bytes (like byte-level BPE), so partial characters come out as U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_holds_back_partial_characters_and_stop_prefixes():
    text = "héllo 世界, wörld。END tail"
    dec = IncrementalDecoder(ByteTokenizer(), stop_strings=["。END", "zzz"])
    deltas = [dec.add(b) for b in text.encode()]
    deltas.append(dec.flush())
    assert dec.stopped
    assert dec.text == "héllo 世界, wörld"
    assert "".join(deltas) == dec.text
    assert not any("\ufffd" in d for d in deltas)
    # "。" is a prefix of the stop string: it is held back, never emitted, even before "END" arrives
    assert not any("。" in d for d in deltas)


def test_incremental_decoder_flushes_held_back_prefix_at_the_end():
    dec = IncrementalDecoder(ByteTokenizer(), stop_strings=["abc"])
    deltas = [dec.add(b) for b in b"xxab"]
    assert "".join(deltas) == "xx"
    assert dec.flush() == "ab" and not dec.stopped and dec.text == "xxab"


# --- non-finite logits ----------------------------------------------------------------------------------------------


def test_nan_lm_head_raises_nonfinite_error_not_multinomial(tok, prompt_ids):
    bad = make_model()
    with torch.no_grad():
        bad.lm_head.weight[7, 3] = float("nan")
    # Sanity: without the check, sampling would die in torch.multinomial (the seed's bug 5).
    with torch.no_grad():
        probs = torch.softmax(bad(prompt_ids).logits[0, -1], -1)
    with pytest.raises(RuntimeError, match="inf|nan"):
        torch.multinomial(probs, 1)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.7, seed=0)
    with pytest.raises(NonFiniteError) as ei:
        generate(bad, tok, prompt_ids, cfg, diagnose=lambda: "adapter has 534 NaN tensors: self_attn 216")
    msg = str(ei.value)
    assert "generated token 1 " in msg and "hybridmoe inspect" in msg
    assert "adapter has 534 NaN tensors: self_attn 216" in msg
    with pytest.raises(NonFiniteError):  # greedy too: argmax of NaN must not silently pick a token
        generate(bad, tok, prompt_ids, SamplingConfig(max_new_tokens=8, temperature=0))


def test_nan_at_a_later_step_names_that_step(tok, prompt_ids):
    model = make_model()
    full = _greedy(model, tok, prompt_ids)
    seen = set(prompt_ids[0].tolist())
    k = next(i for i, t in enumerate(full.token_ids) if t not in seen and t not in full.token_ids[:i])
    with torch.no_grad():  # NaN embedding for the k-th generated token: logits go NaN once it is fed back in
        model.get_input_embeddings().weight[full.token_ids[k]] = float("nan")
    with pytest.raises(NonFiniteError, match=f"generated token {k + 2} ") as ei:
        _greedy(model, tok, prompt_ids)
    assert "hybridmoe inspect" in str(ei.value)


def test_sample_rejects_nan_directly():
    with pytest.raises(NonFiniteError):
        sample(torch.tensor([[0.0, float("nan")]]), SamplingConfig(temperature=1.0, seed=0), torch.Generator())


# --- config validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, flag", [
    (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"), (dict(top_p=float("nan")), "--top-p"),
    (dict(temperature=-0.1), "--temperature"), (dict(temperature=float("inf")), "--temperature"),
    (dict(top_k=-1), "--top-k"), (dict(top_k=2.5), "--top-k"),
    (dict(max_new_tokens=0), "--max-new-tokens"), (dict(max_new_tokens=True), "--max-new-tokens"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"), (dict(seed=-1), "--seed"), (dict(seed="1"), "--seed"),
    (dict(stop_strings=[""]), "stop strings"),
])
def test_invalid_sampling_values_raise_config_error(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        SamplingConfig(**kw)


def test_config_revalidated_in_generate(model, tok, prompt_ids):
    cfg = SamplingConfig()
    cfg.top_p = 2.0
    with pytest.raises(ConfigError, match="--top-p must be in"):
        generate(model, tok, prompt_ids, cfg)


def test_single_stop_string_is_not_split_into_characters():
    assert SamplingConfig(stop_strings="</answer>").stop_strings == ("</answer>",)


def test_decode_speed_leaves_out_the_decoders_one_time_setup():
    """chat -v and generate's decode tokens/s: the tokens after the first, less the steps the static-cache decoder
    spent setting up (its eager first step and the CUDA-graph capture), over the decode time less that setup."""
    from hybridmoe.generation import GenerationResult

    res = GenerationResult([], "", "length", prompt_tokens=4, new_tokens=10, prefill_s=0.1, decode_s=0.5,
                           setup_s=2.0, setup_steps=2)
    assert res.decode_tokens_per_s == 14.0  # (10 - 1 - 2) / 0.5
    assert GenerationResult([], "", "length", 4, 3, 0.1, 0.5, setup_steps=2).decode_tokens_per_s == 0.0
