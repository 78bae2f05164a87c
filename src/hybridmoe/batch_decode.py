"""Batched decode over one static KV cache with a position per row, replayed as CUDA graphs cut at the experts.

The server decodes its running requests together (:mod:`hybridmoe.serve.batch`). Eagerly, each step of a V2-Lite
shape launches thousands of small kernels from Python; batch-1 decode avoids that with CUDA graphs
(:class:`hybridmoe.decode_graph.StaticDecoder`), and this module does the same for a batch of rows:

* **One static cache, a position per row.** Every attention layer keeps keys ``[C, heads, L, dk]`` and values
  ``[C, heads, L, dv]`` (C = the batch capacity, L = the positions per row). Row b's new key and value are written at
  its own position ``positions[b]`` (a device tensor, so the write is part of the graph), and its attention mask,
  built inside the graph from the same tensor, covers columns ``0 .. positions[b]``: rows of different lengths need
  no padding and no re-layout when others join or leave.
* **Buckets share the cache.** The live rows are the leading slots. A step over n rows runs the graphs of the
  smallest bucket ≥ n (1, 2, 4, 8, ... up to C), which are captured on views of the first rows of the same tensors,
  so every bucket reads and writes one cache. Rows between n and the bucket are padding: they compute values nobody
  reads, and the CPU experts skip them.
* **Cut at the routed experts** exactly as batch-1 decode (:class:`hybridmoe.decode_graph.GraphChain`): each MoE layer
  copies its rows' hidden states and routing to page-locked host buffers, the CPU kernel computes the live rows'
  experts in one call, and the next graph copies the result back. On CUDA a share of the experts the rows picked (the
  most picked; ``gpu_share``, the batch-1 default by weight dtype) crosses PCIe and is computed on the GPU meanwhile
  (:class:`hybridmoe.decode_graph._BatchShare`), so the copy engine's bandwidth adds to the CPU's. Layers whose experts are resident on the GPU
  (``resident_expert_layers``) run inside the graph over every expert of the layer (no cut).
* **Per-row adapters without re-capture.** With the server's adapters, every loaded adapter's Linear LoRA runs on
  every row through masks that are static device tensors, updated in place before each step
  (:meth:`hybridmoe.serve.adapters.AdapterSet.use_static`); per-row routed-expert LoRA runs in the CPU part, and in
  resident layers through the same static masks (``HybridExperts.graph_lora``).

The first step of a bucket runs eagerly (and sets up cuBLAS and the cut buffers), the second captures, later steps
replay. Without CUDA the same cache and cut run eagerly on any device, which is how the CPU tests check the whole
path against the padded ``DynamicCache`` batch (tests/test_batch_decode.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from hybridmoe.decode_graph import GraphChain, _bucket, _gpu_share, close_batch_decoder
from hybridmoe.experts import HybridExperts
from hybridmoe.forward_args import forward_params

log = logging.getLogger(__name__)

__all__ = ["BatchDecoder", "batch_decoder_for"]


class _RowLayer(CacheLayerMixin):
    """One attention layer's keys [C, h, L, dk] and values [C, h, L, dv]; a decode step writes each row's new key and
    value at that row's position (:attr:`BatchDecoder.positions`) and returns the first rows' whole cache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, decoder: BatchDecoder) -> None:
        super().__init__()
        self.keys, self.values, self.decoder = keys, values, decoder
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front (BatchDecoder.load)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        # key_states [b, h, 1, dk]: one new position per row, written at the row's own position (no host sync)
        b = key_states.shape[0]
        rows, pos = self.decoder.row_index[:b], self.decoder.positions[:b]  # [b], [b]
        keys, values = self.keys[:b], self.values[:b]  # views: the bucket's rows of the shared cache
        keys[rows, :, pos] = key_states[:, :, -1].to(keys.dtype)  # [b, h, dk]
        values[rows, :, pos] = value_states[:, :, -1].to(values.dtype)
        return keys, values

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0  # positions differ per row; the step passes its own position ids and 4D mask

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[2]


class _RowCache(Cache):
    """The transformers ``Cache`` the model's attention layers update (one :class:`_RowLayer` per layer)."""

    def __init__(self, layers: list[_RowLayer]) -> None:
        super().__init__(layers=layers)


