"""Decode-size expert GEMVs on the CPU: which kernel reads the weights fastest (the batch-1 decode limit).

    python benchmarks/decode_gemv.py                      # V2-Lite shapes, 8 layers of 64 experts, all threads
    python benchmarks/decode_gemv.py --threads 8 16       # thread counts to compare
    python benchmarks/decode_gemv.py --threads 16 --pages 4k 2m --prefetch 0 1024 4096   # kernel memory settings
    python benchmarks/decode_gemv.py --layers 1 --hidden 256 --inter 128 --calls 50   # smoke test

One "call" is one MoE layer for one token: top-6 experts picked at random from a random one of --layers layers (so the
weights come from RAM, not the 300 MB L3), each expert's gate_up GEMV [2I, H], SiLU·up, down GEMV [H, I], weighted sum.
Strategies, one JSON line each (ms per layer, GB/s of weights read, relative error against fp32 math; for the kernel
also its own split of a call, cpu_kernel.stats: microseconds before and in its two parallel regions, and how busy the
threads were in each):
- bf16_linear:   F.linear per expert on bf16 weights (what the CPU path does today);
- bf16_matmul_t: x @ W.T per expert through torch.matmul on the transposed view (another dispatch to the same GEMV);
- int8pack:      torch._weight_int8pack_mm on int8 weights with per-output-channel scales (half the bytes; the
                 accuracy cost shows in rel_err);
- hybrid_torch_loop: HybridExperts.infer_cpu with the compiled kernel off (the whole torch call: sort, per-expert
                 loop, combine) on the same bf16 weights;
- kernel_{bf16,int8,int4gG}_{isa}_{pages}_pf{N}: HybridExperts.infer_cpu through the compiled kernel (moe_cpu.c:
                 two parallel regions a layer): each instruction set the CPU has, the weights on 4 KiB or 2 MiB pages,
                 software prefetch N bytes ahead; int4 with each group size of --int4-groups (GB/s counts the bytes
                 of 4-bit codes and their scales actually read: int4's bf16, MXFP4's e8m0 bytes). GB/s is over the
                 whole Python call (HybridExperts.infer_cpu, ~0.1 ms of it outside the kernel on the GPU host);
                 kernel_GBps over the kernel's own time (cpu_kernel.stats: prep + both regions), the rate graph
                 decode gets (it calls the kernel prepared, ~20 µs a layer outside it), and outside_us the rest.
- kernel_{fmt}_{isa}_..._prepared (--prepared): graph decode's call, cpu_kernel.prepared on fixed buffers, one
                 prepared call per route made beforehand (graph decode's buffers are rewritten by DMA, not Python);
                 outside_us is then what the prepared call costs beyond the kernel's own time.
The limit is the host's memory bandwidth: measured here by read-only sweeps over 2 GiB with every thread (the best
of the `memory_read` and `memory_read_kernel` lines; --limit-gbps overrides), and each line gives its fraction of it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn
from torch.nn import functional as F


def _layers(args, g):
    """[(gate_up [E, 2I, H] bf16, down [E, H, I] bf16)] for each layer, random N(0, 0.02)."""
    out = []
    for _ in range(args.layers):
        gu = (torch.randn(args.experts, 2 * args.inter, args.hidden, generator=g) * 0.02).bfloat16()
        d = (torch.randn(args.experts, args.hidden, args.inter, generator=g) * 0.02).bfloat16()
        out.append((gu, d))
    return out


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: w [E, N, K] -> (q [E, N, K] int8, scale [E, N] bf16)."""
    scale = w.float().abs().amax(-1).clamp_min(1e-12) / 127
    q = (w.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.bfloat16()


def _expert_bf16(x, gu, d, e, mm):
    h = mm(x, gu[e])  # [1, 2I]
    g, u = h.float().chunk(2, dim=-1)
    return mm((F.silu(g) * u).bfloat16(), d[e]).float()  # [1, H]


def _strategies(layers, qlayers):
    lin = lambda x, w: F.linear(x, w)  # noqa: E731
    mat = lambda x, w: torch.matmul(x, w.T)  # noqa: E731

    def int8(x, li, e):
        (qgu, sgu), (qd, sd) = qlayers[li]
        h = torch._weight_int8pack_mm(x, qgu[e], sgu[e])
        g, u = h.float().chunk(2, dim=-1)
        return torch._weight_int8pack_mm((F.silu(g) * u).bfloat16(), qd[e], sd[e]).float()

    return {
        "bf16_linear": lambda x, li, e: _expert_bf16(x, *layers[li], e, lin),
        "bf16_matmul_t": lambda x, li, e: _expert_bf16(x, *layers[li], e, mat),
        "int8pack": int8,
    }


def _reference(x, gu, d, e):
    h = x.float() @ gu[e].float().T
    g, u = h.chunk(2, dim=-1)
    return (F.silu(g) * u) @ d[e].float().T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--limit-gbps", type=float, default=None, help="host read bandwidth (default: measured here)")
    p.add_argument("--int4-groups", type=int, nargs="*", default=[64], help="int4 group sizes to compare")
    p.add_argument("--mxfp4", action="store_true", help="also MXFP4 weights (gpt-oss's experts as shipped)")
    p.add_argument("--prepared", action="store_true", help="also the kernel called as graph decode calls it")
    p.add_argument("--pages", nargs="+", choices=["4k", "2m"], default=["4k"],
                   help="kernel: expert weights on 4 KiB pages and/or on 2 MiB (transparent huge) pages")
    p.add_argument("--prefetch", type=int, nargs="+", default=[0], help="kernel: software prefetch distances, bytes")
    p.add_argument("--chunk", type=int, nargs="*", default=[],
                   help="kernel: OpenMP work items per dynamic chunk to compare (0: static, -1: guided scheduling)")
    p.add_argument("--item-rows", type=int, nargs="*", default=[],
                   help="kernel: weight rows per work item to compare (at the first chunk of --chunk, else the default)")
    p.add_argument("--batch-tokens", type=int, nargs="*", default=[],
                   help="also time calls of this many tokens (kernel vs torch loop, bf16): where the kernel stops paying")
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    layers = _layers(args, g)
    qlayers = [(_quantize(gu), _quantize(d)) for gu, d in layers]
    routes = [(int(torch.randint(args.layers, (1,), generator=g)),
               torch.randperm(args.experts, generator=g)[: args.topk].tolist(),
               torch.softmax(torch.randn(args.topk, generator=g), 0)) for _ in range(args.calls)]
    x = torch.randn(1, args.hidden, generator=g).bfloat16()
    bytes_bf16 = args.topk * 3 * args.hidden * args.inter * 2  # per layer per token

    from hybridmoe.experts import ExpertsSpec, HybridExperts, cpu_kernel

    def module(dtype, tensors):
        m = HybridExperts(ExpertsSpec(args.experts, args.hidden, args.inter), nn.SiLU(), dtype)
        m.weights.replace_host_tensors(tensors)  # share the tensors: no second copy
        return m

    from hybridmoe.experts.cpu_experts import advise_huge_pages

    def on_pages(t, pages):
        """t itself (4 KiB pages, as allocated), or a copy whose memory asked for 2 MiB pages before it was written."""
        if pages == "4k":
            return t
        c = torch.empty_like(t)
        advise_huge_pages(c)
        return c.copy_(t)

    from hybridmoe.experts.packed import PackedFormat, quantize_int4, quantize_mxfp4

    int4_layers = {}  # group -> [((codes, scales) gate_up, (codes, scales) down)] per layer
    for grp in args.int4_groups:
        int4_layers[grp] = [(_per_expert(quantize_int4, gu, grp), _per_expert(quantize_int4, d, grp)) for gu, d in layers]
    packed = {f"int4g{grp}": (PackedFormat("int4", grp), ql) for grp, ql in int4_layers.items()}
    if args.mxfp4:
        packed["mxfp4"] = (PackedFormat("mxfp4", 32), [(_per_expert(lambda w, _: quantize_mxfp4(w), gu, 32),
                                                       _per_expert(lambda w, _: quantize_mxfp4(w), d, 32))
                                                      for gu, d in layers])
    mods = {}
    for pages in args.pages:
        for name, (fmt, ql) in packed.items():
            mods[name, pages] = [module(fmt, [on_pages(t, pages) for t in (c1, c2, s1, s2)]) for (c1, s1), (c2, s2) in ql]
        mods["bf16", pages] = [module(torch.bfloat16, [on_pages(t, pages) for t in (gu, d)]) for gu, d in layers]
        mods["int8", pages] = [module(torch.int8, [on_pages(t, pages) for t in (qgu, qd, sgu, sd)])
                               for (qgu, sgu), (qd, sd) in qlayers]
    out = torch.empty(1, args.hidden)

    def hybrid(dtype, kernel_isa, pages="4k", prefetch=0, chunk=cpu_kernel.CHUNK, rows=cpu_kernel.ITEM_ROWS):
        """HybridExperts.infer_cpu: the compiled kernel with the given instruction set, or (None) the torch loop."""
        def call(li, experts, w):
            m = mods[dtype, pages][li]
            m.settings.cpu_kernel = kernel_isa is not None  # the setting users change: model.hybridmoe.settings
            if kernel_isa is not None:
                cpu_kernel.set_isa(kernel_isa)
                cpu_kernel.set_prefetch(prefetch)
                cpu_kernel.set_chunk(chunk)
                cpu_kernel.set_item_rows(rows)
            m.infer_cpu(x, torch.tensor([experts]), w.view(1, -1), out)
            return out.clone()
        return call

    def prepared_calls(dtype, pages, prefetch):
        """Per route index, a call of no arguments (cpu_kernel.prepared) on its own page-size buffers."""
        made = {}
        for r, (li, experts, w) in enumerate(routes):
            bufs = (x.float(), torch.tensor([experts]), w.view(1, -1).float().contiguous(), torch.empty(1, args.hidden))
            made[r] = (cpu_kernel.prepared(mods[dtype, pages][li], *bufs), bufs[3])

        def call(li, experts, w, r=None):
            cpu_kernel.set_prefetch(prefetch)
            fn, o = made[r]
            fn()
            return o.clone()
        call.prepared = made  # the timing loop calls these directly
        return call

    hybrid_calls = {"hybrid_torch_loop": hybrid("bf16", None, args.pages[0])}
    if cpu_kernel.available():
        best = cpu_kernel.isa()
        for isa in cpu_kernel.isas():  # every instruction set at the first page size and prefetch distance
            for dt in ("bf16", "int8", *packed):
                hybrid_calls[f"kernel_{dt}_{isa}_{args.pages[0]}_pf{args.prefetch[0]}"] = hybrid(
                    dt, isa, args.pages[0], args.prefetch[0])
        for pages in args.pages:  # the best one at every page size and prefetch distance
            for pf in args.prefetch:
                for dt in ("bf16", "int8", *packed):
                    hybrid_calls.setdefault(f"kernel_{dt}_{best}_{pages}_pf{pf}", hybrid(dt, best, pages, pf))
        for chunk in args.chunk:  # OpenMP scheduling, at the first page size and prefetch distance
            for dt in ("bf16", "int8", *packed):
                hybrid_calls[f"kernel_{dt}_{best}_{args.pages[0]}_pf{args.prefetch[0]}_chunk{chunk}"] = hybrid(
                    dt, best, args.pages[0], args.prefetch[0], chunk)
        for rows in args.item_rows:  # rows per work item, at the first chunk given
            chunk = args.chunk[0] if args.chunk else cpu_kernel.CHUNK
            for dt in ("bf16", "int8", *packed):
                hybrid_calls[f"kernel_{dt}_{best}_{args.pages[0]}_pf{args.prefetch[0]}_chunk{chunk}_rows{rows}"] = (
                    hybrid(dt, best, args.pages[0], args.prefetch[0], chunk, rows))
        cpu_kernel.set_isa(best)
        cpu_kernel.set_chunk(cpu_kernel.CHUNK)
        cpu_kernel.set_item_rows(cpu_kernel.ITEM_ROWS)
        if args.prepared:  # graph decode's way: cpu_kernel.prepared on fixed buffers, one per route
            for dt in ("bf16", "int8", *packed):
                hybrid_calls[f"kernel_{dt}_{best}_{args.pages[0]}_pf{args.prefetch[0]}_prepared"] = prepared_calls(
                    dt, args.pages[0], args.prefetch[0])

    strategies = _strategies(layers, qlayers)
    limit = args.limit_gbps or _read_bandwidth(max(args.threads))
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, fn in [*strategies.items(), *hybrid_calls.items()]:
                def layer_call(li, experts, w, fn=fn, name=name):
                    if name in hybrid_calls:
                        return fn(li, experts, w)
                    return sum(w[k] * fn(x, li, e) for k, e in enumerate(experts))

                made = getattr(fn, "prepared", None)
                if made is not None:  # prepared calls: nothing but the call in the timed loop
                    fn(0, None, None, r=0)  # its prefetch setting
                    for r in range(10):
                        made[r][0]()
                    cpu_kernel.stats(reset=True)
                    t0 = time.perf_counter()
                    for r in range(len(routes)):
                        made[r][0]()
                    s = (time.perf_counter() - t0) / len(routes)
                else:
                    for li, ex, w in routes[:10]:  # warm-up
                        layer_call(li, ex, w)
                    cpu_kernel.stats(reset=True)
                    t0 = time.perf_counter()
                    for li, ex, w in routes:
                        layer_call(li, ex, w)
                    s = (time.perf_counter() - t0) / len(routes)
                inside = cpu_kernel.stats(reset=True) if name.startswith("kernel_") else {}
                li, ex, w = routes[0]
                want = sum(w[k] * _reference(x, *layers[li], e) for k, e in enumerate(ex))
                got = fn(li, ex, w, r=0) if made is not None else layer_call(li, ex, w)
                nbytes = bytes_bf16 // 2 if "int8" in name else bytes_bf16
                if "int4g" in name:  # codes (half a byte a weight) + one bf16 scale per group
                    grp = int(name.split("int4g")[1].split("_")[0])
                    nbytes = bytes_bf16 // 4 + bytes_bf16 // grp
                elif "mxfp4" in name:  # codes + one e8m0 byte per 32 weights
                    nbytes = bytes_bf16 // 4 + bytes_bf16 // 64
                own = {}  # the kernel's own rate: its bytes over its own time (prep + both regions), the rest of
                if inside:  # ms_per_layer being this script's Python call (graph decode calls it prepared)
                    k_s = (inside["prep_us"] + inside["region1_us"] + inside["region2_us"]) / 1e6
                    own = {"kernel_GBps": round(nbytes / k_s / 1e9, 1),
                           "kernel_of_limit": round(nbytes / k_s / 1e9 / limit, 3),
                           "outside_us": round((s - k_s) * 1e6, 1)}
                print(json.dumps({
                    "bench": "decode_gemv", "strategy": name, "threads": threads, "ms_per_layer": round(s * 1e3, 3),
                    "GBps": round(nbytes / s / 1e9, 1), "limit_GBps": round(limit, 1),
                    "of_limit": round(nbytes / s / 1e9 / limit, 3), **own,
                    "tok_s_if_26_layers": round(1 / (26 * s), 1),
                    "rel_err_vs_fp32": float((got - want).norm() / want.norm()),
                    # the kernel's own split of a call (cpu_kernel.stats): the rest of ms_per_layer is Python's
                    **({k: round(v, 3) for k, v in inside.items() if k != "calls"} if inside else {}),
                    "experts": args.experts, "topk": args.topk, "hidden": args.hidden, "inter": args.inter,
                    "layers": args.layers, "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__}), flush=True)
    if args.batch_tokens and "4k" in args.pages:
        batch_sweep(args, mods, cpu_kernel)


def _per_expert(fn, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fn (a quantizer) applied one expert at a time: [E, out, in] -> (codes [E, ...], scales [E, ...])."""
    parts = [fn(w[e], group) for e in range(w.shape[0])]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def _read_bandwidth(threads: int, gib: float = 2.0) -> float:
    """Host memory read bandwidth, GB/s, the best of two probes over `gib` GiB (10x any L3), best of 5 passes each:
    torch's vectorized parallel fp32 sum (`memory_read`), and the kernel library's own read loop with the same
    threads on 2 MiB pages (`memory_read_kernel`: linear 32-byte loads, as the kernel reads weights). The sum alone
    understated some hosts: on S11-b's the bf16 kernel read 131 GB/s where the sum measured 99."""
    from hybridmoe.experts import cpu_kernel
    from hybridmoe.experts.cpu_experts import advise_huge_pages

    torch.set_num_threads(threads)
    buf = torch.empty(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    advise_huge_pages(buf)
    buf.fill_(1.0)
    probes = {"memory_read": lambda: buf.sum()}
    if cpu_kernel.available():
        probes["memory_read_kernel"] = lambda: cpu_kernel.read_all(buf)
    best_gbps = 0.0
    for name, fn in probes.items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        gbps = buf.nbytes / best / 1e9
        best_gbps = max(best_gbps, gbps)
        print(json.dumps({"bench": name, "threads": threads, "GBps": round(gbps, 1), "GiB": gib}), flush=True)
    return best_gbps


def batch_sweep(args, mods, cpu_kernel) -> None:
    """Calls of T tokens (each with its own top-k) through HybridExperts.infer_cpu, kernel vs torch loop, bf16 on
    4 KiB pages: the crossover that sets cpu_kernel.MAX_TOKENS."""
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for t in args.batch_tokens:
            x = torch.randn(t, args.hidden, generator=g)
            calls = [(int(torch.randint(args.layers, (1,), generator=g)),
                      torch.stack([torch.randperm(args.experts, generator=g)[: args.topk] for _ in range(t)]),
                      torch.rand(t, args.topk, generator=g)) for _ in range(8)]
            out = torch.empty(t, args.hidden)
            for name, flag in (("kernel", True), ("torch_loop", False)):
                for m in mods["bf16", "4k"]:
                    m.settings.cpu_kernel = flag
                saved, cpu_kernel.MAX_TOKENS = cpu_kernel.MAX_TOKENS, 1 << 30
                try:
                    mods["bf16", "4k"][calls[0][0]].infer_cpu(x, calls[0][1], calls[0][2], out)  # warm-up
                    t0 = time.perf_counter()
                    for li, ids, w in calls:
                        mods["bf16", "4k"][li].infer_cpu(x, ids, w, out)
                    s = (time.perf_counter() - t0) / len(calls)
                finally:
                    cpu_kernel.MAX_TOKENS = saved
                flops = 2 * t * args.topk * 3 * args.hidden * args.inter
                print(json.dumps({"bench": "expert_batch", "impl": name, "tokens": t, "ms_per_layer": round(s * 1e3, 2),
                                  "TFLOPs": round(flops / s / 1e12, 3), "threads": torch.get_num_threads()}),
                      flush=True)


if __name__ == "__main__":
    main()
