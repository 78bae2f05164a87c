"""A streamed inference call split between the GPU and the CPU (long prefills, the server's batched prefill).

A streamed call copies the layer's expert weights to the GPU and computes there (:mod:`.streaming`). For a
1024-token prefill of the DeepSeek-V2-Lite shape the copies bound it (~20 ms a layer over PCIe against a few ms of
GEMMs), and the CPU is idle meanwhile. So in an inference call (no autograd) the last ``c = round(E · cpu_share)``
experts of the layer (:meth:`ExpertSettings.prefill_cpu_experts`) are computed on the CPU, next to their weights,
and only the first ``E - c`` cross to the GPU: a contiguous prefix of every pinned host tensor, one DMA each.

One call:

1. the hidden states, top-k ids and routing weights come to the host (a synchronisation the unsplit path does not
   make; the GPU has nothing queued for this layer yet, so it costs the router's latency, not a stall), into
   page-locked buffers with one wait;
2. the CPU part starts in one long-lived worker thread (torch's CPU ops release the GIL): every (token, k) slot
   routed to an expert >= E - c, in the math :data:`CPU_MATH` names for the weight format (bf16 experts on AMX: two
   grouped GEMMs for all of them, into the thread's reused buffers; else one expert at a time). The caller waits
   until it has got through its Python (~0.7 ms) before it queues the GPU part, whose kernel launches hold the GIL;
3. the GPU part is queued meanwhile: the streamer's slot with experts [0, E - c) (copied on its side stream, the
   next layer's prefix prefetched), the grouped GEMMs over the slots routed to them;
4. join; the CPU part's [T, H] fp32 sum (zero for tokens with no CPU expert) crosses to the device from page-locked
   memory without a host wait and is added.

Each slot is computed on exactly one side, so the result is the unsplit one up to rounding: the CPU keeps fp32
activations between its GEMMs (GEMM inputs rounded to the weight dtype, int8 / 4-bit as the CPU path computes
them), the GPU its usual bf16 ones. A layer already wholly in a GPU slot (kept resident between prompts) is not
split: its copy is free, so the GPU computes it all. Calls with autograd never split: the backward reads one
backend's saved activations. Expert LoRA applies on both sides (the CPU side uses the fp32 masters), per-row LoRA
too (:class:`~.row_lora.RowLoRA` calls this once per group of rows).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from . import amx, cpu_kernel
from .backends import format_key
from .expert_math import LoopMath, LoRAFactors, expert_groups, unsort_sum

__all__ = ["CPU_MATH", "STATS", "SplitStats", "cpu_experts_for", "forward", "kernel_rows", "share_experts"]

STREAMED = ("grouped", "device-loop")

# The CPU part's math, by the experts' format (ExpertWeights.fmt, keyed as backends.format_key):
#   "loop": the CPU path's own per-expert loop (LoopMath): GEMMs in the stored format (int8 through torch's int8
#           GEMM, 4-bit dequantized exactly to fp32 with the kernel's activation rounding), fp32 activations;
#   "bf16": per expert, the weights as bf16 (int8 / 4-bit dequantized, one expert at a time) and bf16 GEMMs with bf16
#           activations between them, as the streamed GPU path computes: on AMX tiles (amx.py) where the CPU has them
#           and the shapes tile, else torch's (oneDNN);
#   "kernel": the compiled decode kernel (cpu_kernel, moe_cpu.c) over the expert-sorted (token, expert) pairs in
#           chunks of cpu_kernel.MAX_TOKENS, each chunk reading its one or two experts' weights once (the loop's
#           rounding; "loop" where the kernel does not run the block).
# Chosen with `benchmarks/split_cpu_math.py --experts 4` (V2-Lite shape, 96 tokens an expert) on the 2-core EPYC dev
# box (AVX2, no AMX; shared, so ms ranges over runs): bf16 weights loop 226-698, bf16 208-555, kernel 361-416; int8
# loop 94-404, bf16 212-692, kernel 318-447; int4 (group 64) loop 153-1654, bf16 235-1292, kernel 88-335. To be
# rechecked on the GPU host's Xeon (benchmarks/gpu_host_split.sh runs it), whose AMX bf16 GEMMs and AVX-512 BF16
# kernel change the balance.
CPU_MATH = MappingProxyType({torch.bfloat16: "bf16", torch.float32: "loop", torch.int8: "loop", "int4": "kernel",
                             "mxfp4": "kernel"})


@dataclass
class SplitStats:
    """What the split calls of this process did (for benchmarks: is the CPU part the longer one?)."""

    calls: int = 0  # split calls
    cpu_slots: int = 0  # (token, k) slots computed on the CPU
    gpu_slots: int = 0  # ... and on the GPU
    cpu_s: float = 0.0  # seconds the worker spent on the CPU parts
    wait_s: float = 0.0  # seconds the calling thread then waited for them, after queueing the GPU part
    fetch_s: float = 0.0  # seconds the calling thread spent bringing the routing and hidden states to the host (on
    #                       CUDA this waits for the GPU to reach the layer's router)
    start_s: float = 0.0  # seconds it waited for the CPU part's Python (to its GEMMs, which run without the GIL)
    queue_s: float = 0.0  # seconds it spent queueing the GPU part (the CPU part already running)

    def reset(self) -> None:
        self.__init__()


STATS = SplitStats()


def share_experts(module) -> int:
    """How many of `module`'s experts (the last ones) its streamed inference calls leave to the CPU by the settings;
    0 with autograd on, or without streaming."""
    streamer = module.streamer
    if streamer is None or torch.is_grad_enabled():
        return 0
    return module.settings.prefill_cpu_experts(module.weights.fmt, module.num_experts, streamer.device)


def cpu_experts_for(module) -> int:
    """How many of `module`'s experts (the last ones) a streamed inference call computes on the CPU now: the share,
    or 0 where the layer is wholly on the GPU already (its copy is free; the GPU computes it faster than the CPU its
    share)."""
    c = share_experts(module)
    if c and module.streamer.holds_all(module.stream_index):
        return 0
    return c


def forward(module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
            backend: str) -> torch.Tensor | None:
    """The streamed call of `module` (a HybridExperts; `backend` "grouped" or "device-loop") with its last experts on
    the CPU: hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H] on hidden's device and dtype; None when
    this call does not split (:func:`cpu_experts_for`), for the caller's unsplit path."""
    share = share_experts(module) if backend in STREAMED else 0
    if share == 0:
        return None
    c = cpu_experts_for(module)
    if c == 0:  # the GPU computes the whole layer; the next layer's prefetch still takes the share into account
        t, k = top_k_index.shape
        out = _gpu_part(module, hidden, top_k_index, top_k_weights, 0, t * k, backend, share)
        return out.to(hidden.device, hidden.dtype)
    first = module.num_experts - c  # experts [0, first) on the GPU, [first, E) on the CPU
    where = module.streamer.device
    cuda = where.type == "cuda"
    # 1. What the CPU needs, on the host. (Small: [T, H] activations and [T, K] routing; the weights stay put.)
    t0 = time.perf_counter()
    ids_host, w_host, x_host = _to_host(top_k_index.detach().long(), top_k_weights.detach().float(), hidden.detach())
    lora_cpu = module.lora_on(torch.device("cpu"), torch.float32)  # the masters (row LoRA: this group's dict)
    # 2. The CPU part starts before the GPU part is queued, and gets through its Python first: queueing the GPU part
    #    holds the GIL for ~1.5 ms (torch's kernel launches keep it), which the worker would otherwise wait out.
    started = threading.Event()
    job = _submit(_cpu_part, module, x_host, ids_host, w_host, first, lora_cpu, cuda, started)
    t_start = time.perf_counter()
    started.wait()
    t1 = time.perf_counter()
    n_gpu = int((ids_host < first).sum())  # slots routed to GPU experts
    try:
        # 3. The GPU part, queued while the CPU computes.
        gpu_out = None
        if n_gpu:
            gpu_out = _gpu_part(module, hidden, top_k_index, top_k_weights, c, n_gpu, backend, share)
    finally:
        t2 = time.perf_counter()
        cpu_out, cpu_s = job.result()  # 4. join (also when queueing failed: the worker must be done with its inputs)
    STATS.calls += 1
    STATS.gpu_slots += n_gpu
    STATS.cpu_slots += ids_host.numel() - n_gpu
    STATS.cpu_s += cpu_s
    STATS.fetch_s += t_start - t0
    STATS.start_s += t1 - t_start
    STATS.queue_s += t2 - t1
    STATS.wait_s += time.perf_counter() - t2
    cpu_out = cpu_out.to(where, non_blocking=cuda)  # page-locked on CUDA: no host wait
    out = cpu_out if gpu_out is None else gpu_out.add_(cpu_out)
    return out.to(hidden.device, hidden.dtype)


