"""Streaming routed-expert weights to the GPU for large token batches.

For a large batch (training steps, long prefills) the experts' FLOPs dwarf the cost of moving their weights: one
DeepSeek-V2-Lite MoE layer is 1.1 GB of bf16 weights, ~22 ms over PCIe from pinned memory, while the CPU needs
~100 ms to run 4096 tokens through it. So each layer's weights are copied into one of the GPU slots (two by default,
``stream_slots``) and the layer is computed there; the copy of the next layer runs on a side stream while the current
one computes (double buffering). The weights' only home stays the CPU: the slots are an LRU cache of a few layers,
and since passes alternate direction, the layers a pass ends on are the ones the next pass starts with.

The next layer is predicted from the direction of travel: forward passes walk up (l -> l+1); backward passes under
gradient checkpointing walk down, each layer requested twice in a row (recompute, then backward), so the second
request is a hit and the prefetch goes to l-1. A mispredicted layer costs one synchronous copy, never a wrong result:
a slot is looked up by layer index, and a copy into a slot waits for every kernel queued before it (which includes
all earlier readers of that slot).

Which slot a copy replaces depends on what comes next. Training alternates up and down, so the least recently used
slot goes (the layers a pass ends on start the next). Inference (``torch.inference_mode``: prefills, the server)
only walks up, pass after pass: there LRU would evict every layer just before it is needed again, so the slot whose
layer is needed furthest ahead in that cyclic order goes instead (Belady's rule for a known order). The first
``slots - 2`` layers then stay on the GPU between prompts, and more slots mean fewer bytes per prefill.

**Resident layers.** ``resident`` more slots are pinned to the first ``resident`` MoE layers: copied once when
streaming is set up (:meth:`ExpertStreamer.pin_resident`), never evicted, refreshed after :meth:`invalidate`. Every
call of a resident layer runs on the GPU whatever its size (``backends.choose_backend``): batched decode in the
server, eager decode, short prompts, training steps, and batch-1 graph decode computes them inside its graphs
(:mod:`hybridmoe.decode_graph`). A GPU with memory to spare thus takes those layers' expert reads off host RAM.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

log = logging.getLogger("hybridmoe")


@dataclass
class _Slot:
    layer: int | None = None
    # On the device, the layer's ExpertWeights.host_tensors(): gate_up [E, 2I, H], down [E, H, I] (+ int8 scales)
    tensors: list[torch.Tensor] = field(default_factory=list)
    ready: torch.cuda.Event | None = None  # recorded on the copy stream after the copy
    last_use: int = 0
    pinned: int | None = None  # the resident layer this slot always holds (never a victim), or None
    # How many of the layer's experts the slot holds: all of them, or the first E - c when a streamed inference call
    # computes the last c on the CPU (hybridmoe.experts.split). The buffers hold at least that many (_fill).
    experts: int = 0


@dataclass
class StreamStats:
    hits: int = 0  # requests served from a slot (already there or prefetched)
    copies: int = 0  # copies made on request (a miss: the compute waits for it)
    prefetches: int = 0  # copies started ahead of the request
    bytes: int = field(default=0)  # host->device bytes copied
    # CUDA events (start, end) around each copy while ExpertStreamer.time_copies is on (benchmarks): copy_seconds()
    copy_events: list = field(default_factory=list)

    def copy_seconds(self) -> float:
        """Seconds the copy stream spent in the timed copies (waits for their events: call after the work)."""
        return sum(a.elapsed_time(b) for a, b in self.copy_events) / 1e3


class ExpertStreamer:
    """Direction-predicting LRU cache of per-layer expert weights on one device (two slots by default).

    ``min_tokens``: batches with fewer tokens than this stay on the CPU (see ``backends.choose_backend``), except on
    the first ``resident`` layers, which stay on the device (pinned slots besides the ``num_slots`` rotating ones).
    On a CPU ``device`` the slots are host copies: the same bookkeeping runs (and is tested) without a GPU.
    """

    def __init__(self, device: torch.device | str, min_tokens: int, num_slots: int = 2, resident: int = 0):
        if num_slots < 2:
            raise ValueError(f"an ExpertStreamer needs at least 2 slots (double buffering), got {num_slots}")
        self.device = torch.device(device)
        self.min_tokens = min_tokens
        self.layers: list = []  # ExpertWeights, by stream index
        self.num_slots = num_slots
        self.resident = resident  # layers 0 .. resident-1 are pinned (clamped to the layers by pin_resident)
        self._slots = [_Slot() for _ in range(num_slots)]
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._last: int | None = None
        self._direction = 1
        self._clock = 0
        self.stats = StreamStats()
        self.time_copies = False  # record CUDA events around each copy into stats.copy_events (benchmarks)

    def register(self, weights) -> int:
        """Add one layer's ExpertWeights; returns its stream index (MoE layers in forward order)."""
        self.layers.append(weights)
        return len(self.layers) - 1

    def invalidate(self) -> None:
        """Forget cached layers (after the host weights change, e.g. an adapter merged into them); resident layers
        are copied again on their next use."""
        for s in self._slots:
            s.layer = None

    def is_resident(self, idx: int) -> bool:
        """Layer idx stays on the device (a pinned slot): every call of it may run there without a copy."""
        return 0 <= idx < self.resident

    def pin_resident(self) -> None:
        """Give the first ``resident`` layers (clamped to the registered ones) their pinned slots and copy them now;
        returns when the copies have landed."""
        self.resident = min(self.resident, len(self.layers))
        need = sum(self.layers[i].nbytes for i in range(self.resident))
        if self._cuda and need:
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > free:
                raise ConfigError(f"resident_expert_layers={self.resident} needs {need / 2**30:.2f} GiB of GPU memory "
                                  f"for expert weights but {free / 2**30:.2f} GiB is free on {self.device}; lower it "
                                  f"(one layer is {self.layers[0].nbytes / 2**30:.2f} GiB)")
            log.info("keeping the routed experts of %d MoE layer(s) on %s: %.2f GiB", self.resident, self.device,
                     need / 2**30)
        for idx in range(self.resident):
            if not any(s.pinned == idx for s in self._slots):
                self._slots.append(_Slot(pinned=idx))
        for idx in range(self.resident):
            self.resident_tensors(idx)
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def _pinned_slot(self, idx: int) -> _Slot:
        return next(s for s in self._slots if s.pinned == idx)

    def resident_tensors(self, idx: int) -> tuple[torch.Tensor, ...]:
        """A resident layer's tensors on the device (as :meth:`acquire`), with no prefetch and no bookkeeping: what
        a CUDA graph captures. Copies them (synchronously) only if :meth:`invalidate` dropped them."""
        slot = self._pinned_slot(idx)
        if slot.layer != idx:
            self._fill(slot, idx)
            if self._cuda:
                slot.ready.synchronize()
        return tuple(slot.tensors)

    @property
    def slot_bytes(self) -> int:
        return sum(t.nbytes for s in self._slots for t in s.tensors)

    def holds_all(self, idx: int) -> bool:
        """Whether a slot holds every expert of layer `idx` (then a request for it is a hit, whatever its share)."""
        return self._find(idx) is not None

    def acquire(self, idx: int, cpu_experts: int = 0, prefetch_cpu_experts: int | None = None,
                prefetch: bool = True) -> tuple[torch.Tensor, ...]:
        """Layer `idx`'s (gate_up [E, 2I, H], down [E, H, I]) on the device, ready for kernels on the current stream;
        for int8 weights also their scales (gate_up [E, 2I], down [E, H]).

        cpu_experts: c > 0 asks for the first E - c experts only (the CPU computes the others), and every tensor
        returned is then [E - c, ...]: a slot holding at least those is a hit, a copy moves only them (one DMA per
        tensor: a contiguous prefix). prefetch: start copying the layer the direction of travel predicts next (unless
        it is resident or already in a slot); prefetch_cpu_experts (default: cpu_experts): the c of that copy (a layer
        held whole is computed whole, but the next one is still split)."""
        if self._last is not None and idx != self._last:
            self._direction = 1 if idx > self._last else -1
        self._last = idx
        want = self._experts(idx) - cpu_experts
        slot = self._find(idx, want)
        if slot is None and self.is_resident(idx):  # dropped by invalidate(): back into its pinned slot
            slot = self._fill(self._pinned_slot(idx), idx)
            self.stats.copies += 1
        elif slot is None:
            slot = self._load(idx, keep=None, experts=want)
            self.stats.copies += 1
        else:
            self.stats.hits += 1
        self._clock += 1
        slot.last_use = self._clock
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        nxt = idx + self._direction
        if prefetch and 0 <= nxt < len(self.layers) and not self.is_resident(nxt):
            nxt_c = cpu_experts if prefetch_cpu_experts is None else prefetch_cpu_experts
            nxt_want = max(0, self._experts(nxt) - nxt_c)
            if self._find(nxt, nxt_want) is None:
                self._load(nxt, keep=slot, experts=nxt_want)
                self.stats.prefetches += 1
        return tuple(slot.tensors) if cpu_experts == 0 else tuple(t[:want] for t in slot.tensors)

    def _experts(self, idx: int) -> int:
        return self.layers[idx].gate_up.shape[0]

    def planned_slot_bytes(self, cpu_experts: int = 0) -> int:
        """Device bytes the streaming slots take once allocated (:attr:`slot_bytes`: what they hold now): each holds one
        layer (the largest), or in a split inference call its first E - `cpu_experts` experts (:meth:`_fill` sizes
        the buffers for what it copies; the tensors are [E, ...], so the share is exact per tensor)."""
        return self.num_slots * max((w.nbytes * (self._experts(i) - cpu_experts) // self._experts(i)
                                     for i, w in enumerate(self.layers)), default=0)

    def _find(self, idx: int, experts: int | None = None) -> _Slot | None:
        """The slot holding layer idx's first `experts` experts (default: all of them), or None."""
        want = self._experts(idx) if experts is None else experts
        return next((s for s in self._slots if s.layer == idx and s.experts >= want), None)

    def _victim(self, idx: int, keep: _Slot | None) -> _Slot:
        """The slot (other than `keep`) that layer idx's copy replaces: an empty one, else the one needed furthest
        ahead when passes only walk up (inference), else the least recently used. Pinned slots are never victims."""
        free = [s for s in self._slots if s is not keep and s.pinned is None]
        partial = [s for s in free if s.layer == idx]  # a share of this layer, asked for whole now: no duplicate
        if partial:
            return partial[0]
        empty = [s for s in free if s.layer is None]
        if empty:
            return empty[0]
        if torch.is_inference_mode_enabled():
            n = len(self.layers)
            return max(free, key=lambda s: (s.layer - idx) % n)  # next use of layer l after idx, walking up
        return min(free, key=lambda s: s.last_use)

    def _load(self, idx: int, keep: _Slot | None, experts: int | None = None) -> _Slot:
        """Copy layer idx (its first `experts` experts; default all) into the slot :meth:`_victim` picks."""
        return self._fill(self._victim(idx, keep), idx, experts)

    @staticmethod
    def _fits(buffers: list[torch.Tensor], host: list[torch.Tensor], rows: int) -> bool:
        """Whether a slot's buffers can take the first `rows` experts of a layer with these host tensors."""
        return len(buffers) == len(host) and all(
            b.dtype == h.dtype and b.shape[1:] == h.shape[1:] and b.shape[0] >= rows for b, h in zip(buffers, host))

    def _fill(self, slot: _Slot, idx: int, experts: int | None = None) -> _Slot:
        """Queue the copy of layer idx (its first `experts` experts; default all) into `slot` (on the copy stream;
        ``slot.ready`` marks its end)."""
        host = self.layers[idx].host_tensors()
        rows = self._experts(idx) if experts is None else experts
        # Slots allocated under torch.inference_mode (a prefill, the server) are inference tensors, which may not be
        # written outside it (a training step or transformers' generate after a hybridmoe one): allocate anew then.
        stale = not torch.is_inference_mode_enabled() and any(t.is_inference() for t in slot.tensors)
        if stale or not self._fits(slot.tensors, host, rows):
            # Sized for what is copied: a share's slot holds E - c experts (split calls leave c to the CPU), so a
            # split prefill's slots take (E - c) / E of a layer's GPU memory each. A slot grows when a bigger
            # share of a layer comes (a whole one for training, a smaller CPU share); it never shrinks.
            rows = max([rows] + [t.shape[0] for t in slot.tensors[:1] if not stale])
            slot.tensors = []  # the old buffers go before the new ones are allocated (GPU memory)
            slot.tensors = [torch.empty((min(rows, t.shape[0]),) + t.shape[1:], dtype=t.dtype, device=self.device)
                            for t in host]
        slot.layer = idx
        slot.experts = self._experts(idx) if experts is None else experts
        # a prefix along the expert dim: still one contiguous DMA per tensor
        pairs = [(dst[:slot.experts], src[:slot.experts]) for dst, src in zip(slot.tensors, host)]
        self.stats.bytes += sum(src.nbytes for _, src in pairs)
        if not self._cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return slot
        # Every kernel queued so far on the compute stream may still read this slot's previous layer: wait for them.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            start = None
            if self.time_copies:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self._copy_stream)
            # non_blocking: a DMA from pinned host memory (pageable memory would make it a synchronous staged copy)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            slot.ready = torch.cuda.Event(enable_timing=start is not None)
            slot.ready.record(self._copy_stream)
            if start is not None:
                self.stats.copy_events.append((start, slot.ready))
        return slot


