"""Batched prefill: the prompts of several requests (any adapters, one per row) in one left-padded forward.

Rows are **left-padded** to the longest prompt, exactly the layout of a :class:`~hybridmoe.serve.batch.DecodeBatch`:
input ids ``[N, W]``, a 0/1 mask ``[N, W]`` of the real tokens and position ids ``[N, W]`` that count only real
tokens (row i's prompt sits at positions ``0 .. T_i - 1``, as it would alone). Padding is never attended to, so each
row computes the function of its lone prefill; the last column is every row's last prompt token, so the logits of
that column are each row's first-token logits. The filled cache *is* a decode batch: the engine samples the first
tokens and the rows join (or become) the running :class:`DecodeBatch` without any copy.

Why: the routed experts' weights are read once per forward, whatever the token count (on a GPU, a prefill of at
least ``stream_min_tokens`` tokens streams every layer's expert weights from CPU RAM), so N prompts in one forward
share that cost. With one row there is no padding and the inputs are exactly :func:`hybridmoe.generation.prefill`'s,
so a request prefilled alone is bit for bit ``hybridmoe chat``'s. In a padded batch the matmuls have other shapes,
so logits can differ from a lone run by float rounding (~1e-6 in fp32 on the tiny test models).
"""

from __future__ import annotations

import torch

from hybridmoe.generation import forward_step, input_device

from .batch import DecodeBatch


def padded_inputs(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (input ids, attention mask, position ids), each int64 ``[N, W]`` on the CPU, W = longest prompt.

    A padding slot repeats its row's first token: a real id of the vocabulary, so the padding's hidden states stay
    as finite as the row's own (a NaN there would reach the real tokens through masked-out-but-multiplied values).
    Padding slots get position 0; real tokens count from 0.
    """
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.empty(n, width, dtype=torch.long)  # [N, W]
    mask = torch.zeros(n, width, dtype=torch.long)  # [N, W], 1 = real token
    for i, prompt in enumerate(prompts):
        pad = width - len(prompt)
        ids[i, :pad] = prompt[0]
        ids[i, pad:] = torch.tensor(prompt, dtype=torch.long)
        mask[i, pad:] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [N, W]: 0 .. T_i - 1 on the real tokens
    return ids, mask, positions


def prefill_batch(model: torch.nn.Module, prompts: list[list[int]], capacity: int) -> tuple[torch.Tensor, DecodeBatch]:
    """Prefill ``prompts`` (token id lists, non-empty) in one forward into a fresh ``DynamicCache``.

    Returns the first-token logits ``[N, V]`` fp32 (row i for ``prompts[i]``) and a :class:`DecodeBatch` of
    ``capacity`` rows holding the N prompts (row i has ``len(prompts[i])`` real tokens; the sampled tokens are
    fed next).
    """
    from transformers import DynamicCache

    device = input_device(model)
    ids, mask, positions = (t.to(device) for t in padded_inputs(prompts))  # [N, W] each
    logits, cache = forward_step(model, ids, DynamicCache(config=model.config), mask, positions)  # [N, V]
    batch = DecodeBatch(model, capacity)
    batch.extend(cache, mask, [len(p) for p in prompts])
    return logits, batch


class ChunkedPrefill:
    """A batched prefill run a few columns at a time, so that decode steps of running requests go in between.

    The left-padded inputs of :func:`padded_inputs` are cut along the sequence: chunk ``[a, b)`` feeds
    ``ids[:, a:b]`` with the mask of columns ``[0, b)`` and positions ``[:, a:b]`` after the cache of columns
    ``[0, a)``. Every query token sees the same keys as in one whole forward (causal attention), so the result is
    that forward's up to float rounding (other matmul shapes). Only the last chunk's logits are kept.
    """

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], capacity: int) -> None:
        from transformers import DynamicCache

        self.model = model
        self.prompts = prompts
        self.capacity = capacity
        device = input_device(model)
        self.ids, self.mask, self.positions = (t.to(device) for t in padded_inputs(prompts))  # [N, W] each
        self.cache = DynamicCache(config=model.config)
        self.done = 0  # columns already in the cache
        self.chunks = 0

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def step(self, max_tokens: int) -> tuple[torch.Tensor, DecodeBatch] | None:
        """Run the next chunk of at most ``max_tokens`` padded tokens (rows x columns, at least one column).
        Returns (first-token logits [N, V], the filled DecodeBatch) after the last chunk, else None."""
        n = self.ids.shape[0]
        end = min(self.width, self.done + max(1, max_tokens // n))
        logits, self.cache = forward_step(self.model, self.ids[:, self.done:end], self.cache, self.mask[:, :end],
                                          self.positions[:, self.done:end])  # [N, V]
        self.done = end
        self.chunks += 1
        if end < self.width:
            return None
        batch = DecodeBatch(self.model, self.capacity)
        batch.extend(self.cache, self.mask, [len(p) for p in self.prompts])
        return logits, batch
