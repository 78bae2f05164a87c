"""Batch-1 decode with a static KV cache, and on CUDA as a chain of CUDA graphs cut at the routed experts.

A decode step of a hybrid model is a few dozen short stretches of GPU work (norms, attention, router, shared
experts: hundreds of small kernels) separated by the routed experts, which run on the CPU. Launched one kernel at a
time from Python, the GPU side costs more than the experts' weight reads. :class:`StaticDecoder` captures every
stretch once as a CUDA graph, by running the model's own forward with each :class:`HybridExperts` switched to "cut
here" (its ``decode_hook``):

    graph 0   embeddings -> layers -> the first MoE layer's router; copy (hidden, top-k ids, top-k weights) to
              page-locked host buffers
    CPU       that layer's routed experts (``HybridExperts.infer_cpu``), into a page-locked host buffer
    graph 1   copy the experts' output in -> rest of that layer -> ... -> the next MoE layer's router; copy out
    ...
    graph N   ... -> final norm -> LM head -> logits

A token then costs N graph launches, N waits and N CPU expert calls, and no per-kernel Python. Unless a share of the
experts is copied in (below), graph i+1 is launched while graph i runs and starts at a gate the host opens after cut
i's experts (:mod:`hybridmoe.graph_gate`), so the launches are off the token's path. On CUDA a share of each token's
experts (``model.hybridmoe.settings.gpu_share``, default by weight dtype) is computed on the GPU instead. bf16 and
int8 experts are copied (:class:`_GpuShare`): after graph i the host queues the DMA of those experts' weights from
their page-locked home and a small captured graph over them, then runs the other experts on the CPU while the copy
and that graph proceed. 4-bit experts are read by the GPU from host memory (:class:`~hybridmoe.mapped_share.
MappedShare`): its kernels are captured at the head of graph i+1, before its gate, and run while the CPU computes.
Graph i+1 adds both parts. The KV cache is a
transformers :class:`~transformers.StaticCache`: fixed addresses, updated in place by index, and its position counter
is a device tensor, so the same graphs serve every position.

Layers whose experts are resident on the GPU (``resident_expert_layers``) are not cut: the step gathers the K picked
experts from the layer's pinned slot and computes them inside the graph (:func:`_resident_experts`). With every
layer resident, a token is one graph launch and no CPU work.

Without CUDA (or when capture fails, or with ``use_graphs=False``) the same cut runs eagerly: each expert call
copies out, computes on the CPU and copies back at once. That mode runs the same plumbing on any device, which is
how the CPU tests check it.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hybridmoe import decode_norm, graph_gate, mapped_share
from hybridmoe.decode_compile import compile_pairs, compiled_forwards
from hybridmoe.decode_norm import swapped_forwards
from hybridmoe.experts import HybridExperts, cpu_kernel
from hybridmoe.experts.backends import choose_backend
from hybridmoe.forward_args import forward_params
from hybridmoe.graph_gate import HostGates
from hybridmoe.mapped_share import MappedShare

log = logging.getLogger(__name__)

__all__ = ["STATIC_CACHE_MAX_TOKENS", "GraphChain", "StaticDecoder", "close_batch_decoder", "decoder_for", "drop_decoder"]

# generate() uses the static cache (and CUDA graphs) by default only up to this many positions (prompt +
# max_new_tokens): the cache is allocated for all of them up front (DeepSeek-V2-Lite: ~0.28 MB a position).
STATIC_CACHE_MAX_TOKENS = 16384



def _picked_experts(weights, mlp, gate_up: torch.Tensor, down: torch.Tensor, scales, bias, x: torch.Tensor,
                    w: torch.Tensor) -> torch.Tensor:
    """y [1, H] fp32 = Σ_s w[0, s] · Expert_s(x) over n experts' weights gathered on the device (the streamed path's
    math: GEMMs in the weight dtype, int8 and 4-bit dequantized there to bf16, fp32 sum).

    gate_up [n, U, H], down [n, H, I] in ``weights``' format (an :class:`ExpertWeights`, which owns it); scales None
    or (gate_up, down) scales of those n experts; bias None or ([n, U], [n, H]); x [1, H]; w [1, n] fp32."""
    if scales is not None:
        gate_up, down = weights.to_float(gate_up, scales[0]), weights.to_float(down, scales[1])
    x = x.to(gate_up.dtype)  # [1, H]
    acc = torch.zeros(1, down.shape[1], dtype=torch.float32, device=x.device)  # [1, H]
    for s in range(gate_up.shape[0]):
        u = (x @ gate_up[s].T).float()  # [1, U]
        if bias is not None:
            u = u + bias[0][s].float()
        y = (mlp(u).to(down.dtype) @ down[s].T).float()  # [1, H]
        if bias is not None:
            y = y + bias[1][s].float()
        acc += w[:, s, None] * y
    return acc


def _resident_experts(module: HybridExperts, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A decode step's routed experts of a resident layer (``resident_expert_layers``), on the device with no cut:
    hidden [T, H], ids [T, K], w [T, K] on the device -> [T, H] in the hidden dtype. No host sync, so it captures
    into the step's graph. One row gathers only its K picked experts from the layer's pinned slot; a batch of rows
    runs every expert of the slot over all rows, with the rows' expert LoRA (:func:`_all_experts`)."""
    gate_up, down, scales, bias = module.weights.unpack(module.streamer.resident_tensors(module.stream_index))
    if hidden.shape[0] > 1 or module.graph_lora:  # (the one-row gather below has no per-row LoRA)
        y = _all_experts(module, gate_up, down, scales, bias, hidden, ids, w, module.graph_lora or [])
        return y.to(hidden.dtype)
    sel = ids[0].to(torch.int64)  # [K]
    if scales is not None:
        scales = (scales["gate_up_proj"][sel], scales["down_proj"][sel])
    if bias is not None:
        bias = (bias["gate_up_proj"][sel], bias["down_proj"][sel])
    y = _picked_experts(module.weights, module.mlp, gate_up[sel], down[sel], scales, bias, hidden, w.float())
    return y.to(hidden.dtype)


