"""How fast the GPU reads 4-bit expert weights from page-locked host memory (hybridmoe.experts.host_gemv), the rate
that sizes graph decode's mapped GPU share (hybridmoe.mapped_share).

    python benchmarks/host_gemv.py                       # gpt-oss-120b's expert (2880 x 2880, MXFP4), 1 and 2 experts
    python benchmarks/host_gemv.py --v2lite              # V2-Lite's (2048 x 1408, int4 group 64)
    python benchmarks/host_gemv.py --tiny --device cpu   # a check of the script (Triton's interpreter)

One "call" is one layer's share: the gate_up GEMV of n picked experts, then their down GEMV, as MappedShare runs
them (the activation between is left out), for picks drawn at random from --experts experts in host memory as the
loader keeps them (2 MiB pages, page-locked in place; `--where device`: the same weights in GPU memory, the
kernel's own limit). One JSON line per (where, n, tiling): µs a call and GB/s of codes and scales read. With
--ceilings, two lines for what PCIe gives here: the DMA copy of one expert's bytes to the GPU (torch's copy_), and a
Triton kernel that only reads (sums) them from host memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

_KEEP: list = []  # owners of the page-locked registrations


def _host(t: torch.Tensor) -> torch.Tensor:
    """t in host memory as the loader keeps experts: 2 MiB pages, page-locked in place (cudaHostRegister)."""
    from hybridmoe.experts.cpu_experts import advise_huge_pages, pin_host

    out = torch.empty(t.shape, dtype=t.dtype)
    advise_huge_pages(out)
    out.copy_(t)
    owner = type("Owner", (), {})()
    _KEEP.append(owner)
    if not pin_host(owner, [out]):
        raise SystemExit("cudaHostRegister refused the weights")
    return out


def _weights(e: int, rows: int, cols: int, kind: str, group: int, where: str, gen: torch.Generator):
    codes = torch.randint(0, 256, (e, rows, cols // 2), dtype=torch.uint8, generator=gen)
    if kind == "mxfp4":
        scales = torch.randint(118, 124, (e, rows, cols // group), dtype=torch.uint8, generator=gen)
    else:
        scales = (torch.rand(e, rows, cols // group, generator=gen) * 1e-3).to(torch.bfloat16)
    if where == "host":
        return _host(codes), _host(scales)
    return codes.to(where), scales.to(where)


def _timed(fn, calls: int, dev: torch.device) -> float:
    """µs a call of fn(c) over calls c = 0 .. calls-1 (after one untimed call)."""
    fn(calls)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in range(calls):
        fn(c)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _ceilings(codes: torch.Tensor, dev: torch.device, calls: int, gen: torch.Generator) -> None:
    """PCIe's rates here for one expert's bytes at a time, drawn at random: DMA and a read-only kernel."""
    import triton
    import triton.language as tl

    @triton.jit
    def _read(src, out, n, BLOCK: tl.constexpr):
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(src + off, mask=off < n, other=0)
        tl.store(out + tl.program_id(0), tl.sum(v, axis=0))

    words = codes.view(torch.int32).view(codes.shape[0], -1)  # [E, bytes / 4]
    n = words.shape[1]
    ids = torch.randint(0, codes.shape[0], (calls + 1,), generator=gen).tolist()
    dst = torch.empty(n, dtype=torch.int32, device=dev)
    sums = torch.empty(triton.cdiv(n, 4096), dtype=torch.int32, device=dev)
    for name, fn in (("dma_copy", lambda c: dst.copy_(words[ids[c]], non_blocking=True)),
                     ("read_kernel", lambda c: _read[(triton.cdiv(n, 4096),)](words[ids[c]], sums, n, BLOCK=4096))):
        us = _timed(fn, calls, dev)
        print(json.dumps({"bench": "host_read", "how": name, "bytes": n * 4, "us": round(us, 1),
                          "GBps": round(n * 4 / us / 1e3, 1)}), flush=True)


def _layer(gemv4, first, second, ids, kind, group, tiling):
    """One call: the gate_up GEMV of the picks, then their down GEMV ((input, output, (codes, scales)) each)."""

    def call(c: int) -> None:
        for x, out, (codes, scales) in (first, second):
            gemv4(x, ids[c], 0, codes, scales, None, kind, group, out, **tiling)

    return call


def _tiling(s: str) -> tuple[int, int, int]:
    rows, step, warps = (int(v) for v in s.split(","))
    return rows, step, warps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--v2lite", action="store_true", help="V2-Lite's expert: hidden 2048, intermediate 1408, int4")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--experts", type=int, default=32, help="experts to pick from (more than the GPU's L2 holds)")
    p.add_argument("--picks", type=int, nargs="*", default=[1, 2])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--device", default="cuda")
    p.add_argument("--where", nargs="*", default=["host", "device"])
    p.add_argument("--tilings", type=_tiling, nargs="*", default=[],
                   help="ROWS,STEP_BYTES,WARPS of the kernel (default: host_gemv's, 2,2048,2 unless "
                        "HYBRIDMOE_HOST_GEMV_TILING says otherwise)")
    p.add_argument("--ceilings", action="store_true", help="also PCIe's DMA and read-only kernel rates")
    args = p.parse_args()
    from hybridmoe.experts import host_gemv

    args.tilings = args.tilings or [(host_gemv.ROWS, host_gemv.STEP_BYTES, host_gemv.WARPS)]

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
        if args.ceilings and where == "host":
            _ceilings(gu[0], dev, args.calls, gen)
        for n in args.picks:
            x = torch.randn(1, h, device=dev).to(torch.bfloat16)
            a = torch.randn(n, i, device=dev).to(torch.bfloat16)
            u = torch.empty(n, 2 * i, device=dev)
            d = torch.empty(n, h, device=dev)
            width = -(-n // 2) * 2  # each call's ids 16-byte aligned, as MappedShare's buffer
            ids = torch.randint(0, args.experts, (args.calls + 1, width), generator=gen).to(dev)
            for rows, step, warps in args.tilings:
                tiling = dict(rows_per_program=rows, step_bytes=step, num_warps=warps)
                us = _timed(_layer(host_gemv.gemv4, (x, u, gu), (a, d, dn), ids, kind, group, tiling), args.calls, dev)
                print(json.dumps({"bench": "host_gemv", "where": where, "kind": kind, "group": group, "hidden": h,
                                  "inter": i, "picks": n, "rows": rows, "step_bytes": step, "warps": warps,
                                  "us_per_call": round(us, 1), "GBps": round(n * per_expert / us / 1e3, 1),
                                  "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
