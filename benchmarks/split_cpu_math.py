"""The CPU part of a split prefill (hybridmoe.experts.split): which per-expert math is faster on this host, by
weight format, at the DeepSeek-V2-Lite expert shape and a 1024-token prefill's ~96 tokens an expert.

    python benchmarks/split_cpu_math.py [--experts 16] [--tokens 96] [--tiny]

One JSON line per (format, math): ms for the experts, TFLOP/s. "loop" is the CPU path's LoopMath (GEMMs in the
stored format, fp32 activations), "bf16" bf16 GEMMs on per-expert bf16 weights with bf16 activations
(split._Bf16Math) through torch (oneDNN), "bf16_amx_tN" the same on AMX tiles with N threads (experts/amx.py, where
the CPU has AMX: bf16 experts in one grouped call a projection, int8 ones one call an expert), "kernel" the compiled
decode kernel over chunks of 64 expert-sorted rows (split.kernel_rows). The fastest per format goes into
split.CPU_MATH.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from torch import nn

from hybridmoe.experts import ExpertsSpec, HybridExperts, amx, cpu_kernel
from hybridmoe.experts.expert_math import LoopMath
from hybridmoe.experts.packed import PackedFormat
from hybridmoe.experts.split import _Bf16Math, kernel_rows


def _kernel(m, experts, w, x, keep):
    return kernel_rows(m, x, experts, w)


def _with_amx(fn, threads: int | None, x, keep):
    """fn with the AMX GEMMs on, with `threads` threads, or off (None)."""
    amx.ENABLED, amx.THREADS = threads is not None, threads or 0
    try:
        return fn(x, keep=keep)
    finally:
        amx.ENABLED, amx.THREADS = True, 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=16, help="experts computed (a quarter of V2-Lite's 64)")
    p.add_argument("--tokens", type=int, default=96, help="rows per expert (1024 tokens x top-6 / 64 experts)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="small dims: check the script")
    p.add_argument("--amx-threads", type=int, nargs="*", default=[0], help="AMX: threads (0: torch's)")
    p.add_argument("--formats", nargs="*", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    args = p.parse_args()
    h, i = (64, 32) if args.tiny else (2048, 1408)
    e, n = args.experts, args.tokens
    formats = {"bf16": torch.bfloat16, "int8": torch.int8, "int4": PackedFormat("int4", 32 if args.tiny else 64)}
    for fmt in (formats[f] for f in args.formats):
        m = HybridExperts(ExpertsSpec(e, h, i), nn.SiLU(), fmt)
        g = torch.Generator().manual_seed(0)
        for proj in ("gate_up_proj", "down_proj"):
            m.weights.write(proj, torch.randn(m.spec.shape(proj), generator=g) * 0.02)
        x = torch.randn(e * n, h, generator=g)
        groups = [(j, slice(j * n, (j + 1) * n)) for j in range(e)]
        experts = torch.arange(e).repeat_interleave(n)  # [e·n] sorted
        ones = torch.ones(e * n)
        bf16 = _Bf16Math(m.weights, {}, m.mlp, groups).forward
        maths = {"loop": LoopMath(m.weights, {}, m.mlp, groups).forward, "bf16": partial(_with_amx, bf16, None)}
        if amx.available():
            maths.update({f"bf16_amx_t{t}": partial(_with_amx, bf16, t) for t in args.amx_threads})
        if cpu_kernel.supports(m, cpu_kernel.MAX_TOKENS):
            maths["kernel"] = partial(_kernel, m, experts, ones)
        for name, fn in maths.items():
            fn(x, keep=False)  # warm-up (oneDNN primitive creation, the kernel's build)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                fn(x, keep=False)
            dt = (time.perf_counter() - t0) / args.repeats
            flops = 2 * e * n * 3 * h * i
            print(json.dumps({"bench": "split_cpu_math", "format": str(fmt).replace("torch.", ""), "math": name,
                              "experts": e, "tokens_per_expert": n, "ms": round(dt * 1e3, 1),
                              "tflops": round(flops / dt / 1e12, 3), "threads": torch.get_num_threads(),
                              "kernel_isa": cpu_kernel.isa() if name == "kernel" else None,
                              "amx": amx.status()}), flush=True)


if __name__ == "__main__":
    main()
