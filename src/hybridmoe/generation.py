"""Token generation for any transformers causal LM (batch size 1), split like gpt-fast.

* :func:`prefill` runs the prompt through the model once and fills a :class:`~transformers.DynamicCache`.
* :func:`decode_one_token` feeds one token and returns the next-token logits.
* :func:`sample` turns logits into a token: repetition penalty -> temperature -> top-k -> top-p -> multinomial
  (on the CPU, with a seeded :class:`torch.Generator`), or argmax when ``temperature == 0``.
* :func:`generate` ties them together with EOS / stop-string / length stopping, streaming of decoded text and a
  non-finite check of the logits at every step (the seed's bug 5: chat must name NaN weights, not die inside
  ``torch.multinomial``).

The model is a black box: ``model(input_ids=..., past_key_values=..., use_cache=True, position_ids=...,
attention_mask=...)`` must return ``.logits`` and ``.past_key_values``. The inputs mirror what
``model.generate(do_sample=False)`` passes, so greedy output is token-for-token identical to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from hybridmoe.errors import ConfigError, NonFiniteError
from hybridmoe.forward_args import forward_params

__all__ = [
    "GenerationResult",
    "IncrementalDecoder",
    "SamplingConfig",
    "TokenStream",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "decode_one_token",
    "eos_token_ids",
    "forward_step",
    "generate",
    "input_device",
    "prefill",
    "sample",
]

StopReason = Literal["eos", "stop_string", "length"]


# --------------------------------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` mean off.

    Values are checked on construction (and again by :func:`generate`); a bad one raises :class:`ConfigError`
    naming the CLI flag.
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line naming the flag) for any out-of-range value."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be a finite number > 0 (1 = off), got "
                              f"{self.repetition_penalty!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ConfigError(f"--seed must be an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.stop_strings, str):  # a lone string would otherwise be split into characters
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")


@dataclass
class GenerationResult:
    """Outcome of :func:`generate`.

    ``token_ids`` are the generated ids (prompt excluded); like ``model.generate`` they include the EOS token when
    ``stop_reason == "eos"``. ``text`` is their decoding without special tokens, trimmed before a stop string.
    ``prefill_s`` is the time to the first token, ``decode_s`` the time for the rest, less ``setup_s``: the one-time
    work of the static-cache decoder in this call (its eager first step and the CUDA-graph capture, ``setup_steps``
    tokens), which a later call reusing the decoder does not pay.
    """

    token_ids: list[int]
    text: str
    stop_reason: StopReason
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_mode: str = "dynamic_cache"  # or "cuda_graphs" / "eager": the static-cache decoder (decode_graph)
    setup_s: float = 0.0
    setup_steps: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first (less the setup steps) per second of ``decode_s`` (0 when there
        were none)."""
        n = self.new_tokens - 1 - self.setup_steps
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------------------------


def input_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's input embeddings (where ``input_ids`` must go)."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None and hasattr(emb, "out_device"):  # HostEmbedding: looks up on the CPU, outputs on the GPU
        return emb.out_device
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def forward_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """One forward of ``input_ids`` [B, T] after the ``cache``; returns (last logits [B, V] fp32, cache).

    ``attention_mask`` [B, past + T] (1 = real token, 0 = padding) and ``position_ids`` [B, T] are what
    ``GenerationMixin.generate`` passes; ``logits_to_keep=1`` is added where supported. The batch-1 path
    (:func:`prefill`, :func:`decode_one_token`) and the server's padded batches (``hybridmoe.serve.batch``) share it.
    """
    t = input_ids.shape[1]
    past = attention_mask.shape[1] - t
    accepted = forward_params(model)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,  # [B, T]
        "past_key_values": cache,
        "use_cache": True,
        "attention_mask": attention_mask,  # [B, past + T]
        "position_ids": position_ids,  # [B, T]
    }
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = 1  # prefill: don't materialise [T, V] logits
    if "cache_position" in accepted:  # older / remote-code models
        kwargs["cache_position"] = torch.arange(past, past + t, device=input_ids.device)  # [T]
    out = model(**kwargs)
    logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)  # [B, V], detached from the big prefill tensor
    new_cache = getattr(out, "past_key_values", None)
    return logits, (new_cache if new_cache is not None else cache)


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any, start: int) -> tuple[torch.Tensor, Any]:
    """One forward of ``input_ids`` [1, T] at positions ``start .. start+T-1``; returns (last logits [1, V] fp32, cache).

    An all-ones attention mask over cache + new tokens and consecutive position ids, as ``model.generate`` passes
    for one sequence, so results are bitwise those of ``model.generate``.
    """
    device = input_ids.device
    t = input_ids.shape[1]
    mask = torch.ones(1, start + t, dtype=torch.long, device=device)  # [1, past + T]
    positions = torch.arange(start, start + t, device=device).unsqueeze(0)  # [1, T]
    return forward_step(model, input_ids, cache, mask, positions)