def _shift_columns(t: torch.Tensor, offset: torch.Tensor, count: int) -> torch.Tensor:
    """t [n, h, W, d] -> a new [n, h, count, d] whose column c of row r is t's column c + offset[r] (clamped into
    range): moves rows between left padding (the server's padded cache) and position order (this decoder's)."""
    cols = (torch.arange(count, device=t.device)[None, :] + offset[:, None]).clamp(0, t.shape[2] - 1)  # [n, count]
    return t.gather(2, cols[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def _bucket_rows(n: int, capacity: int) -> int:
    """The graphs' batch size for n live rows: the next power of two, at most the capacity."""
    return min(1 << max(n - 1, 0).bit_length(), capacity)


class BatchDecoder:
    """Decode steps of up to ``capacity`` rows, each with room for ``max_len`` positions (see the module's text).

    :meth:`load` takes rows from a left-padded transformers cache (a prefill's, or the server's padded batch),
    :meth:`export` gives them back in that form, :meth:`step` feeds one token per row and returns next-token logits
    [n, V] fp32. On CUDA each bucket's second step captures its graphs; :attr:`mode` says what the last step ran.
    """

    def __init__(self, model: nn.Module, capacity: int, max_len: int, device: torch.device, use_graphs: bool = True,
                 key: tuple = (), gpu_share: float | None = None) -> None:
        self.model, self.capacity, self.max_len, self.device, self.key = model, capacity, max_len, device, key
        self.experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
        self.embed = model.get_input_embeddings()
        self.use_graphs = use_graphs and device.type == "cuda"
        # The GPU computes this share of the experts the rows picked, by expert (decode_graph._BatchShare): the
        # model's setting (CUDA only by default; any device when given, which is how the CPU tests check it)
        self.gpu_share = _gpu_share(self.experts, device, batched=True) if gpu_share is None else gpu_share
        self.positions = torch.zeros(capacity, dtype=torch.long, device=device)  # [C] each row's next position
        self.row_index = torch.arange(capacity, device=device)  # [C]
        self.columns = torch.arange(max_len, device=device)  # [L]
        self.cache: _RowCache | None = None  # allocated by the first load (shapes from the rows' cache)
        self.embeds: torch.Tensor | None = None  # [C, 1, H] static input of the graphs
        self.lengths: list[int] = []  # positions held per live row (= its next position)
        self.chains: dict[int, GraphChain] = {}  # bucket -> its step (graphs once captured)
        self.mode = "eager"
        self.owner: Any = None  # the server batch whose rows the cache holds (hybridmoe.serve.batch)
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}

    def __len__(self) -> int:
        return len(self.lengths)

    def close(self) -> None:
        """Drop the graphs, their memory pools, the cache and the buffers."""
        for chain in self.chains.values():
            chain.close()
        self.chains, self.cache, self.embeds, self.lengths, self.owner = {}, None, None, [], None

    # -- rows in and out ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def load(self, cache: Any, mask: torch.Tensor, lengths: list[int]) -> None:
        """Make the rows of ``cache`` (a transformers cache of plain layers, left-padded: row i's real positions are
        its last ``lengths[i]`` of ``mask.shape[1]`` columns) the decoder's rows, in order."""
        n, width = len(lengths), mask.shape[1]
        if n > self.capacity or max(lengths) >= self.max_len:
            raise ValueError(f"{n} rows of up to {max(lengths)} positions do not fit a batch decoder of "
                             f"{self.capacity} rows x {self.max_len} positions")
        if self.cache is None:
            layers = []
            for src in cache.layers:
                k, v = src.keys, src.values  # [n, h, W, dk], [n, h, W, dv]
                keys = torch.zeros((self.capacity, k.shape[1], self.max_len, k.shape[3]), dtype=k.dtype, device=k.device)
                values = torch.zeros((self.capacity, v.shape[1], self.max_len, v.shape[3]), dtype=v.dtype,
                                     device=v.device)
                layers.append(_RowLayer(keys, values, self))
            self.cache = _RowCache(layers)
        self.positions.zero_()  # rows past the live ones write at position 0 of their own (unused) slot
        self.positions[:n].copy_(torch.tensor(lengths, dtype=torch.long))
        # row i's real positions are its last lengths[i] columns (left padding): one gather per tensor moves every
        # row's to columns 0.. (a row's columns past its length get copies of padding: never attended, overwritten)
        longest, offset = max(lengths), width - self.positions[:n]  # [n]
        for mine, src in zip(self.cache.layers, cache.layers):
            mine.keys[:n, :, :longest] = _shift_columns(src.keys, offset, longest)
            mine.values[:n, :, :longest] = _shift_columns(src.values, offset, longest)
        self.lengths = list(lengths)

    @torch.inference_mode()
    def export(self) -> tuple[Any, torch.Tensor, list[int]]:
        """The live rows as a new left-padded transformers ``DynamicCache`` (copies), its 0/1 mask [n, W] (int64) and
        the rows' lengths: where they go on in the server's padded batch."""
        from transformers import DynamicCache

        n, width = len(self.lengths), max(self.lengths)
        offset = self.positions[:n] - width  # [n]: column c of row r holds its position c + offset[r]
        out = DynamicCache(config=self.model.config)
        for i, layer in enumerate(self.cache.layers):  # the padding columns copy position 0 (masked out)
            out.update(_shift_columns(layer.keys[:n], offset, width), _shift_columns(layer.values[:n], offset, width), i)
        mask = (torch.arange(width, device=self.device)[None, :] >= -offset[:, None]).long()  # [n, W]
        return out, mask, list(self.lengths)

    # -- the step ----------------------------------------------------------------------------------------------
    def _forward(self, b: int) -> torch.Tensor:
        """The model over the first ``b`` rows (static inputs only: this is what the graphs capture); [b, 1, V]."""
        pos = self.positions[:b]  # [b]
        dtype = self.embeds.dtype
        hidden = (self.columns[None, :] > pos[:, None])[:, None, None, :]  # [b, 1, 1, L]: True = not attended
        mask = torch.zeros(hidden.shape, dtype=dtype, device=self.device).masked_fill_(hidden, torch.finfo(dtype).min)
        return self.model(inputs_embeds=self.embeds[:b], position_ids=pos[:, None], attention_mask=mask,
                          past_key_values=self.cache, use_cache=True, **self._extra).logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [n, 1] (row i's next input, at position ``lengths[i]``); next-token logits [n, V] fp32."""
        n = len(self.lengths)
        if max(self.lengths) >= self.max_len:
            raise ValueError(f"a row holds {max(self.lengths)} positions: the batch decoder has {self.max_len}")
        emb = self.embed(tokens.reshape(n, 1).to(self.device))  # [n, 1, H] (HostEmbedding: via the CPU)
        if self.embeds is None:
            self.embeds = torch.zeros((self.capacity, 1, emb.shape[-1]), dtype=emb.dtype, device=self.device)
        self.embeds[:n].copy_(emb)
        b = _bucket_rows(n, self.capacity)
        chain = self.chains.get(b)
        if chain is None:
            chain = self.chains[b] = GraphChain(self.experts, self.device, self.use_graphs, self.gpu_share)
            chain.fuse_norms(self.model, emb.dtype)
        chain.rows = n  # the CPU experts compute the live rows only
        logits = chain.step(lambda: self._forward(b))  # [b, 1, V]
        self.mode = chain.mode
        self.positions[:n] += 1
        self.lengths = [m + 1 for m in self.lengths]
        return logits[:n, -1, :].to(torch.float32, copy=True)  # a copy: the graphs' output is overwritten next step


def batch_decoder_for(model: nn.Module, capacity: int, needed: int, device: torch.device,
                      use_graphs: bool = True) -> BatchDecoder:
    """The model's batch decoder for ``capacity`` rows with room for ``needed`` positions each: reused when it has
    room and the same settings (graphs and all), else new (the old one's cache is freed first)."""
    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    streamer = experts[0].streamer if experts else None
    key = (capacity, use_graphs, id(streamer), streamer.resident if streamer is not None else 0,
           _gpu_share(experts, device, batched=True))
    dec = getattr(model, "_hybridmoe_batch_decoder", None)
    if dec is None or dec.max_len < needed or dec.key != key:
        if dec is not None:  # free the old cache and graph pools before allocating the new
            close_batch_decoder(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dec = BatchDecoder(model, capacity, _bucket(needed), device, use_graphs, key)
        model._hybridmoe_batch_decoder = dec
    return dec
