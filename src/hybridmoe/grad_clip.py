"""Gradient clipping over LoRA that lives on two devices, as ``torch.nn.utils.clip_grad_norm_`` (norm 2) computes it.

The routed-expert LoRA's gradients are CPU tensors (hundreds of MB for a 16B model: 443 MB of fp32 for V2-Lite at
r=8 on every target). torch's foreach norm reduces each CPU tensor to one scalar on one thread: 58 ms of every
training step on the GPU host's 16-core Xeon (S9-a, the GPU idle meanwhile), against ~10 ms for the in-place scaling
that follows. Here each CPU gradient is reduced by rows first (one output per row: ATen spreads them over the
threads), then the row norms; the GPU's gradients take torch's foreach norm as before. Same total norm (up to the
order of fp32 additions), same clip coefficient and in-place scaling as torch.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def _row_norms(g: torch.Tensor) -> torch.Tensor:
    """[rows] fp32: the 2-norm of each row of a CPU gradient (its first dim), parallel over rows."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0] if g.dim() > 1 else 1, -1), 2, dim=1, dtype=torch.float32)


class _EarlyRowNorms:
    """Row norms of host gradients computed ahead, while the backward still runs on the GPU.

    A streamed backward copies each expert-LoRA gradient device->host as its layer finishes
    (``cpu_experts._stage_grads``) and the buffer becomes the master's .grad when the pass ends; the clip's CPU norm
    then read all of them at once with the GPU idle (12.6 ms of a V2-Lite step, S10-e). ``submit`` has a worker wait
    for the copy's event and take the buffer's row norms meanwhile; the clip uses them for a gradient that is that
    buffer, unchanged since (the same tensor object at the same version: a gradient accumulated over micro-batches
    is not, and is reduced as before; a weak reference, so a freed buffer's address taken by another tensor never
    matches). The same op on the same data: bitwise the same norm."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # data_ptr -> (the buffer, weakly; its version when submitted; its row norms)
        self._ahead: dict[int, tuple[weakref.ref, int, Future]] = {}

    def submit(self, buf: torch.Tensor, ready) -> None:
        """buf: a host tensor being filled by an asynchronous copy; ready: an event (``synchronize()``) after it."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridmoe-norms")
            self._ahead[buf.data_ptr()] = (weakref.ref(buf), buf._version,
                                           self._pool.submit(_norms_when_ready, buf, ready))

    def take(self, g: torch.Tensor) -> torch.Tensor | None:
        """g's row norms if computed ahead on exactly this data, else None (then the caller reduces g itself)."""
        with self._lock:
            entry = self._ahead.pop(g.data_ptr(), None)
        if entry is None or entry[0]() is not g or entry[1] != g._version:
            return None
        return entry[2].result()


def _norms_when_ready(buf: torch.Tensor, ready) -> torch.Tensor:
    ready.synchronize()
    return _row_norms(buf)


EARLY_ROW_NORMS = _EarlyRowNorms()


def _device_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `grads` (one device), as a 0-dim fp32 tensor there."""
    if grads[0].device.type != "cpu":
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    rows = []
    for g in grads:  # [rows] each
        early = EARLY_ROW_NORMS.take(g)
        rows.append(early if early is not None else _row_norms(g))
    return torch.linalg.vector_norm(torch.cat(rows))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` in place so their joint 2-norm is at most `max_norm`; returns that norm before
    scaling (on the first gradient's device). Non-finite norms are returned, not raised (the trainer skips the step)."""
    return clip_grad_norm_deferred(params, max_norm)[0]


def clip_grad_norm_deferred(params: list[torch.Tensor], max_norm: float,
                            defer: list[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_grad_norm`, except that the gradients of the tensors in `defer` (CPU tensors) are left unscaled:
    (total norm, clip coefficient), and whoever takes `defer`'s gradients next multiplies them by the coefficient
    with the same ``torch._foreach_mul_`` (the overlapped optimizer step does, on its worker thread: bitwise the
    same gradients as scaling them here, without the host's ~19 ms for V2-Lite's expert LoRA while the GPU waits)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0), torch.tensor(1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    first = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([_device_norm(gs).to(first) for gs in by_device.values()]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the same rule and epsilon as torch
    later = {id(t.grad) for t in defer if t.grad is not None}
    for device, gs in by_device.items():
        now = [g for g in gs if id(g) not in later]
        if now:
            torch._foreach_mul_(now, coef.to(device))
    return total, coef
