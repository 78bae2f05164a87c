"""Micro-benchmark of CPU expert GEMM strategies at DeepSeek-V2-Lite expert shapes (one MoE layer, 64 experts).

    python benchmarks/expert_gemm.py [--tokens 128 1024 4096]

For T tokens routed top-6 over 64 experts, computes gate_up ([2I, H]) for every expert with its token group, by:
per-expert F.linear (bf16 / fp32 weights), torch grouped_mm (bf16), and per-expert bmm on pre-transposed weights.
Prints one JSON line per (strategy, T): ms per layer, weight GB/s and TFLOP/s. Weights of all 64 experts are touched.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

E, H, I, K = 64, 2048, 1408, 6  # noqa: E741 - the paper names: experts, hidden, intermediate, top-k


def groups(t: int, g: torch.Generator) -> list[torch.Tensor]:
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])  # [T, K] distinct experts per token
    flat = ids.view(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    out, s = [], 0
    for n in counts:
        out.append(order[s : s + n] // K)
        s += n
    return out


def per_expert(x, w, grp):
    for e, tok in enumerate(grp):
        if len(tok):
            torch.nn.functional.linear(x[tok].to(w.dtype), w[e])


def grouped(x, w, grp):
    tok = torch.cat(grp)
    offs = torch.tensor([len(t) for t in grp]).cumsum(0).to(torch.int32)
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    fn(x[tok].to(w.dtype), w.transpose(-2, -1), offs=offs)


def bmm_padded(x, w, grp):
    """What HybridExperts does for slots >= experts: pad each expert's rows to n_max, one bmm over the stack."""
    n_max = max(len(t) for t in grp)
    xp = x.new_zeros(E, n_max, H)
    for e, tok in enumerate(grp):
        xp[e, : len(tok)] = x[tok]
    torch.bmm(xp.to(w.dtype), w.transpose(1, 2))


def timeit(fn, reps=5):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 1024, 4096])
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    w16 = (torch.randn(E, 2 * I, H, generator=g) * 0.02).to(torch.bfloat16)
    w32 = w16.float()
    for t in args.tokens:
        x = torch.randn(t, H, generator=g)
        grp = groups(t, g)
        flops = 2 * t * K * 2 * I * H
        for name, fn, w in (("per_expert_bf16", per_expert, w16), ("per_expert_fp32", per_expert, w32),
                            ("grouped_mm_bf16", grouped, w16), ("bmm_padded_bf16", bmm_padded, w16)):
            try:
                s = timeit(lambda: fn(x, w, grp))  # noqa: B023
            except Exception as e:  # noqa: BLE001 - a strategy that does not run here is reported, not fatal
                print(json.dumps({"strategy": name, "tokens": t, "error": str(e)[:120]}))
                continue
            print(json.dumps({"strategy": name, "tokens": t, "threads": torch.get_num_threads(),
                              "ms_per_layer": round(s * 1e3, 2), "weight_GBps": round(w.numel() * w.element_size() / s / 1e9, 1),
                              "TFLOPs": round(flops / s / 1e12, 3)}), flush=True)


if __name__ == "__main__":
    main()
