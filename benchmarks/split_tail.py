"""The split's last CPU step alone: the CPU experts' rows weighted and summed by token into the [T, H] output.

After its GEMMs the CPU part of a split prefill (hybridmoe.experts.split) holds y [S, H] fp32, one row a (token, k)
slot routed to a CPU expert, sorted by expert. torch's way: y *= w; out = zeros(T, H); out.index_add_(0, tok, y)
(index_add_ runs serially). amx.scatter_rows: the same bits in one parallel pass over the output's rows. Both paths
alternate, `--repeats` times each:

    python benchmarks/split_tail.py [--tokens 1024] [--hidden 2048] [--cpu-experts 16] [--top-k 6] [--experts 64]

One JSON line per (path, repeat): ms a call, and whether the two agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hybridmoe.experts import amx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--cpu-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(args.experts, generator=g)[:args.top_k] for _ in range(args.tokens)])
    flat = ids.view(-1)
    slots = (flat >= args.experts - args.cpu_experts).nonzero().flatten()
    slots = slots[torch.argsort(flat[slots], stable=True)]  # sorted by expert, as the split has them
    tok, s = slots // args.top_k, len(slots)
    y0 = torch.randn(s, args.hidden, generator=g)
    w = torch.rand(s, generator=g)
    y, out = y0.clone(), torch.empty(args.tokens, args.hidden)

    def torch_tail() -> tuple[torch.Tensor, float]:
        y.copy_(y0)  # (the split scales its own buffer in place; restoring it is not timed below)
        t0 = time.perf_counter()
        y.mul_(w[:, None])
        o = torch.zeros(args.tokens, args.hidden)
        o.index_add_(0, tok, y)
        return o, time.perf_counter() - t0

    def c_tail() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        o = amx.scatter_rows(y0, tok, w, args.tokens, out=out)
        return o, time.perf_counter() - t0

    want = torch_tail()[0]
    same = torch.equal(c_tail()[0].view(torch.int32), want.view(torch.int32))
    for rep in range(args.repeats):
        for name, fn in (("torch", torch_tail), ("scatter_rows", c_tail)):
            total = sum(fn()[1] for _ in range(args.calls))
            print(json.dumps({"bench": "split_tail", "path": name, "repeat": rep, "slots": s,
                              "tokens": args.tokens, "hidden": args.hidden, "threads": torch.get_num_threads(),
                              "ms": round(total / args.calls * 1e3, 3), "bitwise_equal": same}), flush=True)


if __name__ == "__main__":
    main()
