"""Batched decode across requests: one left-padded KV cache, one forward per step for the whole batch.

Requests are prefilled in left-padded batches (:mod:`hybridmoe.serve.prefill`), whose caches join a
:class:`DecodeBatch`; its rows may use different adapters (:meth:`hybridmoe.serve.adapters.AdapterSet.use`). The
batch keeps every layer's keys/values as one tensor ``[B, heads, W, d]`` whose rows are **left-padded** to the
common width ``W``, plus a 0/1 mask ``[B, W]`` of the real slots. A decode step feeds one token per row at column
``W`` with the mask (padding is never attended to) and each row's own position id (its real length), so every row
computes the same function as it would alone. With one row there is no padding and the inputs are exactly those of
the batch-1 path, so a lone request decodes bit for bit like ``hybridmoe chat``.

Why padding and not per-request caches: the routed experts on the CPU are the cost of a decode step, and a batched
forward reads each active expert's weights once for all rows (and the GPU side runs one kernel per op instead of
B). The price is copying the caches when a row joins (padding to the new width) or leaves (dropping the row and any
leading all-padding columns): O(cache) copies on the compute device, done only on membership changes, never per
step.

**On CUDA graphs.** With ``graphs`` on (the engine's default on CUDA), the padded cache is only where rows meet:

* a batch of one row hands its cache to the model's static-cache decoder (:func:`hybridmoe.decode_graph.decoder_for`:
  CUDA graphs cut at the CPU experts, the GPU share, resident layers), so one client gets single-user decode speed;
* a batch of several rows hands its rows to the model's batch decoder (:mod:`hybridmoe.batch_decode`: a static cache
  with a position per row, CUDA graphs per bucket of rows, cut at the CPU experts, which compute all rows in one call
  per layer), and the engine gives the step its adapters through static row masks
  (:meth:`hybridmoe.serve.adapters.AdapterSet.use_static`).

When rows join, leave or are copied, the decoder's positions are copied back into a padded ``DynamicCache`` first,
and the next step hands them over again (copies on membership changes only, never per step). The caches hold the
same keys and values; both decoders are tested against the padded path (tests/test_serve_solo.py,
tests/test_batch_decode.py), so a row's tokens do not depend on the switch beyond float rounding. A decoder that
raises leaves the rows on the padded path with one warning.

Rows never see each other's tokens, but batched matmuls have other shapes than batch 1, so a row's logits can
differ from a lone run by float rounding (~1e-6 in fp32 on the tiny test models), which can change a greedy choice
only at a near tie.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.nn import functional as F

from hybridmoe import decode_graph
from hybridmoe.batch_decode import batch_decoder_for
from hybridmoe.generation import forward_step


def batchable(cache: Any) -> bool:
    """Whether a prefilled cache can join a padded batch: every layer a plain growing ``DynamicLayer``.

    Sliding-window and static layers keep their own position bookkeeping that left padding would break; requests
    with such caches decode in batches of one.
    """
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


log = logging.getLogger("hybridmoe.serve")

# Positions a lone row's static cache is sized for beyond its current length (see DecodeBatch._solo_step).
SOLO_HEADROOM = 1024


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """[B, h, W, d] -> [B, h, n + W, d] with n zero columns in front (the sequence dim is -2)."""
    return F.pad(t, (0, 0, n, 0)) if n else t


class DecodeBatch:
    """Sequences that decode together (any adapters); rows are in the order they were added."""

    def __init__(self, model: torch.nn.Module, capacity: int, graphs: bool = False) -> None:
        self.model = model  # the forward target (a PeftModel when adapters carry Linear LoRA)
        self.capacity = capacity
        self.cache: Any = None  # DynamicCache with batch size len(self)
        self.mask: torch.Tensor | None = None  # [B, W] int64 on the compute device, 1 = real slot
        self.lengths: list[int] = []  # real tokens in the cache per row (= that row's next position id)
        self.graphs = graphs  # steps go through the model's static-cache (CUDA graph) decoders
        self.solo = None  # the batch-1 decoder while it holds the lone row's cache (self.cache is stale then)
        self.multi = None  # the batch decoder while it holds the rows (self.cache is stale then)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def full(self) -> bool:
        return len(self) >= self.capacity

    def extend(self, cache: Any, mask: torch.Tensor, lengths: list[int]) -> None:
        """Append the rows of a left-padded ``cache`` (batch size ``len(lengths)``, ``mask`` [n, w]) after the
        existing rows; row i holds ``lengths[i]`` real tokens. An empty batch takes the cache as it is."""
        self.detach()
        if self.cache is None:
            self.cache, self.mask, self.lengths = cache, mask, list(lengths)
            return
        width = mask.shape[1]
        grow = max(width - self.width, 0)  # the new rows are wider: pad every existing row
        pad_new = max(self.width - width, 0)  # the new rows are narrower: pad them
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(new.keys, pad_new)])  # [B+n, h, W', d]
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(new.values, pad_new)])
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), F.pad(mask, (pad_new, 0))])  # [B+n, W']
        self.lengths.extend(lengths)

    def join(self, other: DecodeBatch) -> None:
        """Move every row of ``other`` (e.g. a freshly prefilled batch) to the end of this batch."""
        if len(other):
            self.extend(other.cache, other.mask, other.lengths)
        other.cache, other.mask, other.lengths = None, None, []

    def remove(self, rows: list[int]) -> None:
        """Drop ``rows`` (indices into the current order) and the leading columns that became padding everywhere."""
        if not rows:
            return
        keep = [i for i in range(len(self)) if i not in set(rows)]
        if not keep:
            for dec in (self.solo, self.multi):
                if dec is not None and dec.owner is self:
                    dec.owner = None
            self.cache, self.mask, self.lengths, self.solo, self.multi = None, None, [], None, None
            return
        self.detach()
        self.lengths = [self.lengths[i] for i in keep]
        trim = self.width - max(self.lengths)  # left-padded rows: the first `trim` columns are padding in all rows
        idx = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, trim:]  # [B', h, W - trim, d]; a copy (advanced indexing)
            layer.values = layer.values[idx, :, trim:]
        self.mask = self.mask[idx, trim:]

    def select(self, rows: list[int]) -> None:
        """Keep ``rows`` in that order, repeats allowed: ``n`` choices of one prompt share its prefill this way."""
        self.detach()
        idx = torch.tensor(rows, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx]  # [len(rows), h, W, d]; a copy (advanced indexing)
            layer.values = layer.values[idx]
        self.mask = self.mask[idx]
        self.lengths = [self.lengths[i] for i in rows]

    def path(self, room: int = 0) -> str:
        """How the next step runs: "solo" (one row, the batch-1 static decoder), "multi" (several rows, the batch
        decoder) or "padded" (eagerly over the padded DynamicCache). ``room`` as in :meth:`step`."""
        if not self.graphs or not len(self) or max(self.lengths) >= decode_graph.STATIC_CACHE_MAX_TOKENS - 1:
            return "padded"
        if len(self) == 1:
            ok = self.solo is not None or (self.width == self.lengths[0] and batchable(self.cache))  # no padding
            return "solo" if ok else "padded"
        return "multi" if self.multi is not None or batchable(self.cache) else "padded"

    def step(self, tokens: torch.Tensor, room: int = 0) -> torch.Tensor:
        """Feed ``tokens`` [B, 1] (row i's next input at position ``lengths[i]``); returns logits [B, V] fp32.
        ``room``: positions the rows may still need after this one (the static caches are sized for them)."""
        path = self.path(room)
        if path != "padded":
            try:
                return self._solo_step(tokens, room) if path == "solo" else self._multi_step(tokens, room)
            except Exception as e:  # a model or device the static decoders cannot take: go on padded, eagerly
                log.warning("the static-cache decoder failed (%s: %s); this batch decodes eagerly from now on",
                            type(e).__name__, e)
                log.debug("where the static-cache decode failed", exc_info=True)
                self.graphs = False
                self.detach()  # the decoder's cache holds the positions before this step: take them back
        self.detach()
        b = len(self)
        device = tokens.device
        mask = torch.cat([self.mask, torch.ones(b, 1, dtype=torch.long, device=device)], dim=1)  # [B, W + 1]
        positions = torch.tensor(self.lengths, device=device).view(b, 1)  # [B, 1]
        logits, self.cache = forward_step(self.model, tokens, self.cache, mask, positions)
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _evict(self, dec) -> None:
        """A model's decoder is shared by every batch of the engine: the batch that holds it now gets its rows back in
        padded form before this one loads its own."""
        prev = dec.owner
        if prev is not None and prev is not self:
            prev.detach()

    # -- several rows on the batch decoder -----------------------------------------------------------------------------
    def _multi_step(self, tokens: torch.Tensor, room: int) -> torch.Tensor:
        longest = max(self.lengths)
        grown = 0
        if self.multi is not None and longest >= self.multi.max_len:  # full: the rows move to a larger decoder
            grown = 2 * self.multi.max_len
            self.detach()
        if self.multi is None:  # sized like a lone row's static cache (below)
            want = min(max(longest + 1 + min(room, SOLO_HEADROOM), grown), decode_graph.STATIC_CACHE_MAX_TOKENS)
            dec = batch_decoder_for(self.model, self.capacity, want, tokens.device)
            self._evict(dec)  # (batch_decoder_for hands back the rows of a decoder it closes itself)
            dec.load(self.cache, self.mask, self.lengths)
            self.multi, self.cache, dec.owner = dec, None, self
        logits = self.multi.step(tokens)  # [B, V] fp32
        self.lengths = list(self.multi.lengths)
        return logits

    # -- a lone row on the static-cache decoder ------------------------------------------------------------------------
    def _solo_step(self, tokens: torch.Tensor, room: int) -> torch.Tensor:
        n = self.lengths[0]
        grown = 0
        if self.solo is not None and n >= self.solo.max_len:  # full: its positions move to a larger decoder
            grown = 2 * self.solo.max_len
            self.detach()  # (via the padded cache, which stays consistent should the larger one fail)
        if self.solo is None:  # take the row over: its cache into the decoder (reused with its graphs across requests)
            # Sized for the reply's remaining tokens, at most SOLO_HEADROOM ahead (a request without max_tokens may
            # ask for the whole context); a longer reply moves to a decoder twice the size when this one is full.
            want = min(max(n + 1 + min(room, SOLO_HEADROOM), grown), decode_graph.STATIC_CACHE_MAX_TOKENS)
            dec = decode_graph.decoder_for(self.model, want, tokens.device)
            self._evict(dec)  # (decoder_for hands back the rows of a decoder it closes itself)
            dec.seed(self.cache, n)
            self.solo, self.cache, dec.owner = dec, None, self
        logits = self.solo.step(tokens.reshape(1), n)  # [1, V] fp32
        self.lengths = [n + 1]
        return logits

    def detach(self) -> None:
        """Back to a padded DynamicCache: rows are about to join, leave or be copied, a decoder failed, or another
        batch or an adapter change (:func:`hybridmoe.decode_graph.drop_decoder`) takes the decoder."""
        if self.solo is not None:
            dec, self.solo = self.solo, None
            self.cache = dec.export(self.lengths[0])
            self.mask = torch.ones(1, self.lengths[0], dtype=torch.long, device=dec.device)  # [1, W]: no padding
            dec.owner = None
        if self.multi is not None:
            dec, self.multi = self.multi, None
            self.cache, self.mask, self.lengths = dec.export()
            dec.owner = None
