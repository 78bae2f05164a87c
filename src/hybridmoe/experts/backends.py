"""Which backend computes a routed-experts call: the one place that chooses.

Backends (all tested against :func:`hybridmoe.experts.formula.reference_moe`, tests/test_expert_backends.py):

- ``"kernel"``  the compiled CPU kernel (``moe_cpu.c``): inference, at most ``cpu_kernel.MAX_TOKENS`` tokens, the
  SiLU-GLU and gpt-oss's clamped SwiGLU (with biases), weights bf16/fp32/int8/int4/MXFP4 in RAM;
- ``"cpu"``     the per-expert torch loop on the CPU, next to the weights (training steps of few tokens, every variant);
- ``"grouped"`` grouped GEMMs on the compute device over the layer's weights streamed into a GPU slot (batches of at
  least ``stream_min_tokens``: training, long prefills), or kept there (resident layers: every batch);
- ``"device-loop"`` the per-expert loop on the device over the streamed slot, for shapes the grouped GEMM cannot take
  (rows not a multiple of 16 bytes).

Batch-1 graph decode (:mod:`hybridmoe.decode_graph`) calls :meth:`HybridExperts.infer_cpu`, which asks here too (with
``stream=False``: between graphs the experts always run on the CPU), and may hand a share of the experts to the GPU
(:class:`ExpertSettings.gpu_share`).

The streamed backends, the other way round: an inference call (no autograd) may compute the last
``round(E · cpu_share)`` experts of the layer on the CPU while the others stream in and run on the GPU
(:mod:`hybridmoe.experts.split`, :class:`ExpertSettings.cpu_share`).

The settings live on the model (``model.hybridmoe.settings``, shared by its experts blocks), not in module globals:
two models in one process can differ, and benchmarks change them through the same object users do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType

import torch

from . import amx, cpu_kernel

# The share of each batch-1 graph-decode step's routed experts that the GPU computes instead of the CPU, by the
# experts' format (ExpertWeights.fmt: a torch dtype, or "int4" / "mxfp4" for 4-bit): their weights cross PCIe by DMA
# while the CPU reads the others from RAM, so the two memory paths add up. round(K · share) of the top-K experts
# (V2-Lite, K=6, bf16: 2 of 6). Chosen by `benchmarks/v2lite.py decode --gpu-share ...` on the H200 host
# (BENCHMARKS.md, sessions 4 and 6). 4-bit: read by the GPU from host memory inside the decode graphs
# (hybridmoe.mapped_share), round(K · 0.2) of the top-K: 1 of gpt-oss's 4 and of V2-Lite's 6 (S18-c, `big_models.py
# --gpu-shares`, alternating in one process: gpt-oss MXFP4 34.9-35.6 tok/s at 1 of 4 against 30.7-33.0 at none, 24.3
# at 2 of 4; V2-Lite int4 68.3-71.9 at 1 of 6 against 63.4-67.3 at none, 61.7-64.2 at 2 of 6: the GPU reads host
# memory at ~27-38 GB/s, a third of the CPU's rate). Where it cannot be mapped, none (S12-b: copying a 4-bit share in
# cost the host more than the CPU saved; mapped_share.decode_share).
DEFAULT_GPU_SHARE = MappingProxyType({torch.bfloat16: 1 / 3, torch.float32: 1 / 3, torch.int8: 1 / 6,
                                      "int4": 0.2, "mxfp4": 0.2})

# The share of each layer's routed experts that the CPU computes in a streamed inference call (long prefills, the
# server's batched prefill) while the other experts' weights cross PCIe to the GPU (hybridmoe.experts.split), by the
# experts' format as above. 0 = off: the CPU part was the slower side at every share (session 7, oneDNN GEMMs).
DEFAULT_PREFILL_CPU_SHARE = MappingProxyType({torch.bfloat16: 0.0, torch.float32: 0.0, torch.int8: 0.0,
                                              "int4": 0.0, "mxfp4": 0.0})
# ... except bf16 experts on a CPU with AMX (experts/amx.py), whose split runs every CPU expert of a layer in two
# grouped AMX GEMMs: V2-Lite 1024-token prefill at the default 2 slots (BENCHMARKS.md, one process side by side
# each): S14-g share 0 1920-1924 tok/s, 0.2 2084-2105, 0.25 2121-2133, 0.3 1986-1995; S14-i 0 1925-1936, 0.2
# 2102-2116, 0.25 2174; session 15 (its GEMMs' outputs in reused buffers, S15-g/h): 0 1919-1930, 0.2 2058-2146,
# 0.25 2172-2242, 0.3 2095-2243, 0.35 1908-2112. 0.25: above 0.2 in all seven runs, and 0.3 is as often below it as
# above. On that host's 16 cores; the CPU part's speed goes with the cores, so fewer threads take a proportionally
# smaller share (more are not assumed to take more).
AMX_PREFILL_CPU_SHARE = 0.25
AMX_PREFILL_MEASURED_THREADS = 16


def default_prefill_cpu_share(weight_format) -> float:
    """The CPU's share of a streamed inference call's experts by default (on CUDA), by weight format; on AMX CPUs
    scaled by torch's threads against the measured host's."""
    key = format_key(weight_format)
    if key == torch.bfloat16 and amx.available():
        return AMX_PREFILL_CPU_SHARE * min(1.0, torch.get_num_threads() / AMX_PREFILL_MEASURED_THREADS)
    return DEFAULT_PREFILL_CPU_SHARE.get(key, 0.0)


def format_key(fmt) -> torch.dtype | str:
    """The key of a weights format in per-format tables: the torch dtype, or the 4-bit kind ("int4", "mxfp4")."""
    return getattr(fmt, "kind", fmt)


@dataclass
class ExpertSettings:
    """How a model's routed experts run; one object per model (``model.hybridmoe.settings``), read at each call.

    cpu_kernel: use the compiled CPU kernel where it applies (default from ``HYBRIDMOE_CPU_KERNEL``, else on).
    gpu_share:  share of batch-1 graph-decode experts computed on the GPU; None = :data:`DEFAULT_GPU_SHARE` by
                weight format on CUDA, 0 elsewhere.
    cpu_share:  share of each layer's experts computed on the CPU in a streamed inference call (the last
                round(E · cpu_share) of them); None = :func:`default_prefill_cpu_share` by weight format on CUDA
                (AMX_PREFILL_CPU_SHARE for bf16 experts on an AMX CPU, else 0), 0 elsewhere.
    compile_decode: torch.compile the GPU stretches of batch-1 graph decode between the CPU's experts (CUDA
                only; :mod:`hybridmoe.decode_compile`): fused kernels in the graphs, for a first step that compiles
                (~12 s for DeepSeek-V2-Lite on the H200 host, S14-a). Default from ``HYBRIDMOE_COMPILE_DECODE`` (off).
    """

    cpu_kernel: bool = cpu_kernel.ENV_ENABLED
    gpu_share: float | None = None
    cpu_share: float | None = None
    compile_decode: bool = os.environ.get("HYBRIDMOE_COMPILE_DECODE", "0") not in ("", "0", "false", "no", "off")

    def decode_gpu_share(self, weight_format, device: torch.device) -> float:
        """weight_format: ExpertWeights.fmt (a torch dtype or a PackedFormat)."""
        if self.gpu_share is not None:
            return self.gpu_share
        return DEFAULT_GPU_SHARE.get(format_key(weight_format), 0.0) if device.type == "cuda" else 0.0

    def prefill_cpu_experts(self, weight_format, num_experts: int, device: torch.device) -> int:
        """How many of a layer's `num_experts` experts (the last ones) the CPU computes in a streamed inference call
        on `device` (the streamer's); 0 = none."""
        share = self.cpu_share
        if share is None:
            share = default_prefill_cpu_share(weight_format) if device.type == "cuda" else 0.0
        return min(num_experts, max(0, round(num_experts * share)))


def choose_backend(module, tokens: int, grad: bool, stream: bool = True) -> str:
    """The backend for one call of `module` (a HybridExperts) on `tokens` tokens; `grad`: a backward will follow;
    `stream`: the call may run on the device (False for graph decode's CPU cut). A resident layer (its weights kept
    on the device, ``resident_expert_layers``) runs there whatever the batch size."""
    streamer = module.streamer
    if stream and streamer is not None and (tokens >= streamer.min_tokens or streamer.is_resident(module.stream_index)):
        return "grouped" if grouped_shapes_ok(module.weights) else "device-loop"
    if not grad and module.settings.cpu_kernel and cpu_kernel.supports(module, tokens):
        return "kernel"
    return "cpu"


def grouped_shapes_ok(weights) -> bool:
    """Grouped GEMMs need every row stride to be a multiple of 16 bytes (true of every released model's dims); int8
    and 4-bit weights are dequantized to bf16 on the device first."""
    size = 2 if weights.quantized else weights.gate_up.element_size()
    dims = [f(p) for p in ("gate_up_proj", "down_proj") for f in (weights.out_features, weights.in_features)]
    return all(d * size % 16 == 0 for d in dims)
