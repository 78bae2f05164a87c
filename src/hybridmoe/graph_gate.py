"""Gates that let a CUDA graph be queued before the host data it reads exists.

Graph decode (:class:`hybridmoe.decode_graph.GraphChain`) alternates GPU stretches and the CPU's experts: graph i
ends by copying a layer's hidden state and routing to the host, the CPU computes the layer's experts, and graph i+1
starts by copying their output back. Launched only once the experts are done, each graph's launch (~35-50 µs of host
time for a stretch of ~50 kernels on the GPU host, S17-a..c) sits between the CPU's work and the GPU's, on every
layer of every token.

A gate moves the launch off that path. Graph i+1 begins with :func:`_gate_kernel`, one GPU warp that spins on an
int32 flag in page-locked host memory until the host sets it, then clears it for the next step; the host launches
graph i+1 while graph i still runs (its own time idle then, waiting for the routing), computes the experts, and opens
the gate (:meth:`HostGates.open`: one store). The GPU sees the flag within a PCIe read (~1-2 µs) and goes on.

Ordering: the experts' output is written (the CPU kernel's threads joined, or torch's ops returned) before the
flag's store, and x86 stores are seen in program order; the GPU reads host memory coherently, so the copy that
follows the gate reads the finished output. The kernel's clearing store lands before the host can set the flag again
(the host only sets it after waiting for a later graph of the same stream).

A launched gate must be opened exactly once, or its graph (and the stream) waits for ever: GraphChain opens a pending
gate on any error before it synchronizes and re-raises. CUDA with Triton only; ``HYBRIDMOE_GRAPH_GATES=0`` turns it
off (each graph is then launched after the experts, as before).
"""

from __future__ import annotations

import os

import torch

from hybridmoe.decode_norm import cuda_triton_unavailable

try:  # Triton ships with torch's CUDA wheels; CPU-only installs have none (and no use for this kernel)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["ENABLED", "HostGates", "unavailable"]

ENABLED = os.environ.get("HYBRIDMOE_GRAPH_GATES", "1") not in ("", "0", "false", "no", "off")

if triton is not None:

    @triton.jit
    def _gate_kernel(flag_ptr):
        # flag: one int32 in page-locked host memory (mapped into the device's address space). Volatile loads: each
        # iteration reads host memory again. Then cleared, so the next step's launch waits again.
        seen = tl.load(flag_ptr, volatile=True)
        while seen == 0:
            seen = tl.load(flag_ptr, volatile=True)
        tl.store(flag_ptr, 0)


def unavailable(device: torch.device) -> str | None:
    """Why graph decode on `device` launches each graph after the experts, or None when gates can run there."""
    return cuda_triton_unavailable(device, ENABLED, "HYBRIDMOE_GRAPH_GATES")


class HostGates:
    """``n`` gates, flags [n] int32 in page-locked host memory (on CUDA; plain memory for Triton's interpreter).

    :meth:`wait` queues gate i on the current stream (inside a graph capture: its first node), :meth:`open` sets it
    from the host. ``pending`` holds the gates queued by a replay and not yet opened (the caller's bookkeeping, so an
    error can open them: :meth:`open_pending`)."""

    def __init__(self, n: int, pin: bool = True):
        self.flags = torch.zeros(n, dtype=torch.int32, pin_memory=pin)  # [n], host
        self._host = self.flags.numpy()  # one store to set a flag, no torch op
        self.pending: set[int] = set()

    def __len__(self) -> int:
        return self.flags.shape[0]

    def wait(self, i: int) -> None:
        """Queue gate i: the stream's later work waits until the host opens it."""
        _gate_kernel[(1,)](self.flags[i:], num_warps=1)

    def open(self, i: int) -> None:
        """Let gate i's graph go on (everything it reads from the host is written)."""
        self._host[i] = 1
        self.pending.discard(i)

    def open_pending(self) -> None:
        """Open every queued gate (after an error: their graphs then run on whatever the buffers hold, and the
        stream drains instead of waiting for ever)."""
        for i in sorted(self.pending):
            self.open(i)
