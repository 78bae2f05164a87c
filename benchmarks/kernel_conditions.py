"""The CPU kernel's 4-bit read rate under the conditions of a real decode, one condition at a time.

`decode_gemv.py` times the kernel on a few layers called back to back; inside a decode (`big_models.py`'s breakdown)
the same kernel read 15-25% slower (S13-c..e: gpt-oss-120b's MXFP4 experts at 78-96 GB/s against 101-124 in
`decode_gemv.py` on the same host). Two conditions differ, and this script varies each alone:

- the working set: a decode walks every layer's experts (gpt-oss-120b: 36 layers of 128 experts, ~60 GB), the
  microbenchmark a few (~2 GB, which fits the TLB's reach on 2 MiB pages). Here the experts are random codes and
  scales written in place (no bf16 copy), so the whole model's size can be measured: `--layers 36 --experts 128`;
- the gap between calls: in a decode the host waits for the GPU's stretch between two layers (~0.1-0.2 ms, the main
  thread spinning on the CUDA event) while the kernel's threads idle. `--gap-us` spins that long after each call.

    python benchmarks/kernel_conditions.py --format mxfp4 --hidden 2880 --inter 2880 --topk 4 \\
        --layers 4 36 --experts 32 128 --gap-us 0 150          # the GPU host: gpt-oss-120b's dims
    python benchmarks/kernel_conditions.py --layers 2 --experts 8 --hidden 256 --inter 128 --calls 50   # smoke test

One JSON line per (working set, gap): the kernel's own GB/s (codes + scales read, over cpu_kernel.stats' time in
the kernel), its split and the threads' busy fractions, and GB/s over the wall time of the calls (without the gaps).
Layers are visited in order, as a decode does, each call with its own random top-k.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from big_models import random_block, tile_block
from torch import nn


def build(args, layers: int, experts: int) -> list:
    """`layers` HybridExperts modules of random 4-bit experts, allocated and written in place (2 MiB pages)."""
    from hybridmoe.experts import ExpertsSpec, HybridExperts
    from hybridmoe.experts.packed import PackedFormat

    fmt = PackedFormat(args.format, 32 if args.format == "mxfp4" else args.group)
    codes = random_block(torch.uint8)  # any byte is two valid codes
    g = torch.Generator().manual_seed(0)
    mods = []
    for _ in range(layers):
        m = HybridExperts(ExpertsSpec(experts, args.hidden, args.inter), nn.SiLU(), fmt)
        w = m.weights
        for t in (w.gate_up, w.down):
            tile_block(t, codes)
        for s in w.scales.values():
            if s.dtype == torch.uint8:  # MXFP4's e8m0 exponents: 2^-8 .. 2^-6
                scales = torch.randint(119, 122, (codes.numel(),), dtype=torch.uint8, generator=g)
            else:
                scales = torch.empty(codes.numel() // s.element_size(), dtype=s.dtype).uniform_(0.005, 0.02,
                                                                                                 generator=g)
            tile_block(s, scales.view(torch.uint8))
        mods.append(m)
    return mods


def layer_bytes(m, topk: int) -> int:
    """Bytes one call reads: `topk` experts' codes and scales."""
    w = m.weights
    per_expert = sum(t[0].nbytes for t in (w.gate_up, w.down, *w.scales.values()))
    return topk * per_expert


def measure(args, mods, gap_us: float) -> dict:
    from hybridmoe.experts import cpu_kernel

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, args.hidden, generator=g)
    out = torch.empty(1, args.hidden)
    experts = mods[0].weights.gate_up.shape[0]
    calls = [(i % len(mods), torch.randperm(experts, generator=g)[: args.topk].view(1, -1),
              torch.softmax(torch.randn(1, args.topk, generator=g), -1)) for i in range(args.calls)]
    for li, ids, w in calls[: len(mods)]:  # warm-up: one pass over the layers
        mods[li].infer_cpu(x, ids, w, out)
    cpu_kernel.stats(reset=True)
    busy = 0.0
    for li, ids, w in calls:
        t0 = time.perf_counter()
        mods[li].infer_cpu(x, ids, w, out)
        busy += time.perf_counter() - t0
        end = time.perf_counter() + gap_us * 1e-6
        while time.perf_counter() < end:  # the host's wait for the GPU's stretch: a spinning main thread
            pass
    st = cpu_kernel.stats(reset=True)
    nbytes = layer_bytes(mods[0], args.topk)
    kernel_s = (st["prep_us"] + st["region1_us"] + st["region2_us"]) * 1e-6
    return {"kernel_GBps": _sig(nbytes / kernel_s / 1e9), "wall_GBps": _sig(nbytes * len(calls) / busy / 1e9),
            **{k: _sig(v) for k, v in st.items() if k != "calls"}}


def _sig(v: float) -> float:
    """Four significant digits (toy sizes in the tests give small rates)."""
    return float(f"{v:.4g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["int4", "mxfp4"], default="int4")
    p.add_argument("--group", type=int, default=64, help="int4's group")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 26], help="working sets: layers ...")
    p.add_argument("--experts", type=int, nargs="+", default=[64], help="... of this many experts (paired in order)")
    p.add_argument("--gap-us", type=float, nargs="+", default=[0, 150], help="host spin between calls")
    p.add_argument("--calls", type=int, default=400)
    args = p.parse_args()

    from hybridmoe.experts import cpu_kernel

    if not cpu_kernel.available():
        raise SystemExit(f"the CPU kernel is {cpu_kernel.status()}")
    experts = args.experts + args.experts[-1:] * (len(args.layers) - len(args.experts))
    with torch.inference_mode():
        for layers, e in zip(args.layers, experts):
            mods = build(args, layers, e)
            gib = sum(t.nbytes for m in mods for t in m.weights.host_tensors()) / 2**30
            for gap in args.gap_us:
                rec = measure(args, mods, gap)
                print(json.dumps({"bench": "kernel_conditions", "format": args.format, "layers": layers, "experts": e,
                                  "working_set_gib": round(gib, 2), "gap_us": gap, "threads": torch.get_num_threads(),
                                  "isa": cpu_kernel.isa(), **rec}), flush=True)
            del mods


if __name__ == "__main__":
    main()