@torch.inference_mode()
def prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """Run the whole prompt ``input_ids`` [1, T] (on the model's input device) into an empty ``cache``.

    Returns the logits for the first new token, [1, V] float32, and the (filled) cache.
    """
    return _forward(model, input_ids, cache, start=0)


@torch.inference_mode()
def decode_one_token(model: torch.nn.Module, token: torch.Tensor, cache: Any, position: int) -> tuple[torch.Tensor, Any]:
    """Feed one token ``token`` [1, 1] at sequence index ``position`` (= tokens already in ``cache``).

    Returns the next-token logits [1, V] float32 and the cache.
    """
    return _forward(model, token, cache, start=position)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """EOS ids: ``tokenizer.eos_token_id`` plus ``model.generation_config.eos_token_id`` (an int or a list)."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value]))
    return ids


# --------------------------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, prev_tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: for every token in ``prev_tokens`` [B, S], divide its logit by ``penalty`` if positive, multiply
    if negative. ``logits`` [B, V] float; returns a new tensor."""
    if penalty == 1.0 or prev_tokens.numel() == 0:
        return logits
    prev = prev_tokens.to(logits.device)
    seen = torch.gather(logits, 1, prev)  # [B, S]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, prev, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of ``logits`` [B, V] (ties at the k-th value kept), set the rest to -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter on ``logits`` [B, V]: keep the smallest set of most likely tokens whose probability reaches
    ``top_p`` (always at least one), set the rest to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= top_p  # first token has mass_before == 0 < top_p: never dropped
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _nonfinite_summary(x: torch.Tensor) -> str:
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    return f"{nan} NaN and {inf} Inf of {x.numel()} values"


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
           prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token from ``logits`` [B, V] (or [V]); returns int64 ids [B] on ``logits.device``.

    Order: repetition penalty over ``prev_tokens`` [B, S] (prompt + generated), then greedy argmax when
    ``cfg.temperature == 0``, else temperature, top-k, top-p and ``torch.multinomial`` on the CPU with
    ``generator`` (a CPU generator, so a seed gives the same draws on every device). Non-finite input raises
    :class:`NonFiniteError` instead of reaching ``torch.multinomial``.
    """
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)  # [1, V]
    scores = logits.float()  # [B, V]
    if not bool(torch.isfinite(scores).all()):
        raise NonFiniteError(f"cannot sample from non-finite logits ({_nonfinite_summary(scores)})")
    if prev_tokens is not None:
        scores = apply_repetition_penalty(scores, prev_tokens.reshape(scores.shape[0], -1), cfg.repetition_penalty)
    if cfg.greedy:
        return torch.argmax(scores, dim=-1)  # [B]
    # Shift so the max is 0 before dividing: same softmax as scores / T, but a tiny T cannot overflow to +inf.
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / cfg.temperature
    scores = apply_top_k(scores, cfg.top_k)
    scores = apply_top_p(scores, cfg.top_p)
    probs = torch.softmax(scores, dim=-1).cpu()  # [B, V] on CPU: RNG stream independent of the device
    if not bool(torch.isfinite(probs).all()) or not bool((probs.sum(dim=-1) > 0).all()):
        raise NonFiniteError(f"sampling probabilities are not a distribution ({_nonfinite_summary(probs)})")
    next_ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # [B]
    return next_ids.to(logits.device)


# --------------------------------------------------------------------------------------------------------------------
# Incremental detokenisation with stop strings
# --------------------------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns a growing list of token ids into streamable text deltas.

    Every step decodes all ids so far (BPE merges and multi-byte characters come out right) and emits only the new
    suffix, holding back (a) trailing U+FFFD, an incomplete UTF-8 sequence that the next token may complete, and (b)
    any tail that could be the start of a stop string. When a stop string appears the text is cut before it and the
    stop string itself is never emitted. The deltas concatenate to :attr:`text`.
    """

    def __init__(self, tokenizer: Any, stop_strings: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""  # decoded text of self.ids (trimmed before a stop string once stopped)
        self.emitted = 0  # number of characters of self.text already handed out
        self.stopped = False

    def _find_stop(self) -> int | None:
        # A stop string can only start at or after `emitted`: anything earlier was checked not to be a stop prefix.
        hits = [i for s in self.stop_strings if (i := self.text.find(s, self.emitted)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self.text)
        while end > self.emitted and self.text[end - 1] == "\ufffd":
            end -= 1
        for j in range(self.emitted, end):  # earliest j whose tail could still become a stop string
            tail = self.text[j:end]
            if any(s.startswith(tail) for s in self.stop_strings):
                return j
        return end

    def _take(self, end: int) -> str:
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def add(self, token_id: int) -> str:
        """Append one token; returns the text that is now safe to show (possibly ""). Sets :attr:`stopped` when a
        stop string appeared (the text is then final)."""
        self.ids.append(int(token_id))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stop = self._find_stop()
        if stop is not None:
            self.text = self.text[:stop]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(self._safe_end())

    def flush(self) -> str:
        """Everything not yet emitted (held-back stop-string prefixes and trailing U+FFFD included)."""
        return self._take(len(self.text))


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


def _check_finite(logits: torch.Tensor, step: int, cfg: SamplingConfig, prompt_tokens: int,
                  diagnose: Callable[[], str | None] | None) -> None:
    """Raise :class:`NonFiniteError` if ``logits`` [1, V] (for generated token ``step``, 1-based) has NaN/Inf."""
    if bool(torch.isfinite(logits).all()):
        return
    where = "the prompt forward" if step == 1 else "a decode step"
    msg = (f"logits became non-finite at generated token {step} of {cfg.max_new_tokens} ({where}, prompt "
           f"{prompt_tokens} tokens; {_nonfinite_summary(logits)}); the likely cause is non-finite model or adapter "
           f"weights: run `hybridmoe inspect ADAPTER` to check the adapter")
    if diagnose is not None:
        try:
            detail = diagnose()
        except Exception as e:  # a failing diagnosis must not hide the real error
            detail = f"diagnosis failed: {type(e).__name__}: {e}"
        if detail:
            msg += f" ({detail})"
    raise NonFiniteError(msg)


def _as_prompt(input_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """Prompt ids as int64 [1, T] on ``device``; accepts [T], [1, T] or a list of ints."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"generate() takes one non-empty prompt of shape [T] or [1, T], got {tuple(ids.shape)}")
    return ids.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _EvalMode:
    """Context manager: eval mode for the duration (no dropout), then restore each module's own flag."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.training: list[torch.nn.Module] = []

    def __enter__(self) -> None:
        self.training = [m for m in self.model.modules() if m.training]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m in self.training:
            m.training = True


class TokenStream:
    """The per-sequence half of generation: sampling, stopping and text for one reply, whatever runs the model.

    Holds the sampling generator, the prompt + generated ids (for the repetition penalty) and the incremental text.
    :meth:`accept` takes the logits for the next token, checks them, samples, and updates the stop state; the caller
    feeds :attr:`last_id` back to the model while :attr:`stop_reason` is None. :func:`generate` drives one stream
    with batch-1 forwards; the server (``hybridmoe.serve``) drives many in one batched decode step.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prompt: torch.Tensor, cfg: SamplingConfig,
                 diagnose: Callable[[], str | None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.diagnose = diagnose
        self.n_prompt = prompt.shape[1]  # prompt: [1, T] int64 on the model's input device
        self.eos = eos_token_ids(model, tokenizer)
        self.generator = torch.Generator(device="cpu")
        if cfg.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(cfg.seed)
        # prompt + generated ids, for the repetition penalty: [1, T + max_new_tokens], filled as we go
        self.seq = torch.empty(1, self.n_prompt + cfg.max_new_tokens, dtype=torch.long, device=prompt.device)
        self.seq[:, :self.n_prompt] = prompt
        self.text = IncrementalDecoder(tokenizer, cfg.stop_strings)
        self.token_ids: list[int] = []
        self.last_id: torch.Tensor | None = None  # [1] int64 on the input device: the next input token
        self.stop_reason: StopReason | None = None

    @property
    def length(self) -> int:
        """Tokens so far, prompt + generated; :attr:`last_id` is fed back at position ``length - 1``."""
        return self.n_prompt + len(self.token_ids)

    def accept(self, logits: torch.Tensor) -> str:
        """Sample the next token from ``logits`` [1, V]; returns the text that became safe to show (maybe "").

        Raises :class:`NonFiniteError` naming the step if the logits hold NaN/Inf. Sets :attr:`stop_reason` at an
        EOS id (kept in :attr:`token_ids`, like ``model.generate``), a stop string, or ``max_new_tokens``.
        """
        step = len(self.token_ids) + 1
        _check_finite(logits, step, self.cfg, self.n_prompt, self.diagnose)
        length = self.length
        next_id = sample(logits, self.cfg, self.generator, self.seq[:, :length])  # [1]
        token = int(next_id.item())  # host sync: the token is needed for EOS, text and the next step
        return self._take(token, next_id, step)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that looks at the history or the grammar: the token is the argmax of the logits, which
        a batched caller may compute for many streams at once and hand in with :meth:`accept_argmax`."""
        return self.cfg.greedy and self.cfg.repetition_penalty == 1.0

    def accept_argmax(self, token: int, next_id: torch.Tensor) -> str:
        """What :meth:`accept` does for a :attr:`plain_greedy` stream whose logits the caller checked (finite) and
        took the argmax of: ``token`` (int) and ``next_id`` ([1] int64 on the device) are that argmax."""
        return self._take(token, next_id, len(self.token_ids) + 1)

    def _take(self, token: int, next_id: torch.Tensor, step: int) -> str:
        """Record the sampled ``token`` (``next_id`` [1] on the device) and update the stop state."""
        self.seq[0, self.length:self.length + 1] = next_id.to(self.seq.device)  # device to device: no host sync
        self.token_ids.append(token)
        self.last_id = next_id
        if token in self.eos:
            self.stop_reason = "eos"
            return ""
        delta = self.text.add(token)
        if self.text.stopped:
            self.stop_reason = "stop_string"
        elif self._complete():
            self.stop_reason = "eos"
        elif step == self.cfg.max_new_tokens:
            self.stop_reason = "length"
        return delta

    def _complete(self) -> bool:
        """Whether the reply is complete without an EOS token (the server's grammars); never here."""
        return False

    def flush(self) -> str:
        """The text held back so far (a possible stop-string prefix, trailing U+FFFD); call once when stopped."""
        return self.text.flush()


@torch.inference_mode()
def generate(model: torch.nn.Module, tokenizer: Any, input_ids: torch.Tensor | Sequence[int],
             cfg: SamplingConfig | None = None, on_text: Callable[[str], None] | None = None,
             diagnose: Callable[[], str | None] | None = None, static_cache: bool | None = None,
             cuda_graphs: bool = True) -> GenerationResult:
    """Generate a reply to ``input_ids`` ([T] or [1, T], already chat-templated).

    The KV cache: a fresh ``DynamicCache`` (token-for-token ``model.generate``), or with ``static_cache`` a
    ``StaticCache`` decoded by :class:`hybridmoe.decode_graph.StaticDecoder`, which on CUDA replays each decode step
    as CUDA graphs cut at the CPU experts (``cuda_graphs``). ``static_cache=None`` picks the static path for hybrid
    models on CUDA when prompt + ``max_new_tokens`` is at most ``STATIC_CACHE_MAX_TOKENS`` (the static cache is
    allocated for all of them up front, where a dynamic one grows only as far as the reply goes).

    Stops at an EOS id (:func:`eos_token_ids`), when the text contains one of ``cfg.stop_strings`` (trimmed off), or
    after ``cfg.max_new_tokens``. ``on_text(delta)`` receives the reply text as it becomes safe to show; the deltas
    concatenate to ``result.text``. If the logits of any step contain NaN/Inf, raises :class:`NonFiniteError` naming
    the step and, when given, the string returned by ``diagnose()`` (e.g. an adapter health summary).
    """
    from transformers import DynamicCache

    from hybridmoe.decode_graph import STATIC_CACHE_MAX_TOKENS, decoder_for
    from hybridmoe.experts import HybridExperts

    cfg = cfg if cfg is not None else SamplingConfig()
    device = input_device(model)
    prompt = _as_prompt(input_ids, device)  # [1, T]
    stream = TokenStream(model, tokenizer, prompt, cfg, diagnose)

    if static_cache is None:
        static_cache = (device.type == "cuda" and prompt.shape[1] + cfg.max_new_tokens <= STATIC_CACHE_MAX_TOKENS
                        and any(isinstance(m, HybridExperts) for m in model.modules()))
    mode = "dynamic_cache"
    with _EvalMode(model):
        t0 = time.perf_counter()
        if static_cache:
            dec = decoder_for(model, prompt.shape[1] + cfg.max_new_tokens, device, use_graphs=cuda_graphs)
            setup = (dec.chain.setup_steps, dec.chain.setup_s)
            logits = dec.prefill(prompt)  # [1, V]

            def next_logits(token: torch.Tensor, position: int) -> torch.Tensor:
                return dec.step(token, position)
        else:
            # As model.generate: a model with a cache class of its own (MiniMax's linear attention) builds it itself
            # when given None; forward_step takes the cache back from its output.
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            cache = DynamicCache(config=model.config) if base._supports_default_dynamic_cache() else None
            logits, cache = prefill(model, prompt, cache)  # [1, V]

            def next_logits(token: torch.Tensor, position: int) -> torch.Tensor:
                return decode_one_token(model, token.view(1, 1), cache, position)[0]
        t_first = t0
        while True:
            delta = stream.accept(logits)
            if len(stream.token_ids) == 1:
                _sync(device)
                t_first = time.perf_counter()
            if delta and on_text is not None:
                on_text(delta)
            if stream.stop_reason is not None:
                break
            logits = next_logits(stream.last_id, stream.length - 1)
        _sync(device)
        t_end = time.perf_counter()
        setup_steps, setup_s = 0, 0.0
        if static_cache:
            mode = dec.mode
            setup_steps, setup_s = dec.chain.setup_steps - setup[0], dec.chain.setup_s - setup[1]

    rest = stream.flush()
    if rest and on_text is not None:
        on_text(rest)
    n_new = len(stream.token_ids)
    return GenerationResult(token_ids=stream.token_ids, text=stream.text.text, stop_reason=stream.stop_reason,
                            prompt_tokens=stream.n_prompt, new_tokens=n_new, prefill_s=t_first - t0,
                            decode_s=t_end - t_first - setup_s, decode_mode=mode, setup_s=setup_s,
                            setup_steps=setup_steps)