def _all_experts(module: HybridExperts, gate_up: torch.Tensor, down: torch.Tensor, scales, bias, x: torch.Tensor,
                 ids: torch.Tensor, w: torch.Tensor, lora: list[tuple[dict, torch.Tensor]]) -> torch.Tensor:
    """y [T, H] fp32 = Σ_k w[t, k] · Expert_{ids[t, k]}(x[t]) for a batch of decode rows, computing every expert of
    the layer on every row (two batched GEMMs) and keeping each row's K picks.

    Why every expert: a batch's rows together pick most of a layer's experts (16 rows, top-6 of 64: ~51 distinct), so
    reading all of them costs little more than reading the picked ones, and unlike sorting rows by expert it needs no
    host sync (so it captures into a CUDA graph). gate_up [E, U, H], down [E, H, I] in the weights' format (int8 and
    4-bit dequantized here to bf16), scales/bias as :meth:`ExpertWeights.unpack` gives them; GEMMs in the weight dtype,
    activations and the sum over the K picks in fp32 (the streamed path's math).

    ``lora``: (an adapter's ``{projection: ExpertLoRA}``, its row mask [≥ T] bool on the device) per adapter with
    routed-expert LoRA (the server's static row masks): each adds ``scale · (x Aᵀ) Bᵀ`` (fp32) on its rows only."""
    weights = module.weights
    if scales is not None:
        gate_up = weights.to_float(gate_up, scales["gate_up_proj"])
        down = weights.to_float(down, scales["down_proj"])
    if bias is not None:
        bias = (bias["gate_up_proj"].float(), bias["down_proj"].float())

    def add_lora(y: torch.Tensor, x_in: torch.Tensor, proj: str) -> torch.Tensor:
        for factors, mask in lora:
            lo = factors.get(proj)
            if lo is not None:
                a, b = lo.factors_on(y.device, torch.float32)  # [E, r, in], [E, out, r]: copied once, cached (frozen)
                y = _masked_lora(y, x_in, a, b, lo.scale, mask)
        return y

    y = _dense_experts(module.mlp, gate_up, down, bias, x, add_lora)  # [E, T, H]
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # [T, 1]
    picked = y[ids.to(torch.int64), rows]  # [T, K, H]: row t's output of each of its K experts
    return (w.float()[:, :, None] * picked).sum(1)  # [T, H]


def _dense_experts(mlp, gate_up: torch.Tensor, down: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor] | None,
                   x: torch.Tensor, add_lora) -> torch.Tensor:
    """y [E', T, H] fp32: each expert of gate_up [E', U, H] / down [E', H, I] (float weights) on every row of x [T, H]:
    two batched GEMMs in the weights' dtype, activations in fp32. bias: (gate_up [E', U], down [E', H]) fp32 or None;
    ``add_lora(y, x_in, proj)`` adds the rows' expert LoRA of ``proj`` (x_in its input, fp32). The math of
    :func:`_all_experts` (every expert of a resident layer) and of :class:`_BatchShare` (the GPU's slots)."""
    u = torch.matmul(x.to(gate_up.dtype), gate_up.transpose(1, 2)).float()  # [E', T, U]
    if bias is not None:
        u = u + bias[0][:, None, :]
    u = add_lora(u, x.float(), "gate_up_proj")
    h = mlp(u)  # [E', T, I] fp32
    y = torch.matmul(h.to(down.dtype), down.transpose(1, 2)).float()  # [E', T, H]
    if bias is not None:
        y = y + bias[1][:, None, :]
    return add_lora(y, h, "down_proj")


def _masked_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                 mask: torch.Tensor) -> torch.Tensor:
    """y [E', T, out] plus ``scale · (x Aᵀ) Bᵀ`` on the rows ``mask`` [≥ T] bool selects; x [T, in] or [E', T, in],
    a [E', r, in], b [E', out, r], fp32."""
    delta = torch.matmul(torch.matmul(x, a.transpose(1, 2)), b.transpose(1, 2)) * scale  # [E', T, out]
    return torch.where(mask[:y.shape[1], None], y + delta, y)


