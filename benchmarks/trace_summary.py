"""Where a profiled GPU step's time goes, from a torch.profiler chrome trace (plain or .gz).

    python benchmarks/trace_summary.py trace.json.gz [--range train_step]

Prints one JSON line: the wall time of the range (default: the whole trace's GPU span), and in it the time the GPU's
kernels run (union over streams), the host->device copies run, both at once, the copies alone (kernels waiting for
weights), neither (the GPU waiting for the host: launches, syncs, CPU work), the top kernels by total time, and the
named record_function ranges inside it (forward, backward, optimizer, ...) with their own wall times.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def save_and_summarize(prof, out_dir: str | Path, name: str, range_name: str | None = None) -> dict:
    """A finished torch.profiler run written as out_dir/name.json.gz; {"trace": its path, **its summary}."""
    plain = Path(out_dir) / f"{name}.json"
    prof.export_chrome_trace(str(plain))
    trace = plain.with_suffix(".json.gz")
    with open(plain, "rb") as src, gzip.open(trace, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(plain)
    return {"trace": str(trace), **summarize(load(str(trace)), range_name)}


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def clip(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(s, lo), min(e, hi)) for s, e in intervals if e > lo and s < hi]


def summarize(events: list[dict], range_name: str | None = None) -> dict:
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in timed if e.get("cat") == "kernel"]
    h2d = [(e["ts"], e["ts"] + e["dur"]) for e in timed if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    d2h = [(e["ts"], e["ts"] + e["dur"]) for e in timed if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")]
    annotations = [e for e in timed if e.get("cat") == "user_annotation"]
    if range_name:
        whole = next(e for e in annotations if e["name"] == range_name)
        lo, hi = whole["ts"], whole["ts"] + whole["dur"]
    else:
        span = kernels + h2d + d2h or [(e["ts"], e["ts"] + e["dur"]) for e in timed]  # no GPU: the whole trace
        lo, hi = min(s for s, _ in span), max(e for _, e in span)
    k, c, d = (union(clip(x, lo, hi)) for x in (kernels, h2d, d2h))
    both = intersect(k, c)
    busy = union(k + c + d)
    ms = 1e-3  # trace times are microseconds
    per_kernel: dict[str, float] = defaultdict(float)
    for e in timed:
        if e.get("cat") == "kernel" and lo <= e["ts"] < hi:
            per_kernel[e["name"][:80]] += e["dur"]
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    ranges = defaultdict(float)
    for e in annotations:
        if lo <= e["ts"] < hi and e["name"] != range_name:
            ranges[e["name"]] += e["dur"]
    # The longest stretches with nothing on the GPU, and the innermost host ops running then (what the GPU waits for).
    cpu_ops = [e for e in timed if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    gaps = []
    prev = lo
    for s, e in busy + [(hi, hi)]:
        if s - prev > 0:
            gaps.append((s - prev, prev, s))
        prev = max(prev, e)
    idle = []
    for dur, s, e in sorted(gaps, reverse=True)[:10]:
        mid = (s + e) / 2
        running = sorted((o for o in cpu_ops if o["ts"] <= mid < o["ts"] + o["dur"]), key=lambda o: o["dur"])
        idle.append({"ms": round(dur * ms, 2), "at_ms": round((s - lo) * ms, 1),
                     "host": [o["name"][:60] for o in running[:3]]})
    return {"wall_ms": round((hi - lo) * ms, 1),
            "kernels_ms": round(length(k) * ms, 1), "h2d_ms": round(length(c) * ms, 1),
            "d2h_ms": round(length(d) * ms, 1),
            "kernels_and_h2d_ms": round(length(both) * ms, 1),
            "h2d_only_ms": round((length(c) - length(both)) * ms, 1),  # the GPU's compute waits for weights
            "gpu_idle_ms": round(((hi - lo) - length(busy)) * ms, 1),  # nothing on the GPU: host-bound
            "h2d_gb": round(sum(e["args"].get("bytes", 0) for e in timed if e.get("cat") == "gpu_memcpy"
                                and "HtoD" in e.get("name", "") and lo <= e["ts"] < hi) / 1e9, 2),
            "ranges_ms": {n: round(v * ms, 1) for n, v in sorted(ranges.items(), key=lambda kv: -kv[1])[:12]},
            "top_kernels_ms": {n: round(v * ms, 1) for n, v in top},
            "gpu_idle_gaps": idle}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--range", default=None, help="a record_function name whose wall time is the window")
    args = p.parse_args()
    print(json.dumps({"bench": "trace_summary", "trace": args.trace, **summarize(load(args.trace), args.range)}))


if __name__ == "__main__":
    main()