def model_streamer(model) -> ExpertStreamer | None:
    """The streamer attached to `model`'s routed experts (one per model), or None when they always run on the CPU."""
    from .cpu_experts import HybridExperts

    return next((m.streamer for m in model.modules() if isinstance(m, HybridExperts) and m.streamer is not None), None)


def enable_streaming(model, device: torch.device | str, min_tokens: int, slots: int = 2,
                     resident: int = 0) -> ExpertStreamer | None:
    """Attach one streamer to every HybridExperts of `model` (in forward order). min_tokens <= 0 disables streaming
    (and the streamer, unless layers are resident).

    slots: layers of expert weights kept on the device (>= 2 for double buffering). Forward passes walk up and
    backward passes down, so the last `slots` layers of one pass are hits at the start of the next: a training step
    copies 2·(MoE layers - slots) layers instead of 2·(MoE layers - 2), at slots x one layer's bytes of GPU memory.
    resident: the first `resident` MoE layers stay on the device for good (copied here), in slots of their own.
    """
    from .cpu_experts import HybridExperts

    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    if (min_tokens <= 0 and resident <= 0) or not experts:
        for m in experts:
            m.streamer, m.stream_index = None, -1
        return None
    # min_tokens <= 0 with resident layers: only those run on the device, the others never stream
    streamer = ExpertStreamer(device, min_tokens if min_tokens > 0 else sys.maxsize,
                              num_slots=max(2, min(slots, len(experts))), resident=max(0, resident))
    for m in experts:
        m.streamer, m.stream_index = streamer, streamer.register(m.weights)
    streamer.pin_resident()
    return streamer