class _GpuShare:
    """The GPU's part of a decode step's routed experts: the last ``n`` of each token's top-K (batch 1).

    One set of device buffers serves every MoE layer (they run one after another on one stream): the hidden state
    and routing weights of the current cut (:meth:`stage`, queued before the cut), the weights of its ``n`` experts
    (:meth:`load`: page-locked host -> device DMA, queued by the host once it knows the ids), and their weighted sum
    ``y`` [1, H] fp32 (:meth:`compute`, captured once as its own CUDA graph), which the next graph adds to the CPU's
    part. The math is the streamed path's: GEMMs in the weight dtype (int8 and 4-bit dequantized on the device to
    bf16), fp32 sum.
    """

    def __init__(self, module: HybridExperts, hidden: torch.Tensor, k: int, n: int):
        w, dev = module.weights, hidden.device
        self.n, self.k, self.mlp = n, k, module.mlp
        self.gate_up = torch.empty((n, *w.gate_up.shape[1:]), dtype=w.gate_up.dtype, device=dev)  # [n, 2I, H]
        self.down = torch.empty((n, *w.down.shape[1:]), dtype=w.down.dtype, device=dev)  # [n, H, I]
        self.weights = w  # owns the format: to_float dequantizes the buffers below
        self.scales = None  # int8: [n, 2I], [n, H] bf16; 4-bit: [n, 2I, H/group], [n, H, I/group] (as stored)
        if w.quantized:
            self.scales = [torch.empty((n, *w.scales[p].shape[1:]), dtype=w.scales[p].dtype, device=dev)
                           for p in ("gate_up_proj", "down_proj")]
        self.bias = None  # experts with biases (gpt-oss): [n, 2I], [n, H] fp32
        if w.bias is not None:
            self.bias = [torch.empty((n, *w.bias[p].shape[1:]), dtype=torch.float32, device=dev)
                         for p in ("gate_up_proj", "down_proj")]
        self.x = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)  # [T, H] (T = 1 here)
        self.w = torch.empty(1, k, dtype=torch.float32, device=dev)  # [1, K]
        self.y = torch.zeros(hidden.shape, dtype=torch.float32, device=dev)  # [T, H]
        self.graph: torch.cuda.CUDAGraph | None = None

    def stage(self, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        self.x.copy_(hidden)
        if self.w.shape == w.shape:  # batch 1 (the batched share builds its dense weights on the host)
            self.w.copy_(w)

    def load(self, module: HybridExperts, experts: list[int]) -> None:
        """Queue the copies of these experts' weights (the host knows the ids once the cut's copies landed)."""
        w = module.weights
        for s, e in enumerate(experts):
            self.gate_up[s].copy_(w.gate_up[e], non_blocking=True)
            self.down[s].copy_(w.down[e], non_blocking=True)
            if self.scales is not None:
                self.scales[0][s].copy_(w.scales["gate_up_proj"][e], non_blocking=True)
                self.scales[1][s].copy_(w.scales["down_proj"][e], non_blocking=True)
            if self.bias is not None:  # the fp32 copies the kernel uses, page-locked with the weights
                bias = w.bias_f32()
                self.bias[0][s].copy_(bias["gate_up_proj"][e], non_blocking=True)
                self.bias[1][s].copy_(bias["down_proj"][e], non_blocking=True)

    def compute(self) -> None:
        """y = Σ_s w[K-n+s] · Expert_s(x) over the loaded experts; replays the captured graph when there is one."""
        if self.graph is not None:
            self.graph.replay()
            return
        self.y.copy_(_picked_experts(self.weights, self.mlp, self.gate_up, self.down, self.scales, self.bias, self.x,
                                     self.w[:, self.k - self.n:]))

    def capture(self, stream: torch.cuda.Stream) -> None:
        """Capture :meth:`compute` as a CUDA graph (after it has run eagerly once, so cuBLAS is set up)."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            self.compute()
        self.graph = g


class _BatchShare(_GpuShare):
    """The GPU's part of a batched decode step's routed experts (several rows; :mod:`hybridmoe.batch_decode`).

    Batch 1 splits each token's top-K (:class:`_GpuShare`); here the split is by expert: of the experts the live
    rows picked, the ``n`` picked by the most rows cross PCIe (page-locked host -> device DMA) and the GPU computes
    every pick of them, while the CPU kernel computes the picks of the others. Both read each expert's weights once,
    so the copy engine's bandwidth adds to the CPU's. ``n`` = round(distinct experts x the share), at most the
    buffers' slots. The GPU math runs over all rows and all slots with a dense weight matrix ``w`` [T, n] (zero where
    a row did not pick the slot's expert), captured once as its own CUDA graph; the CPU kernel gets the other picks
    (a pick moved to the GPU becomes a zero-weight pick of an expert the CPU reads anyway).
    """

    def __init__(self, module: HybridExperts, hidden: torch.Tensor, k: int, share: float):
        t = hidden.shape[0]
        self.fraction = share
        slots = max(1, min(round(min(t * k, module.num_experts) * share), module.num_experts))
        super().__init__(module, hidden, k, slots)
        for buf in (self.gate_up, self.down, *(self.scales or []), *(self.bias or [])):
            buf.zero_()  # unused slots hold zeros, never uninitialized memory (a zero weight times NaN is NaN)
        self.w = torch.zeros(t, slots, dtype=torch.float32, device=hidden.device)  # [T, n]
        self.w_host = torch.zeros(t, slots, dtype=torch.float32, pin_memory=hidden.device.type == "cuda")
        # Routed-expert LoRA of the slots' experts, per adapter of the rows (the server's static row masks): for each
        # (adapter, projection) the factors of the loaded experts, gathered here from the adapter's device copies at
        # every layer (one set of buffers serves every layer, like the weights), with that adapter's row mask. Fixed
        # by the first layer that has LoRA; the captured graph holds exactly these.
        self.lora: list[tuple[str, torch.Tensor, torch.Tensor, float, torch.Tensor]] | None = None
        self.lora_layout: list[tuple] | None = None  # what the buffers hold (see _layout), to match other layers
        self.captured_lora: bool | None = None  # whether the captured graph adds LoRA (None: not captured yet)
        self.slot_ids = torch.zeros(slots, dtype=torch.long, device=hidden.device)  # [n] the slots' expert ids

    @staticmethod
    def _entries(graph_lora) -> list[tuple]:
        """(projection, ExpertLoRA, row mask) per adapter and projection, in a fixed order."""
        return [(proj, lo, mask) for factors, mask in graph_lora for proj, lo in sorted(factors.items())]

    @classmethod
    def _layout(cls, graph_lora) -> list[tuple]:
        """What the buffers (and a captured graph) hold for these entries: which adapter (its mask), projection,
        factor shapes."""
        return [(mask.data_ptr(), proj, tuple(lo.A.shape[1:]), tuple(lo.B.shape[1:]))
                for proj, lo, mask in cls._entries(graph_lora)]

    def takes_lora(self, module: HybridExperts) -> bool:
        """Whether this step's layer can add its rows' expert LoRA on the GPU: the server's static row masks are
        there, and its adapters and ranks are those of the buffers, or the buffers can still be made (the share's
        graph is not captured yet)."""
        if not module.graph_lora:
            return False
        if self.lora is None:
            return self.captured_lora is None
        return self._layout(module.graph_lora) == self.lora_layout

    def _stage_lora(self, graph_lora) -> None:
        """Gather this layer's LoRA factors of the slots' experts into the buffers (device to device); without
        ``graph_lora`` (a layer no adapter's expert LoRA targets) zero the B buffers, so the LoRA math adds 0."""
        if not graph_lora:
            for _, _, b_buf, _, _ in self.lora or []:
                b_buf.zero_()
            return
        if self.lora is None:  # the first layer with LoRA fixes the buffers
            self.lora_layout = self._layout(graph_lora)
            dev = self.w.device
            self.lora = [(proj, torch.zeros((self.n, *lo.A.shape[1:]), dtype=torch.float32, device=dev),
                          torch.zeros((self.n, *lo.B.shape[1:]), dtype=torch.float32, device=dev), lo.scale, mask)
                         for proj, lo, mask in self._entries(graph_lora)]
        for (_, a_buf, b_buf, _, _), (_, lo, _) in zip(self.lora, self._entries(graph_lora)):
            a, b = lo.factors_on(a_buf.device, torch.float32)  # [E, r, in], [E, out, r]: copied once, cached
            torch.index_select(a, 0, self.slot_ids, out=a_buf)  # [n, r, in]
            torch.index_select(b, 0, self.slot_ids, out=b_buf)  # [n, out, r]

    def split(self, module: HybridExperts, ids: torch.Tensor, w: torch.Tensor, rows: int, graph_lora=()):
        """Pick the experts the GPU computes for the first ``rows`` rows (``ids`` [T, K] int64, ``w`` [T, K] fp32 on
        the host), queue their weights' copies (and, with ``graph_lora``, their LoRA factors), the dense weights and
        the GPU's math; returns (ids, w) [rows, K] for the CPU kernel, whose picks of GPU experts carry weight 0 and
        point at an expert the CPU computes anyway (or None when the GPU has every pick)."""
        ids, w = ids[:rows], w[:rows]
        counts = torch.bincount(ids.reshape(-1), minlength=module.num_experts)  # [E]
        distinct = int((counts > 0).sum())
        n = min(self.n, max(1, round(distinct * self.fraction)))
        gpu = counts.argsort(descending=True, stable=True)[:n].tolist()  # the most picked experts
        self.load(module, gpu)
        if graph_lora:
            host = torch.zeros(self.n, dtype=torch.long)
            host[:len(gpu)] = torch.tensor(gpu)
            self.slot_ids.copy_(host)
        self._stage_lora(graph_lora)
        on_gpu = torch.zeros(module.num_experts, dtype=torch.bool)
        on_gpu[gpu] = True
        picked = on_gpu[ids]  # [rows, K]
        slot = torch.full((module.num_experts,), -1, dtype=torch.long)
        slot[gpu] = torch.arange(len(gpu))
        self.w_host.zero_()
        r, kk = picked.nonzero(as_tuple=True)
        self.w_host[r, slot[ids[r, kk]]] = w[r, kk]
        self.w.copy_(self.w_host, non_blocking=True)
        self.compute()
        if bool(picked.all()):
            return None
        # a CPU expert for each row: its own first one, else any the CPU computes
        fallback = int(ids[~picked][0])
        own = torch.where(picked, torch.iinfo(torch.int64).max, torch.arange(ids.shape[1])).argmin(dim=1)  # [rows]
        row_cpu = torch.where(picked.all(dim=1), fallback, ids.gather(1, own[:, None])[:, 0])  # [rows]
        cpu_ids = torch.where(picked, row_cpu[:, None], ids)
        cpu_w = torch.where(picked, 0.0, w)
        return cpu_ids.contiguous(), cpu_w.contiguous()

    def compute(self) -> None:
        """y [T, H] fp32 = Σ_s w[:, s] · Expert_s(x) over the loaded slots; replays the captured graph if there is
        one."""
        if self.graph is not None:
            self.graph.replay()
            return
        gate_up, down = self.gate_up, self.down
        if self.scales is not None:
            gate_up, down = self.weights.to_float(gate_up, self.scales[0]), self.weights.to_float(down, self.scales[1])
        y = _dense_experts(self.mlp, gate_up, down, self.bias, self.x, self._add_lora)  # [n, T, H]
        self.y.copy_((y * self.w.T[:, :, None]).sum(0))  # [T, H]

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, proj: str) -> torch.Tensor:
        """y [n, T, out] plus the staged LoRA of ``proj`` on each adapter's rows (x [T, in] or [n, T, in] fp32)."""
        for p, a, b, scale, mask in self.lora or []:
            if p == proj:
                y = _masked_lora(y, x, a, b, scale, mask)
        return y

    def skip(self) -> None:
        """This step's layer runs wholly on the CPU (its rows' expert LoRA is not one the share can add): the GPU part
        adds zero."""
        self.y.zero_()

    def capture(self, stream: torch.cuda.Stream) -> None:
        self.captured_lora = self.lora is not None  # the graph holds the LoRA math iff the buffers exist now
        super().capture(stream)


class _Cut:
    """One routed-experts call of the decode step: its host buffers and the copies across the cut.

    x [T, H] (hidden dtype), ids [T, K] int64, w [T, K] fp32 and out [T, H] fp32 live on the CPU, page-locked when
    the model is on CUDA so the copies are asynchronous DMA that a CUDA graph can hold. T is the step's batch (a
    bucket of the batched decoder); the CPU computes only its first ``rows`` (the live rows; the rest is padding).
    """

    def __init__(self, module: HybridExperts, hidden: torch.Tensor, ids: torch.Tensor, pin: bool):
        self.module = module
        t, k = ids.shape
        self.x = torch.empty(hidden.shape, dtype=torch.float32, pin_memory=pin)  # [T, H] (the kernel's dtype)
        self.ids = torch.empty(t, k, dtype=torch.int64, pin_memory=pin)  # [T, K]
        self.w = torch.empty(t, k, dtype=torch.float32, pin_memory=pin)  # [T, K]
        self.out = torch.zeros(hidden.shape, dtype=torch.float32, pin_memory=pin)  # [T, H]
        self._kernel: dict[tuple[int, int], Any] = {}  # (rows, experts a row) -> the prepared kernel call

    def send(self, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Queue the device->host copies (conversions happen on the device, so each copy is one plain DMA)."""
        self.x.copy_(hidden.float(), non_blocking=True)
        self.ids.copy_(ids.to(torch.int64), non_blocking=True)
        self.w.copy_(w.to(torch.float32), non_blocking=True)

    def _experts(self, rows: int, k: int) -> None:
        """out[:rows] = the first ``k`` picks of each of the first ``rows`` rows, on the CPU: through the compiled
        kernel's call prepared once for these buffers where the kernel runs the layer (no expert LoRA: the plain
        decode step, every token), else :meth:`HybridExperts.infer_cpu`."""
        m = self.module
        call = self._kernel.get((rows, k))
        if call is not None and m.settings.cpu_kernel and not m.lora:  # (the rest of the choice is the weights')
            call()
            return
        x, ids, w, out = self.x[:rows], self.ids[:rows, :k], self.w[:rows, :k], self.out[:rows]
        if m.lora or not ids.is_contiguous() or choose_backend(m, rows, grad=False, stream=False) != "kernel":
            m.infer_cpu(x, ids.contiguous(), w.contiguous(), out)
            return
        call = self._kernel[rows, k] = cpu_kernel.prepared(m, x, ids, w, out)
        call()

    def compute(self, share: _GpuShare | None = None, rows: int | None = None) -> None:
        """The routed experts, once the copies of :meth:`send` have landed: with a GPU share, queue its experts'
        weight copies and math on the GPU first, then compute the others on the CPU meanwhile. ``rows``: compute
        only the first ``rows`` tokens (None: all)."""
        m = self.module
        if isinstance(share, _BatchShare):
            self._compute_split(share, rows)
            return
        if isinstance(share, MappedShare):  # its part is queued on the GPU (the next graph's head, or the hook)
            self._experts(self.x.shape[0], share.k - share.n)
            return
        if share is None:
            n = self.x.shape[0] if rows is None else rows
            if m.row_lora is not None:  # rows of several adapters (the server): one call per adapter's rows
                y = m.row_lora.forward(m, self.x[:n], self.ids[:n], self.w[:n], None, m._one_lora_forward)
                self.out[:n].copy_(y)
            else:
                self._experts(n, self.ids.shape[1])
            return
        cpu_k = share.k - share.n
        share.load(m, self.ids[0, cpu_k:].tolist())
        share.compute()
        self._experts(self.x.shape[0], cpu_k)

    def _compute_split(self, share: _BatchShare, rows: int | None) -> None:
        """A batched step's experts split by expert between the GPU (``share``) and the CPU kernel. Rows with routed-
        expert LoRA: the GPU part adds each row's LoRA through the server's static row masks (``graph_lora``) and the
        CPU part through ``row_lora``; a layer whose LoRA the share cannot take (no static masks, or other adapters or
        ranks than its captured graph holds) runs wholly on the CPU (the GPU part adds zero)."""
        m, n = self.module, self.x.shape[0] if rows is None else rows
        lora = m.row_lora is not None and any(m.row_lora.loras)
        if m.lora or (lora and not share.takes_lora(m)):
            share.skip()
            self.compute(None, rows)
            return
        cpu = share.split(m, self.ids, self.w, n, m.graph_lora if lora else [])
        if cpu is None:
            self.out[:n].zero_()
        elif lora:  # the CPU's picks with each row's adapter (its zero-weight picks add nothing, LoRA or not)
            self.out[:n].copy_(m.row_lora.forward(m, self.x[:n], cpu[0], cpu[1], None, m._one_lora_forward))
        else:
            m.infer_cpu(self.x[:n], cpu[0], cpu[1], self.out[:n])  # (new id/weight tensors each step)

    def receive(self, device: torch.device, dtype: torch.dtype, share: _GpuShare | MappedShare | None = None
                ) -> torch.Tensor:
        """Queue the host->device copy of the result (+ the GPU share's); [T, H] in the hidden dtype on ``device``."""
        out = self.out.to(device, non_blocking=True)
        return (out if share is None else out + share.y).to(dtype)


class _Hook:
    """Stands in for every HybridExperts.forward during a decode step (``module.decode_hook``).

    mode "eager": copy out, wait, compute, copy back (any device). mode "capture": copy out, end the CUDA graph being
    captured and begin the next, copy back (in the new graph); :meth:`GraphChain._replay` runs the CPU part between
    the graphs.
    """

    def __init__(self, chain: GraphChain):
        self.chain = chain
        self.mode = "eager"
        self.calls = 0  # expert calls so far in this forward: the index of the cut

    def __call__(self, module: HybridExperts, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
        d = self.chain
        if d.in_graph(module):  # its experts stay on the device: computed there, no cut
            return _resident_experts(module, hidden, ids, w)
        i, self.calls = self.calls, self.calls + 1
        if i == len(d.cuts):  # first pass: shapes known now
            d.cuts.append(_Cut(module, hidden, ids, pin=hidden.device.type == "cuda"))
            d.setup_share(module, hidden, ids.shape[1])
        cut = d.cuts[i]
        if cut.module is not module or cut.x.shape != hidden.shape:
            raise RuntimeError("the decode step's routed-expert calls changed order or shape between passes")
        cut.send(hidden, ids, w)
        if d.share is not None:
            d.share.stage(hidden, ids, w)
        if self.mode == "capture":
            d.next_graph()
        else:
            if hidden.device.type == "cuda":
                torch.cuda.current_stream(hidden.device).synchronize()
            if isinstance(d.share, MappedShare):
                d.share.compute(module)  # queued on the device; the CPU's part meanwhile
            cut.compute(d.share, d.rows)
        return cut.receive(hidden.device, hidden.dtype, d.share)


class _Clock:
    """Host time of a decode replay by part, accumulated in :attr:`seconds` while :attr:`on` (benchmarks only:
    ``lap(key)`` adds the time since the previous lap to ``key``)."""

    def __init__(self):
        self.on, self.seconds, self._t = False, {}, 0.0

    def start(self) -> None:
        if self.on:
            self._t = time.perf_counter()

    def lap(self, key: str) -> None:
        if self.on:
            t = time.perf_counter()
            self.seconds[key] = self.seconds.get(key, 0.0) + t - self._t
            self._t = t


class GraphChain:
    """One decode step's forward with every routed-experts call cut (:class:`_Hook`): run eagerly, or captured once
    as a chain of CUDA graphs (one per stretch between two cuts) and replayed. :class:`StaticDecoder` (batch 1) and
    :class:`hybridmoe.batch_decode.BatchDecoder` (a bucket of rows) each drive one.

    ``step(forward)`` runs the step: the first call eagerly (on the capture stream, so lazy per-stream state such as
    cuBLAS workspaces exists before capture), the second captures and replays, later ones replay. ``forward`` is a
    function of no arguments over static input tensors, returning the logits (the graphs' output). :attr:`rows`: how
    many leading rows the CPU part computes (None: all). ``gpu_share``: the share of the experts computed on the GPU
    meanwhile (0 when the layers' weights differ in layout: one set of GPU buffers serves every layer).
    """

    def __init__(self, experts: list[HybridExperts], device: torch.device, use_graphs: bool = True,
                 gpu_share: float = 0.0):
        self.experts, self.device = experts, device
        self.use_graphs = use_graphs and device.type == "cuda"
        layouts = {(m.weights.gate_up.shape, m.weights.down.shape, m.weights.fmt) for m in experts}
        self.gpu_share = gpu_share if len(layouts) <= 1 else 0.0
        self.cuts: list[_Cut] = []
        self.share: _GpuShare | MappedShare | None = None
        self.hook = _Hook(self)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.out: torch.Tensor | None = None  # written by the last graph
        self.rows: int | None = None
        self.calls = 0
        self.mode = "eager"
        # one-time work so far: the steps run before the graphs existed (the eager first one, the capturing one)
        # and their seconds, so callers can report decode speed without it (generate: GenerationResult.setup_s)
        self.setup_steps, self.setup_s = 0, 0.0
        self._pool = None
        self._stream = torch.cuda.Stream(device) if self.use_graphs else None
        self.clock = _Clock()  # where the replays' host time goes (off unless a benchmark turns it on)
        self.compiled: list | None = None  # (module, compiled forward) of the GPU stretches: compile_stretches
        self.cache = None  # with compiled stretches: the step's KV cache, whose update runs outside them
        self.fused: list = []  # (module, fused forward) of the model's RMSNorms: fuse_norms
        # With the graphs: graph i+1 waits at gate i (hybridmoe.graph_gate) and is launched before cut i's experts;
        # events[i] marks the end of graph i. None: each graph is launched after the experts before it.
        self.gates: HostGates | None = None
        self._events: list = []

    def in_graph(self, module: HybridExperts) -> bool:
        """Whether the step computes this layer's experts inside the graph: a resident layer (not with LoRA that
        only the CPU part applies: a module's own LoRA, or per-row LoRA without the static row masks that
        :func:`_all_experts` reads, ``graph_lora``)."""
        if not _resident(module) or module.lora:
            return False
        return module.row_lora is None or module.graph_lora is not None

    def setup_share(self, module: HybridExperts, hidden: torch.Tensor, k: int) -> None:
        n = min(k, round(k * self.gpu_share))
        # On CUDA the weights must be page-locked (they are whenever streaming is on), or the copies would stall the
        # host instead of overlapping the CPU's experts.
        pinned = hidden.device.type != "cuda" or module.weights.gate_up.is_pinned()
        # Expert biases (gpt-oss) cross with their experts' weights (_GpuShare.load).
        if self.share is None and n > 0 and pinned:
            rows = hidden.shape[0]
            if rows > 1:
                self.share = _BatchShare(module, hidden, k, self.gpu_share)
            elif mapped_share.unavailable(module.weights, hidden.device) is None:
                self.share = MappedShare(module, hidden, k, n)  # read by the GPU from host memory, in the graphs
            else:
                self.share = _GpuShare(module, hidden, k, n)

    def close(self) -> None:
        self.graphs = self.out = self.share = self.gates = None
        self.cuts, self.hook.chain = [], None

    def eager(self, forward):
        """``forward()`` with every expert call cut, eagerly (no graphs); with :attr:`compiled`, through the compiled
        forwards of the GPU stretches (:mod:`hybridmoe.decode_compile`)."""
        for m in self.experts:
            m.decode_hook = self.hook
        self.hook.calls = 0
        try:
            if self.compiled:
                with compiled_forwards(self.compiled, len(self.experts), self.cache):
                    return forward()
            with swapped_forwards(self.fused):
                return forward()
        finally:
            for m in self.experts:
                m.decode_hook = None

    def fuse_norms(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Run the model's RMSNorms as one fused kernel each in this chain's steps (CUDA with Triton, not with
        compiled stretches; :mod:`hybridmoe.decode_norm`); `dtype`: the steps' activations."""
        if decode_norm.unavailable(self.device) is None and not self.compiled:
            self.fused = decode_norm.fused_norm_pairs(model, dtype)

    def compile_stretches(self, model: nn.Module, cache=None) -> None:
        """Compile the GPU stretches of this chain's steps (CUDA only; :mod:`hybridmoe.decode_compile`); `cache`: the
        steps' KV cache (its update is left out of the compiled code, so one compiled attention serves every layer)."""
        if self.device.type == "cuda":
            self.compiled = compile_pairs(model) or None
            self.cache = cache

    def step(self, forward) -> torch.Tensor:
        """One decode step (see the class): the logits ``forward`` returns, from the graphs once captured."""
        self.calls += 1
        if self.graphs is None and self.use_graphs:
            t0 = time.perf_counter()
            if self.calls >= 2:
                self._capture(forward)  # the first step ran eagerly: cuBLAS handles, cache tensors and the cuts exist
            out = self._replay_or_eager(forward)
            self.setup_steps, self.setup_s = self.setup_steps + 1, self.setup_s + time.perf_counter() - t0
            return out
        return self._replay_or_eager(forward)

    def _replay_or_eager(self, forward) -> torch.Tensor:
        if self.graphs is not None:
            self._replay()
            self.mode = "cuda_graphs"
            return self.out
        if not self.mode.startswith("eager"):
            self.mode = "eager"
        if not self.use_graphs:
            return self.eager(forward)
        # The step before capture runs on the capture stream (CUDA's advice: lazy per-stream state such as cuBLAS
        # workspaces is then set up outside the capture).
        cur = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(cur)
        with torch.cuda.stream(self._stream):
            out = self.eager(forward)
        self._stream.synchronize()
        return out

    def next_graph(self) -> None:
        """Called by the hook inside capture: close the current graph at this expert call, open the next one (which
        starts at its gate, when the chain has gates)."""
        self.graphs[-1].capture_end()
        g = torch.cuda.CUDAGraph()
        self.graphs.append(g)
        g.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        if isinstance(self.share, MappedShare):  # the closed cut's GPU part, run while the host computes the rest
            self.share.compute(self.cuts[len(self.graphs) - 2].module)
        if self.gates is not None:
            self.gates.wait(len(self.graphs) - 2)  # the cut just closed

    def _make_gates(self) -> HostGates | None:
        """Gates for this chain's cuts (:mod:`hybridmoe.graph_gate`), their kernel compiled and run once through an
        open gate on the capture stream; None where they cannot run, with a copy share of the experts (its copies and
        graph are queued after the cut's graph, which a graph launched ahead would overtake; a mapped share is in the
        graphs), or if that first run fails."""
        if graph_gate.unavailable(self.device) is not None or not self.cuts:
            return None
        if self.share is not None and not isinstance(self.share, MappedShare):
            return None
        try:
            gates = HostGates(len(self.cuts))
            with torch.cuda.stream(self._stream):
                gates.open(0)
                gates.wait(0)
            self._stream.synchronize()
            if int(gates.flags[0]) != 0:
                raise RuntimeError("the gate kernel did not clear its flag")
        except Exception as e:  # a Triton or driver that cannot read page-locked host memory: launch as before
            log.warning("graph decode launches each graph after the experts (the graph gate failed: %s: %s)",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None
        self._events = [torch.cuda.Event() for _ in self.cuts]
        return gates

    def _capture(self, forward) -> None:
        with capturable_eager_mask():
            self._capture_chain(forward)

    def _capture_chain(self, forward) -> None:
        # Collect garbage first: an unreachable CUDA graph of an earlier decoder (a reference cycle) destroyed by the
        # collector in the middle of this capture would invalidate it (seen on the GPU host, run S7-a).
        gc.collect()
        torch.cuda.synchronize(self.device)
        self._pool = torch.cuda.graph_pool_handle()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        self.gates = self._make_gates()
        self.graphs = [torch.cuda.CUDAGraph()]
        self.hook.mode = "capture"
        try:
            with torch.cuda.stream(stream):
                self.graphs[0].capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self.out = self.eager(forward)
                finally:
                    self.graphs[-1].capture_end()
            if self.hook.calls != len(self.cuts):
                raise RuntimeError(f"{self.hook.calls} expert calls captured, {len(self.cuts)} expected")
            if self.share is not None:  # own memory pool: it replays between the chain's graphs, whose
                self.share.capture(stream)  # temporaries (the residual stream) live across it
        except Exception as e:  # anything in the model that cannot be captured: keep decoding eagerly
            self.graphs, self.out, self.gates = None, None, None
            if self.share is not None:
                self.share.graph = None
            self.use_graphs = False
            self.mode = f"eager (capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]})"
            log.warning("decode runs without CUDA graphs: capturing the decode step failed (%s: %s)",
                        type(e).__name__, e)
            log.debug("where the capture failed", exc_info=True)
        except BaseException:  # Ctrl-C mid-capture: no half-captured chain is kept
            self.graphs, self.out, self.gates = None, None, None
            raise
        finally:
            self.hook.mode = "eager"
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)

    def _replay(self) -> None:
        if self.gates is not None:
            self._replay_gated()
            return
        stream, clock = torch.cuda.current_stream(self.device), self.clock
        clock.start()
        for i, g in enumerate(self.graphs):
            g.replay()
            clock.lap("launch")
            if i < len(self.cuts):
                stream.synchronize()  # the hidden states and routing of cut i are in host memory now
                clock.lap("wait")
                self.cuts[i].compute(self.share, self.rows)  # graph i+1 starts by copying the result in
                clock.lap("experts")

    def _replay_gated(self) -> None:
        """The replay with gates: graph i+1 is launched while graph i runs (the host would only wait for it), and
        starts on the GPU when the host opens gate i after cut i's experts. On any error the pending gate is opened
        and the stream drained (the graphs then run on stale buffers; the step's result is not returned), and the
        flags are cleared for the next step."""
        stream, clock, gates, events = torch.cuda.current_stream(self.device), self.clock, self.gates, self._events
        graphs, cuts = self.graphs, self.cuts
        clock.start()
        try:
            graphs[0].replay()
            events[0].record(stream)
            clock.lap("launch")
            for i, cut in enumerate(cuts):
                gates.pending.add(i)  # before the launch: a launch that fails halfway may have queued the graph
                graphs[i + 1].replay()  # waits at gate i on the GPU
                if i + 1 < len(cuts):
                    events[i + 1].record(stream)
                clock.lap("launch")
                events[i].synchronize()  # the hidden states and routing of cut i are in host memory now
                clock.lap("wait")
                cut.compute(self.share, self.rows)  # (no share, or a mapped one: the head of graph i+1)
                gates.open(i)  # graph i+1 copies the result in and goes on
                clock.lap("experts")
        except BaseException:
            gates.open_pending()
            stream.synchronize()
            gates.flags.zero_()  # nothing waits at a gate now: no flag may stay set for the next step
            gates.pending.clear()
            raise


class StaticDecoder:
    """Prefill and batch-1 decode steps over one :class:`~transformers.StaticCache` of ``max_len`` positions.

    ``prefill(prompt [1, T])`` and ``step(token [1], position)`` return the next-token logits [1, V] fp32. On CUDA,
    the second decode step captures the graphs (the first runs eagerly and sets up the buffers), and every later
    step replays them; :attr:`mode` says which ran last ("cuda_graphs", "eager", or "eager (capture failed: …)").
    """

    def __init__(self, model: nn.Module, max_len: int, device: torch.device, use_graphs: bool = True,
                 key: tuple = (), gpu_share: float | None = None):
        from transformers import StaticCache

        self.model, self.max_len, self.device, self.key = model, max_len, device, key
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        _full_length_sliding_layers(self.cache, max_len)
        experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
        self.embed = model.get_input_embeddings()
        # The GPU computes this share of each step's routed experts (CUDA only by default; any device when given, which
        # is how the CPU tests check it). Not with LoRA on the routed experts: their factors stay on the CPU.
        if gpu_share is None:
            gpu_share = _gpu_share(experts, device)
        if any(m.lora for m in experts):
            gpu_share = 0.0
        self.chain = GraphChain(experts, device, use_graphs, gpu_share)
        if experts and experts[0].settings.compile_decode:
            self.chain.compile_stretches(model, self.cache)
        self.chain.fuse_norms(model, self.embed.weight.dtype)
        self.embeds: torch.Tensor | None = None  # [1, 1, H] static input of the graphs
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] static input
        self.length = 0  # positions in the cache, tracked on the host (the cache's own counter is a device tensor)
        self.owner: Any = None  # the server batch whose row the cache holds (hybridmoe.serve.batch)
        accepted = forward_params(model)
        self._takes_cache_position = "cache_position" in accepted
        self._takes_logits_to_keep = "logits_to_keep" in accepted

    # the chain's state, under the names the tests and benchmarks use
    cuts = property(lambda self: self.chain.cuts)
    graphs = property(lambda self: self.chain.graphs)
    share = property(lambda self: self.chain.share)
    mode = property(lambda self: self.chain.mode)
    gpu_share = property(lambda self: self.chain.gpu_share)

    # -- the forward -------------------------------------------------------------------------------------------
    def _forward(self, **inputs: Any) -> torch.Tensor:
        """model(...) over the static cache; [B, T, V] logits of the last position only."""
        kwargs = dict(past_key_values=self.cache, use_cache=True, **inputs)
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self._takes_cache_position:  # older / remote-code models take explicit cache positions
            kwargs["cache_position"] = inputs["position_ids"][0]
        return self.model(**kwargs).logits

    @torch.inference_mode()  # the cache's tensors were made in inference mode (prefill, step)
    def reset(self) -> None:
        """Empty the cache for a new sequence (in place: captured graphs stay valid)."""
        self.cache.reset()
        self.length = 0

    def close(self) -> None:
        """Drop the graphs, their memory pool, the cache and the buffers (the hook refers back to the chain)."""
        self.chain.close()
        self.embeds = self.cache = None

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Run the prompt [1, T] (input device) into the emptied cache; logits [1, V] fp32 for the first new token.

        The prompt's routed experts run as usual (streamed to the GPU for long prompts); only decode is cut."""
        if prompt.shape[1] >= self.max_len:
            raise ValueError(f"prompt of {prompt.shape[1]} tokens does not fit a static cache of {self.max_len}")
        self.reset()
        positions = torch.arange(prompt.shape[1], device=self.device).unsqueeze(0)  # [1, T]
        logits = self._forward(input_ids=prompt, position_ids=positions)[:, -1, :].float()
        self.length = prompt.shape[1]
        return logits

    @torch.inference_mode()
    def seed(self, cache, length: int) -> None:
        """Empty the cache and load the first ``length`` positions of ``cache`` (a one-row transformers cache of plain
        layers, e.g. a server request's prefill) into it, as if :meth:`prefill` had run them; :meth:`step` continues
        at position ``length``."""
        if length >= self.max_len:
            raise ValueError(f"{length} positions do not fit a static cache of {self.max_len}")
        self.reset()
        positions = torch.arange(length, device=self.device)
        for i, layer in enumerate(cache.layers):  # Cache.update appends at the layer's counter (0 after reset)
            self.cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], i,
                              {"cache_position": positions})
        self.length = length

    @torch.inference_mode()
    def export(self, length: int):
        """The cache's first ``length`` positions as a new one-row transformers ``DynamicCache`` (copies): where the
        sequence goes on in a batch of several (hybridmoe.serve.batch)."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.model.config)
        for i, layer in enumerate(self.cache.layers):
            out.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), i)
        return out

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Feed one token ([1] or [1, 1], any device) at ``position``; next-token logits [1, V] fp32.

        ``position`` must be the number of positions already in the cache: the cache writes where its own counter
        says, the rotary embedding uses ``position``."""
        if position != self.length or position >= self.max_len:
            raise ValueError(f"decode step at position {position}, but the cache holds {self.length} of "
                             f"{self.max_len} positions")
        self.length += 1
        emb = self.embed(token.reshape(1, 1).to(self.device))  # [1, 1, H] on the device (HostEmbedding: via CPU)
        if self.embeds is None:
            self.embeds = torch.empty_like(emb)
        self.embeds.copy_(emb)
        self.position.fill_(position)
        logits = self.chain.step(lambda: self._forward(inputs_embeds=self.embeds, position_ids=self.position))
        # a copy even in fp32: the graphs' output tensor is overwritten by the next step
        return logits[:, -1, :].to(torch.float32, copy=True)


def _full_length_sliding_layers(cache, max_len: int) -> None:
    """Replace the cache's sliding-window layers (gpt-oss, Mixtral-style configs) by full-length static layers.

    transformers' ``StaticSlidingWindowLayer`` keeps a Python counter and branches on it (filling, then rolling its
    buffer once full): a captured CUDA graph would freeze whichever branch ran at capture, and replay it wrongly once
    the window fills. A full-length layer writes each position at its own index, like every other layer, and the
    sliding-window mask (built from absolute positions, inside the graph) does the windowing: the same attention, at
    the memory of a full-length cache for those layers."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    for i, layer in enumerate(cache.layers):
        if type(layer) is StaticSlidingWindowLayer:
            cache.layers[i] = StaticLayer(max_cache_len=max_len)


def _eager_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """transformers' ``eager_mask`` (the float mask of eager attention: 0 where attended, the dtype's min elsewhere)
    built with a fill instead of ``torch.tensor(0.0, device=...)``, whose host->device copy CUDA-graph capture
    refuses. The same values; used while a decode step is captured."""
    from transformers import masking_utils

    kwargs.pop("allow_is_causal_skip", None)
    mask = masking_utils.sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)  # bool, True = attend
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


@contextmanager
def capturable_eager_mask():
    """While capturing: eager attention's mask (gpt-oss, whose attention sinks need eager attention) through
    :func:`_eager_mask`. transformers looks the mask function up per call, by attention implementation."""
    from transformers import masking_utils

    masks = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    local = getattr(masks, "_local_mapping", {})  # overrides of the global table (transformers 5.x)
    had_local, previous = "eager" in local, local.get("eager")
    masks["eager"] = _eager_mask
    try:
        yield
    finally:
        if had_local:
            masks["eager"] = previous
        else:
            del masks["eager"]


def _resident(module: HybridExperts) -> bool:
    """The layer's experts are kept on the device (``resident_expert_layers``)."""
    return module.streamer is not None and module.streamer.is_resident(module.stream_index)


