"""The AMX bf16 GEMM (hybridmoe.experts.amx) alone, against torch's bf16 linear (oneDNN), at an MoE expert's shapes.

The CPU share of a streamed prefill runs, per expert, gate_up [2I, H] then down [H, I] on the ~n tokens routed to
it. This times both projections of `--experts` distinct experts in turn (more than the L3 holds at the default 64,
as in a prefill; `--experts 1` repeats one expert from cache: the arithmetic's ceiling), for each token count:

    python benchmarks/amx_gemm.py [--experts 64] [--tokens 32 96 256] [--hidden 2048 --inter 1408]

One JSON line per (tokens, path): ms an expert, TFLOP/s, the weights' GB/s; for AMX also where a call's time went
(amx.stats: packing the activations, the region, and per thread copying W's rows into tile order, the tiles, the
writes of y). Paths: oneDNN, AMX one call an expert and projection (amx_vN: prefetch variant N), AMX one call a
projection for all the experts (amx_grouped_vN, amx.grouped_linear).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from big_models import random_block, tile_block
from torch import nn

from hybridmoe.experts import amx


def _amx(variant: int, emulate: bool, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    amx.set_variant(variant)
    return amx.linear(a, w, emulate=emulate, out_dtype=torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 96, 256])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group", type=int, default=16, help="experts in one grouped call")
    p.add_argument("--variants", type=int, nargs="*", default=[amx.VARIANT],
                   help="amx_gemm.c's prefetches: 1 tiles two k-steps ahead, 2 the next block's rows into L2")
    p.add_argument("--emulate", action="store_true", help="the emulated tiles (any x86-64 CPU; checks the script)")
    args = p.parse_args()
    if not (amx.available() or args.emulate):
        raise SystemExit(f"AMX: {amx.status()}")
    e, h, i = args.experts, args.hidden, args.inter
    g = torch.Generator().manual_seed(0)
    block = random_block(torch.bfloat16)  # N(0, 0.02) bf16, tiled over the weights (fast to write at any size)
    wgu, wd = torch.empty(e, 2 * i, h, dtype=torch.bfloat16), torch.empty(e, h, i, dtype=torch.bfloat16)
    for w in (wgu, wd):
        tile_block(w, block)
    for n in args.tokens:
        x = torch.randn(n, h, generator=g).to(torch.bfloat16)  # bf16 in and out, as the split's bf16 math
        hx = torch.randn(n, i, generator=g).to(torch.bfloat16)
        paths = {"onednn": nn.functional.linear}
        paths.update({f"amx_v{v}": partial(_amx, v, args.emulate) for v in args.variants})
        for name, fn in paths.items():
            for j in range(min(e, 2)):  # warm-up
                fn(x, wgu[j]), fn(hx, wd[j])
            amx.stats(reset=True)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                for j in range(e):
                    fn(x, wgu[j])
                    fn(hx, wd[j])
            dt = (time.perf_counter() - t0) / args.repeats / e
            flops = 2 * n * 3 * h * i
            rec = {"bench": "amx_gemm", "path": name, "experts": e, "tokens": n, "hidden": h, "inter": i,
                   "ms_per_expert": round(dt * 1e3, 3), "tflops": round(flops / dt / 1e12, 3),
                   "weight_GBps": round(3 * h * i * 2 / dt / 1e9, 1), "threads": amx.THREADS or torch.get_num_threads()}
            if name.startswith("amx"):
                rec.update({k: round(v, 1) for k, v in amx.stats(reset=True).items()})
            print(json.dumps(rec), flush=True)
        # --group experts in one call a projection (amx.grouped_linear: what the split's bf16 math calls for bf16
        # experts, ~16 of V2-Lite's 64 at its default share)
        gs = min(args.group, e)
        xs, hs = x.repeat(gs, 1), hx.repeat(gs, 1)  # [gs·n, H], [gs·n, I]: n rows an expert
        for v in args.variants:
            amx.set_variant(v)
            grouped = [partial(amx.grouped_linear, experts=list(range(j, min(j + gs, e))), counts=[n] * gs,
                               emulate=args.emulate, out_dtype=torch.bfloat16) for j in range(0, e - gs + 1, gs)]
            grouped[0](xs, wgu), grouped[0](hs, wd)  # warm-up
            amx.stats(reset=True)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                for fn in grouped:
                    fn(xs, wgu)
                    fn(hs, wd)
            dt = (time.perf_counter() - t0) / args.repeats / (len(grouped) * gs)
            flops = 2 * n * 3 * h * i
            print(json.dumps({"bench": "amx_gemm", "path": f"amx_grouped{gs}_v{v}", "experts": e, "tokens": n, "hidden": h,
                              "inter": i, "ms_per_expert": round(dt * 1e3, 3), "tflops": round(flops / dt / 1e12, 3),
                              "weight_GBps": round(3 * h * i * 2 / dt / 1e9, 1),
                              "threads": amx.THREADS or torch.get_num_threads(),
                              **{k: round(v, 1) for k, v in amx.stats(reset=True).items()}}), flush=True)


if __name__ == "__main__":
    main()
