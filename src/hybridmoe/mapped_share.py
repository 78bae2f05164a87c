"""Graph decode's GPU share of 4-bit experts, read by the GPU straight from host RAM (no copies queued by the host).

A batch-1 decode step reads each layer's picked experts from host RAM. The CPU kernel reads at the host's memory
bandwidth (~90 GB/s on the GPU host); the GPU can read page-locked host memory over PCIe at the same time. The copy
share (``decode_graph._GpuShare``) used that path by queueing DMA copies of the share's experts once their ids were on
the host, ~0.12 ms of host time a layer before the CPU could start (S16-b: no gain for gpt-oss), and it keeps graph
gates off. Here the GPU's own kernels (:func:`hybridmoe.experts.host_gemv.gemv4`) read the last ``n`` of the K
picked experts' codes and scales through the page-locked pages' device mapping, taking the ids from device memory:

    graph i     ... router; copy (hidden, ids, weights) to the host; stage them for the share (device copies)
    CPU         the first K - n experts                          | GPU: the share's gate_up GEMV, activation, down
    graph i+1   [share kernels, captured at its head] gate; copy the CPU's part in; + the share's part; ...

Graph i+1 is launched at a gate (:mod:`hybridmoe.graph_gate`) before the CPU starts, so its head (the share) runs on
the GPU while the CPU computes; the host queues nothing per layer. The math is the streamed path's (bf16 weights and
inputs, fp32 sums, outputs rounded to bf16, fp32 biases, the weighted sum in fp32 in pick order), as the copy
share's.

Used for batch 1 with int4 or MXFP4 experts in page-locked host memory, CUDA and Triton, and graph gates (without
them graph i+1, and its share, would start only after the CPU's part). ``HYBRIDMOE_MAPPED_SHARE=0`` turns it off;
the share's size is ``settings.gpu_share`` (default 0.2 for 4-bit experts, :data:`hybridmoe.experts.backends.
DEFAULT_GPU_SHARE`: 1 of gpt-oss's 4 picks, 1 of V2-Lite's 6).
"""

from __future__ import annotations

import os

import torch

from hybridmoe import graph_gate
from hybridmoe.experts import HybridExperts, host_gemv

__all__ = ["ENABLED", "MappedShare", "decode_share", "unavailable"]

ENABLED = os.environ.get("HYBRIDMOE_MAPPED_SHARE", "1") not in ("", "0", "false", "no", "off")


def unavailable(weights, device: torch.device) -> str | None:
    """Why batch-1 graph decode on `device` cannot read a share of these experts (an ExpertWeights) from host
    memory on the GPU, or None when it can. On the CPU only under Triton's interpreter (the tests)."""
    if not ENABLED:
        return "HYBRIDMOE_MAPPED_SHARE=0"
    if weights.packed is None:
        return "int4 and MXFP4 experts only"
    if not host_gemv.available():
        return "Triton is not installed"
    if device.type == "cpu":
        return None if os.environ.get("TRITON_INTERPRET") == "1" else "CUDA only"
    if device.type != "cuda":
        return "CUDA only"
    if not weights.gate_up.is_pinned():
        return "the experts are not page-locked (expert streaming is off)"
    return graph_gate.unavailable(device)


def decode_share(module: HybridExperts, device: torch.device, batched: bool = False) -> tuple[float, bool]:
    """(share, mapped): the share of each decode step's experts the GPU computes for this model (its setting, else
    the default by weight format), and whether that share is read from host memory here (this module: batch 1)
    rather than copied in. 4-bit experts get no share by default where it cannot be mapped (their copies cost the
    host more than the CPU saves, S12-b), batched steps included; a share set explicitly is kept (copied)."""
    settings, weights = module.settings, module.weights
    share = settings.decode_gpu_share(weights.fmt, device)
    mapped = not batched and weights.packed is not None and unavailable(weights, device) is None
    if weights.packed is not None and not mapped and settings.gpu_share is None:
        share = 0.0
    return share, mapped and share > 0


class MappedShare:
    """The last ``n`` of each token's top-``k`` experts of every cut layer, computed on the GPU from host memory.

    One set of device buffers serves every layer (they run one after another on one stream): the cut's input and
    routing (:meth:`stage`, queued at the end of the cut's graph), the projections' outputs, and ``y`` [1, H] fp32,
    the weighted sum that the next graph adds to the CPU's part (``_Cut.receive``)."""

    graph = None  # (the copy share's own graph; this share's kernels are captured in the chain's graphs)

    def __init__(self, module: HybridExperts, hidden: torch.Tensor, k: int, n: int):
        w, dev = module.weights, hidden.device
        self.n, self.k = n, k
        h = hidden.shape[1]
        self.x = torch.empty(1, h, dtype=torch.bfloat16, device=dev)  # [1, H] the cut's input
        self.ids = torch.empty(k, dtype=torch.int64, device=dev)  # [K] its picks
        self.w = torch.empty(1, k, dtype=torch.float32, device=dev)  # [1, K] their weights
        self.u = torch.empty(n, w.gate_up.shape[1], dtype=torch.float32, device=dev)  # [n, U] gate_up outputs
        self.d = torch.empty(n, h, dtype=torch.float32, device=dev)  # [n, H] down outputs
        self.y = torch.zeros(1, h, dtype=torch.float32, device=dev)  # [1, H] their weighted sum

    def stage(self, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Keep the cut's input and routing for :meth:`compute` (device copies, queued in the cut's graph)."""
        self.x.copy_(hidden)
        self.ids.copy_(ids[0])
        self.w.copy_(w)

    def compute(self, module: HybridExperts) -> None:
        """Queue y = Σ_s w[k-n+s] · Expert_{ids[k-n+s]}(x) of `module`'s experts (no host sync: capturable)."""
        wt, fmt, slot0 = module.weights, module.weights.packed, self.k - self.n
        bias = wt.bias or {}
        host_gemv.gemv4(self.x, self.ids, slot0, wt.gate_up, wt.scales["gate_up_proj"], bias.get("gate_up_proj"),
                        fmt.kind, fmt.group, self.u)
        a = module.mlp(self.u).to(torch.bfloat16).contiguous()  # [n, I]
        host_gemv.gemv4(a, self.ids, slot0, wt.down, wt.scales["down_proj"], bias.get("down_proj"), fmt.kind,
                        fmt.group, self.d)
        self.y.zero_()
        for s in range(self.n):  # in pick order, as the CPU sums its part
            self.y += self.w[:, slot0 + s, None] * self.d[s:s + 1]

    def capture(self, stream: torch.cuda.Stream) -> None:
        """Nothing to capture apart: :meth:`compute` is queued inside the chain's graphs."""