def _gpu_share(experts: list[HybridExperts], device: torch.device, batched: bool = False) -> float:
    """The model's setting (``model.hybridmoe.settings``), resolved for its expert weight dtype and the device
    (:func:`hybridmoe.mapped_share.decode_share`)."""
    if not experts:
        return 0.0
    return mapped_share.decode_share(experts[0], device, batched)[0]


def _bucket(n: int) -> int:
    """Cache lengths come in multiples of 256, so a chat session reuses one decoder (and its graphs) across turns."""
    return -(-n // 256) * 256


def drop_decoder(model: nn.Module) -> None:
    """Close and forget the model's decoders, batch-1 and batched (their graphs hold the addresses of the adapters'
    weights: after an adapter is loaded or unloaded, new ones must be captured even if the adapter names are the
    same)."""
    for dec in _decoders(model).values():
        _release(dec)
        dec.close()
    model._hybridmoe_decoders = {}
    model._hybridmoe_decoder = None
    close_batch_decoder(model)


def close_batch_decoder(model: nn.Module) -> None:
    """Close and forget the model's :class:`hybridmoe.batch_decode.BatchDecoder`, if it has one."""
    dec = getattr(model, "_hybridmoe_batch_decoder", None)
    if dec is not None:
        _release(dec)
        dec.close()
        model._hybridmoe_batch_decoder = None


def _release(dec) -> None:
    """The server batch whose rows a decoder holds (``dec.owner``) takes them back before the decoder closes."""
    if dec.owner is not None:
        dec.owner.detach()


# Batch-1 decoders kept per model, one per adapter setting (the server's lone requests of different adapters each
# replay their own graphs instead of capturing again at every switch); the least recently used beyond this closes.
MAX_DECODERS = 8


def _decoders(model: nn.Module) -> dict:
    return getattr(model, "_hybridmoe_decoders", None) or {}


def _lora_key(model: nn.Module):
    """Which Linear LoRA a forward of ``model`` runs: the adapters active in its enabled PEFT LoRA layers, or None.
    Read from the layers themselves: the server switches adapters layer by layer (``set_adapter`` on each, LoRA
    disabled for the base model), and a PeftModel's own ``active_adapters`` keeps naming whichever adapter it set
    last, so that name would give one adapter's (or the base model's) captured graphs to another's requests."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    active = {a for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters
              for a in m.active_adapters}
    return tuple(sorted(active)) or None


def decoder_for(model: nn.Module, needed: int, device: torch.device, use_graphs: bool = True) -> StaticDecoder:
    """The model's decoder with room for ``needed`` positions for the current adapter setting: reused when it has
    room (graphs and all), else new. Kept on the model, one per setting (a PEFT adapter switch changes which modules
    the graphs hold), up to :data:`MAX_DECODERS`."""
    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    expert_lora = any(m.lora for m in experts)  # turns the GPU share off
    streamer = experts[0].streamer if experts else None
    key = (_lora_key(model), use_graphs, expert_lora,
           _gpu_share(experts, device), bool(experts) and experts[0].settings.cpu_kernel,
           bool(experts) and experts[0].settings.compile_decode,
           id(streamer), streamer.resident if streamer is not None else 0)  # the cuts depend on the resident layers
    decoders = _decoders(model)
    model._hybridmoe_decoders = decoders
    dec = decoders.pop(key, None)
    if dec is not None and dec.max_len < needed:  # free the old cache and graph pool before allocating the new
        _release(dec)
        dec.close()
        dec = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if dec is None:
        while len(decoders) >= MAX_DECODERS:  # the least recently used
            old = decoders.pop(next(iter(decoders)))
            _release(old)
            old.close()
        dec = StaticDecoder(model, _bucket(needed), device, use_graphs, key)
    decoders[key] = dec  # most recently used last
    model._hybridmoe_decoder = dec
    return dec
