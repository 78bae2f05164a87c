"""The server's per-request sampling: vLLM's extra parameters, logprobs and grammar masks on top of ``TokenStream``.

:class:`ServeSampling` adds to :class:`~hybridmoe.generation.SamplingConfig` what OpenAI and vLLM clients send:
``min_p``, ``presence_penalty`` / ``frequency_penalty``, ``logprobs`` / ``top_logprobs`` and a compiled grammar
(``response_format``, ``tools``; :mod:`hybridmoe.serve.constrained`). :class:`ServeStream` is a
:class:`~hybridmoe.generation.TokenStream` whose :meth:`~ServeStream.accept` applies them, in vLLM's order:

    grammar mask -> repetition penalty (prompt + output) -> presence/frequency penalties (output only)
    -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> multinomial (CPU generator)

With none of the extras set, every operation is the one :func:`hybridmoe.generation.sample` runs, in the same order on
the same tensors, so a reply is bit for bit ``hybridmoe chat``'s (tested). Logprobs are those of the model's raw
distribution (log-softmax of the logits before any of the above), as vLLM reports them by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hybridmoe.errors import ConfigError, NonFiniteError
from hybridmoe.generation import (
    SamplingConfig,
    TokenStream,
    _check_finite,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)


@dataclass
class ServeSampling(SamplingConfig):
    """``SamplingConfig`` plus the server-only knobs; 0 / None mean off."""

    min_p: float = 0.0  # drop tokens whose probability is below min_p x the most likely one's (after temperature)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob and the k most likely
    grammar: Any = None  # an xgrammar CompiledGrammar that every token must follow (None = free text)
    ignore_eos: bool = False  # EOS ids do not stop the reply (vLLM's extra parameter, for load tests)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (id, logprob), most likely first


def apply_penalties(scores: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency penalties on ``scores`` [1, V] from the ``generated`` ids [S] (output only)."""
    if (presence == 0 and frequency == 0) or generated.numel() == 0:
        return scores
    counts = torch.zeros_like(scores).scatter_add_(1, generated.view(1, -1), torch.ones(1, generated.numel(),
                                                                                       device=scores.device))
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= ``min_p`` x the top probability of ``scores`` [1, V] (temperature applied).

    On logits that is ``l - max(l) >= log(min_p)``, so no softmax is needed; the most likely token always stays.
    """
    if min_p <= 0:
        return scores
    return scores.masked_fill(scores - scores.amax(dim=-1, keepdim=True) < math.log(min_p), float("-inf"))


class ServeStream(TokenStream):
    """A :class:`TokenStream` that applies :class:`ServeSampling`; :attr:`logprobs` gets one entry per token."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prompt: torch.Tensor, cfg: SamplingConfig,
                 diagnose=None) -> None:
        super().__init__(model, tokenizer, prompt, cfg, diagnose)
        self.logprobs: list[TokenLogprob] = []
        self.matcher = None
        grammar = getattr(cfg, "grammar", None)
        if grammar is not None:
            from .constrained import matcher_for

            self.matcher, self.bitmask = matcher_for(grammar, sorted(self.eos))
        if getattr(cfg, "ignore_eos", False):
            self.eos = set()  # (a grammar still ends the reply when it is complete)

    @property
    def plain_greedy(self) -> bool:
        cfg = self.cfg
        extras = isinstance(cfg, ServeSampling) and (cfg.presence_penalty != 0 or cfg.frequency_penalty != 0
                                                    or cfg.logprobs is not None)
        return super().plain_greedy and not extras and self.matcher is None

    @property
    def greedy_logprobs(self) -> int | None:
        """k for a greedy stream whose only extra is ``logprobs`` (with the k most likely), else None. Its token is
        the logits' argmax and its logprobs come from the raw distribution, so a batched caller may compute both for
        many streams at once and hand them in with :meth:`accept_argmax_logprob`."""
        cfg = self.cfg
        if not isinstance(cfg, ServeSampling) or cfg.logprobs is None or self.matcher is not None:
            return None
        if cfg.presence_penalty != 0 or cfg.frequency_penalty != 0 or not super().plain_greedy:
            return None
        return cfg.logprobs

    def accept_argmax_logprob(self, token: int, next_id: torch.Tensor, logprob: TokenLogprob) -> str:
        """What :meth:`accept` does for a :attr:`greedy_logprobs` stream whose logits the caller checked (finite):
        ``token``/``next_id`` their argmax (as :meth:`accept_argmax`), ``logprob`` what ``_logprob`` gives."""
        self.logprobs.append(logprob)
        return self.accept_argmax(token, next_id)

    def accept(self, logits: torch.Tensor) -> str:
        cfg = self.cfg
        extras = isinstance(cfg, ServeSampling)
        if not extras:
            return super().accept(logits)
        step = len(self.token_ids) + 1
        _check_finite(logits, step, cfg, self.n_prompt, self.diagnose)
        scores = logits.float()  # [1, V]
        if self.matcher is not None:
            from .constrained import apply_mask

            scores = apply_mask(self.matcher, self.bitmask, scores)  # disallowed tokens -> -inf
        length = self.length
        scores = apply_repetition_penalty(scores, self.seq[:, :length], cfg.repetition_penalty)
        scores = apply_penalties(scores, self.seq[0, self.n_prompt:length], cfg.presence_penalty, cfg.frequency_penalty)
        next_id = self._draw(scores)  # [1]
        token = int(next_id.item())  # host sync: the token is needed for EOS, text and the next step
        if cfg.logprobs is not None:
            self.logprobs.append(_logprob(logits, token, cfg.logprobs))
        if self.matcher is not None and not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token} that its own mask allowed")  # an xgrammar bug
        return self._take(token, next_id, step)

    def _draw(self, scores: torch.Tensor) -> torch.Tensor:
        """:func:`hybridmoe.generation.sample`'s steps after the repetition penalty, plus min-p; masked (-inf) scores
        allowed. Returns int64 ids [1] on the scores' device."""
        cfg = self.cfg
        if cfg.greedy:
            return torch.argmax(scores, dim=-1)  # [1]
        scores = (scores - scores.amax(dim=-1, keepdim=True)) / cfg.temperature  # as sample(): no overflow at tiny T
        scores = apply_top_k(scores, cfg.top_k)
        scores = apply_top_p(scores, cfg.top_p)
        scores = apply_min_p(scores, cfg.min_p)
        probs = torch.softmax(scores, dim=-1).cpu()  # [1, V] on the CPU: the RNG stream does not depend on the device
        if not bool(torch.isfinite(probs).all()) or not bool((probs.sum(dim=-1) > 0).all()):
            raise NonFiniteError("sampling probabilities are not a distribution (every token was masked out)")
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(-1).to(scores.device)

    def _complete(self) -> bool:
        # the grammar is complete and allows nothing more (no stop token in it): the reply ends as at an EOS
        return self.matcher is not None and self.matcher.is_terminated()


def _logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The raw distribution's logprob of ``token`` and its ``k`` most likely tokens, from ``logits`` [1, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)[0]  # [V]
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logp, k)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logp[token]), top)
