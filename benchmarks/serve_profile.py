"""Where a server decode step's time goes: the engine's batched decode (``DecodeBatch.step``) on a real checkpoint,
without HTTP, timed and under torch.profiler.

    python benchmarks/serve_profile.py --model /tmp/v2lite --adapter /tmp/v2lite/bench_adapter --resident 26

Prints one JSON line per setting (rows, adapter mix): seconds per decode step and tokens/s, then the top operators
by CPU and CUDA time of the mixed 16-row step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--resident", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--expert-dtype", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--prefill", action="store_true",
                    help="time and profile the engine's batched prefill (10 prompts of 20 tokens, as the issue-table "
                         "load sends them) instead of decode steps")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from hybridmoe.loading import load_model
    from hybridmoe.serve.adapters import AdapterSet
    from hybridmoe.serve.prefill import prefill_batch

    model = load_model(args.model, device=args.device, dtype="bfloat16", expert_dtype=args.expert_dtype, progress=False,
                       resident_expert_layers=args.resident)
    aset = AdapterSet(model)
    aset.load("a", args.adapter)
    aset.model.eval()
    prompts = [list(range(100 + i, 140 + i)) for i in range(16)]

    def run(rows: list, steps: int, prof=None) -> float:
        aset.use(rows)
        with torch.inference_mode():
            logits, batch = prefill_batch(aset.model, prompts[:len(rows)], len(rows))
            tok = logits.argmax(-1, keepdim=True)  # [B, 1]
            batch.step(tok)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                tok = batch.step(tok).argmax(-1, keepdim=True)
                if prof is not None:
                    prof.step()
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    if args.prefill:
        _prefill(aset, prompts, args)
        return
    for name, rows in [("1 row, base", [None]), ("16 rows, base", [None] * 16), ("16 rows, all adapter", ["a"] * 16),
                       ("16 rows, half adapter", ["a", None] * 8)]:
        s = run(rows, args.steps)
        print(json.dumps({"bench": "serve_step", "setting": name, "resident": args.resident,
                          "expert_dtype": args.expert_dtype, "s_per_step": round(s, 4),
                          "tok_s": round(len(rows) / s, 1)}), flush=True)
    if not args.no_profile:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(["a", None] * 8, 3)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)


def _prefill(aset, prompts: list[list[int]], args) -> None:
    """Seconds per batched prefill (the forward and the first tokens' argmax) of 1 and 10 prompts of 20 tokens, base
    and half on the adapter; then a profile of the mixed one."""
    from torch.profiler import ProfilerActivity, profile

    from hybridmoe.serve.prefill import prefill_batch

    short = [p[:20] for p in prompts[:10]]

    def run(rows: list, repeats: int) -> float:
        aset.use(rows)
        with torch.inference_mode():
            prefill_batch(aset.model, short[:len(rows)], len(rows))[0].argmax(-1).tolist()  # warm-up
            t = time.perf_counter()
            for _ in range(repeats):
                prefill_batch(aset.model, short[:len(rows)], len(rows))[0].argmax(-1).tolist()
        return (time.perf_counter() - t) / repeats

    for name, rows in [("1 prompt, base", [None]), ("10 prompts, base", [None] * 10),
                       ("10 prompts, half adapter", ["a", None] * 5)]:
        s = run(rows, 3)
        print(json.dumps({"bench": "serve_prefill", "setting": name, "resident": args.resident,
                          "expert_dtype": args.expert_dtype, "s_per_prefill": round(s, 4)}), flush=True)
    if not args.no_profile:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(["a", None] * 5, 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