def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` on the host. From a GPU: into page-locked buffers (torch's caching host allocator), every copy queued
    and then one wait for the stream (three pageable copies would each wait for it)."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(host, tensors):
        dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def _gpu_part(module, hidden, top_k_index, top_k_weights, c: int, n_gpu: int, backend: str,
              share: int) -> torch.Tensor:
    """The slots routed to experts [0, E - c), on the streamer's device: [T, H] fp32, zero rows for tokens with
    none; the next layer is prefetched for a CPU share of `share` experts. The unsplit streamed path's own math
    (``HybridExperts.expert_math``, the combine of ``_ExpertsFn.forward``; bit for bit when c = 0), over the first
    experts only."""
    where = module.streamer.device
    ids = top_k_index.detach().to(where, torch.int64)  # [T, K]
    w = top_k_weights.detach().to(where, torch.float32)  # [T, K]
    t, k = ids.shape
    # The GPU's slots are the first n_gpu of the expert-sorted order (n_gpu counted on the host: no device sync).
    order, math = module.expert_math(ids, backend, cpu_experts=c, prefetch_cpu_experts=share, slots=n_gpu)
    x = hidden.detach().to(where, math.act_dtype)  # [T, H]
    y = math.forward(x[order // k], keep=False)[1]  # [S_gpu, H]
    return unsort_sum(y * w.view(-1)[order, None].to(y.dtype), order, t, k)  # [T, H]


def _cpu_part(module, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, first: int,
              lora: dict[str, LoRAFactors], pinned: bool, started: threading.Event | None = None) -> torch.Tensor:
    """The slots routed to experts [first, E), on the CPU: [T, H] fp32 (page-locked when `pinned`), zero rows for
    tokens with none. x [T, H], ids [T, K] int64, w [T, K] fp32, all on the CPU. `started` is set when the GEMMs
    begin (or on the way out, whatever happens)."""
    try:
        return _cpu_slots(module, x, ids, w, first, lora, pinned, started)
    finally:
        if started is not None:
            started.set()


def _cpu_slots(module, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, first: int,
               lora: dict[str, LoRAFactors], pinned: bool, started: threading.Event | None) -> torch.Tensor:
    t, k = ids.shape
    h = module.weights.out_features("down_proj")
    flat = ids.view(-1)
    slots = (flat >= first).nonzero().flatten()  # [S_cpu] (token, k) slots of CPU experts
    if not len(slots):
        return torch.zeros(t, h, dtype=torch.float32, pin_memory=pinned)
    order = torch.argsort(flat[slots], stable=True)
    slots = slots[order]  # sorted by expert
    counts = torch.bincount(flat[slots], minlength=module.num_experts).tolist()
    groups = expert_groups(counts, range(first, module.num_experts))
    tok = slots // k
    w_sorted = w.view(-1)[slots]  # [S_cpu]
    math = CPU_MATH.get(format_key(module.weights.fmt), "loop")
    if started is not None:
        started.set()
    if math == "bf16" and _Bf16Math.grouped_ok(module.weights):
        # Every CPU expert in two grouped AMX GEMMs, x's rows gathered (and rounded to bf16) while packing; then the
        # weighted sum by token in one parallel pass (the same bits as the index_add_ below)
        y = _Bf16Math(module.weights, lora, module.mlp, groups).forward_grouped(x, tok, reuse=True)  # [S_cpu, H]
        return amx.scatter_rows(y, tok, w_sorted, t, out=torch.empty(t, h, dtype=torch.float32, pin_memory=pinned))
    if math == "kernel" and cpu_kernel.supports(module, cpu_kernel.MAX_TOKENS):
        y = kernel_rows(module, x[tok].float(), flat[slots], w_sorted)  # the routing weight applied
    else:
        math_cls = _Bf16Math if math == "bf16" else LoopMath
        y = math_cls(module.weights, lora, module.mlp, groups).forward(x[tok].float(), keep=False)[1]  # [S_cpu, H]
        y *= w_sorted[:, None]
    out = torch.zeros(t, h, dtype=torch.float32, pin_memory=pinned)
    out.index_add_(0, tok, y)
    return out


def kernel_rows(module, x: torch.Tensor, experts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row i = w[i] · Expert_{experts[i]}(x[i]) (with ``module.lora``) by the compiled kernel: x [S, H] fp32, experts
    [S] int64 (sorted, so that each chunk of cpu_kernel.MAX_TOKENS rows touches few experts), w [S] fp32 -> [S, H]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    ids, wk = experts.contiguous().view(-1, 1), w.contiguous().view(-1, 1)  # one (token, expert) pair per row, K = 1
    for start in range(0, len(x), cpu_kernel.MAX_TOKENS):
        rows = slice(start, start + cpu_kernel.MAX_TOKENS)
        cpu_kernel.moe_forward(module, x[rows], ids[rows], wk[rows], out[rows])
    return out


class _Bf16Math(LoopMath):
    """The CPU part's bf16 math (inference only: no backward). bf16-stored experts on an AMX CPU: every expert of
    the part in one grouped AMX GEMM a projection (:meth:`forward_grouped`; bf16 GEMM inputs, fp32 between them).
    Otherwise the per-expert loop with bf16 GEMMs (AMX where the CPU has it, else oneDNN) and bf16 activations between
    them, as the streamed GPU path computes."""

    def _bf16_linear(self, proj: str, x: torch.Tensor, e: int) -> torch.Tensor:
        # x [n, in] bf16 -> [n, out] bf16
        w = self.weights.matrix(proj, e).to(torch.bfloat16)  # [out, in]
        y = amx.linear(x, w, out_dtype=torch.bfloat16) if amx.usable(w) else nn.functional.linear(x, w)
        lo = self.lora.get(proj)
        bias = self.weights.bias
        if lo is None and bias is None:
            return y
        y = y.float()
        if bias is not None:
            y += bias[proj][e].float()
        if lo is not None:  # fp32 masters, fp32 products: the rank is small
            xf = x.float()
            y += lo.scale * ((xf @ lo.A[e].T) @ lo.B[e].T)
        return y.to(torch.bfloat16)

    @staticmethod
    def grouped_ok(weights) -> bool:
        """bf16-stored experts whose GEMMs AMX takes (:meth:`forward_grouped`)."""
        return (not weights.quantized and weights.gate_up.dtype == torch.bfloat16 and amx.usable(weights.gate_up[0])
                and amx.usable(weights.down[0]))

    def _grouped_linear(self, proj: str, x: torch.Tensor, rows: torch.Tensor | None = None,
                        reuse: bool = False) -> torch.Tensor:
        # x [S, in] (or [T, in] and rows [S]: see amx.grouped_linear), expert-sorted rows (self.groups) -> [S, out]
        # fp32: every expert's GEMM in one AMX call, then bias and LoRA per expert in fp32 where there are any;
        # reuse: into this thread's buffer for `proj` (_reused), valid until its next call here
        w = self.weights.tensor(proj)  # [E, out, in] bf16
        experts = [e for e, _ in self.groups]
        counts = [r.stop - r.start for _, r in self.groups]
        s_rows = x.shape[0] if rows is None else len(rows)
        out = _reused(proj, s_rows, w.shape[1]) if reuse else None
        y = amx.grouped_linear(x, w, experts, counts, rows=rows, out=out)  # [S, out] fp32
        lo, bias = self.lora.get(proj), self.weights.bias
        if lo is None and bias is None:
            return y
        xs = x if rows is None else x[rows]  # [S, in] (LoRA's input)
        for e, r in self.groups:
            if bias is not None:
                y[r] += bias[proj][e].float()
            if lo is not None:  # fp32 masters, fp32 products: the rank is small
                y[r] += lo.scale * ((xs[r].float() @ lo.A[e].T) @ lo.B[e].T)
        return y

    def forward_grouped(self, x: torch.Tensor, rows: torch.Tensor | None, reuse: bool = False) -> torch.Tensor:
        """x [T, H] (bf16 or fp32; the layer's hidden states), rows [S] (int64: the expert-sorted slots' tokens; None:
        x is [S, H], sorted) ->
        y [S, H] fp32: every CPU expert's gate_up in one AMX call, the gate in fp32, every down in one more. GEMM
        inputs are rounded to bf16 as the streamed GPU path's; the GEMMs' fp32 outputs are kept (this path is never
        less exact than the per-expert one). reuse: the GEMMs write into this thread's buffers (:func:`_reused`)
        and SiLU-GLU's gate runs in place there: y is valid until this thread's next call with reuse."""
        gu = self._grouped_linear("gate_up_proj", x, rows, reuse)  # [S, 2I] fp32
        if reuse and self.mlp.is_silu_glu:  # act(g) * up into g's columns of the buffer: the same ops, no new memory
            g, up = gu.chunk(2, dim=-1)  # [S, I] each (row stride 2I)
            h = nn.functional.silu(g, inplace=True).mul_(up)
        else:
            h = self.mlp(gu)  # [S, I]
        return self._grouped_linear("down_proj", h, reuse=reuse)  # [S, H] fp32

    def forward(self, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """x [S, H] fp32 -> (empty, y [S, H] fp32)."""
        if self.grouped_ok(self.weights):  # rows are the groups' in order (expert-sorted)
            return x.new_empty(0, 0), self.forward_grouped(x, None)
        y_out = x.new_empty(x.shape[0], self.weights.out_features("down_proj"))  # [S, H]
        for e, rows in self.groups:
            gu = self._bf16_linear("gate_up_proj", x[rows].to(torch.bfloat16), e)  # [n, 2I]
            y_out[rows] = self._bf16_linear("down_proj", self.mlp(gu), e)  # [n, H]
        return x.new_empty(0, 0), y_out


def _reused(name: str, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] fp32 from this thread's buffer `name` (:func:`amx.thread_buffer`). A CPU part's GEMM outputs are
    tens of MB a layer (V2-Lite, 16 CPU experts: 17 + 13 MB); allocated anew for each call, their memory came back
    from the OS fresh (glibc returns large blocks and trims its thread arenas), and the AMX region page-faulted
    through it: S15-f, the GEMMs' seconds 0.21 -> 0.63-0.81 a prefill, all 26 layers at once or none, by allocation
    history."""
    return amx.thread_buffer(f"split_{name}", rows * cols, torch.float32).view(rows, cols)


_worker: ThreadPoolExecutor | None = None
_worker_pid = -1
_worker_lock = threading.Lock()


def _submit(fn, *args) -> Future:
    """Run fn(*args) in the process's one CPU-share worker thread (started on first use, again after a fork:
    a forked child inherits the executor object but not its thread). Autograd off there too (thread-local)."""
    global _worker, _worker_pid
    with _worker_lock:
        if _worker is None or _worker_pid != os.getpid():
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridmoe-cpu-share")
            _worker_pid = os.getpid()
    return _worker.submit(_no_grad, fn, *args)


def _no_grad(fn, *args):
    """(fn(*args), seconds it took), autograd off."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return out, time.perf_counter() - t0

