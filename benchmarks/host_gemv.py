"""How fast the GPU reads 4-bit expert weights from page-locked host memory (hybridmoe.experts.host_gemv), the rate
that sizes graph decode's mapped GPU share (hybridmoe.mapped_share).

    python benchmarks/host_gemv.py                       # gpt-oss-120b's expert (2880 x 2880, MXFP4), 1 and 2 experts
    python benchmarks/host_gemv.py --v2lite              # V2-Lite's (2048 x 1408, int4 group 64)
    python benchmarks/host_gemv.py --tiny --device cpu   # a check of the script (Triton's interpreter)

One "call" is one layer's share: the gate_up GEMV of n picked experts, then their down GEMV, as MappedShare runs
them (the activation between is left out), for picks drawn at random from --experts experts in page-locked host
memory (`--where device`: the same weights in GPU memory, the kernel's own limit). One JSON line per (where, n):
µs a call and GB/s of codes and scales read.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _weights(e: int, rows: int, cols: int, kind: str, group: int, where: str, gen: torch.Generator):
    codes = torch.randint(0, 256, (e, rows, cols // 2), dtype=torch.uint8, generator=gen)
    if kind == "mxfp4":
        scales = torch.randint(118, 124, (e, rows, cols // group), dtype=torch.uint8, generator=gen)
    else:
        scales = (torch.rand(e, rows, cols // group, generator=gen) * 1e-3).to(torch.bfloat16)
    if where == "host":
        return codes.pin_memory(), scales.pin_memory()
    return codes.to(where), scales.to(where)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--v2lite", action="store_true", help="V2-Lite's expert: hidden 2048, intermediate 1408, int4")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--experts", type=int, default=32, help="experts to pick from (more than the GPU's L2 holds)")
    p.add_argument("--picks", type=int, nargs="*", default=[1, 2])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--device", default="cuda")
    p.add_argument("--where", nargs="*", default=["host", "device"])
    args = p.parse_args()
    from hybridmoe.experts import host_gemv

    h, i, kind, group = (2048, 1408, "int4", 64) if args.v2lite else (2880, 2880, "mxfp4", 32)
    if args.tiny:
        h, i, args.experts, args.calls = 128, 64, 4, 3
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    for where in args.where:
        loc = "host" if where == "host" and dev.type == "cuda" else str(dev)
        gu = _weights(args.experts, 2 * i, h, kind, group, loc, gen)
        dn = _weights(args.experts, h, i, kind, group, loc, gen)
        per_expert = sum(t[0].nbytes + t[1].nbytes for t in (gu, dn)) / args.experts
        for n in args.picks:
            x = torch.randn(1, h, device=dev).to(torch.bfloat16)
            a = torch.randn(n, i, device=dev).to(torch.bfloat16)
            u = torch.empty(n, 2 * i, device=dev)
            d = torch.empty(n, h, device=dev)
            ids = torch.randint(0, args.experts, (args.calls + 1, n), generator=gen).to(dev)

            def call(c: int) -> None:
                host_gemv.gemv4(x, ids[c], 0, gu[0], gu[1], None, kind, group, u)
                host_gemv.gemv4(a, ids[c], 0, dn[0], dn[1], None, kind, group, d)

            call(args.calls)  # compiles
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for c in range(args.calls):
                call(c)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            us = (time.perf_counter() - t0) / args.calls * 1e6
            print(json.dumps({"bench": "host_gemv", "where": where, "kind": kind, "group": group, "hidden": h,
                              "inter": i, "picks": n, "us_per_call": round(us, 1),
                              "GBps": round(n * per_expert / us / 1e3, 1),
                              "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
