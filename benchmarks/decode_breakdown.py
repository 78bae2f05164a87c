"""Where a graph-decoded token's time goes: one JSON line of milliseconds per token (used by v2lite.py, big_models.py).

Runs ``steps`` batch-1 decode steps of the model's current static decoder (``model._hybridmoe_decoder``, which
``hybridmoe.generate`` left captured) with its replay loop timed piece by piece:

    launch_ms          the host's graph launches (``CUDAGraph.replay`` returning)
    wait_ms            from the launch to the host sync after it (the GPU finishing the graph)
    gpu_in_graphs_ms   the GPU's time inside the graphs (CUDA events around each replay)
    share_queue_ms     queueing the GPU share of the experts (its weight copies and its graph) at each cut
    cpu_call_ms        the CPU experts' call at each cut, Python included
    kernel_ms          of which the compiled kernel's own time (its counters: before and in its parallel regions)
    rest_ms            the token's wall time minus all of the above (the step's Python: embedding, logits copy)
"""

from __future__ import annotations

import time

import torch


def graph_breakdown(model, steps: int, emit, **labels) -> None:
    """Time ``steps`` graph-decoded tokens as the module docstring says and ``emit`` one dict (plus ``labels``)."""
    from hybridmoe.experts import cpu_kernel

    dec = getattr(model, "_hybridmoe_decoder", None)
    if dec is None or dec.graphs is None or not torch.cuda.is_available():
        return
    chain, stream = dec.chain, torch.cuda.current_stream()
    acc = dict.fromkeys(("launch", "wait", "gpu_in_graphs", "share_queue", "cpu_call"), 0.0)
    share = chain.share

    def timed(fn, key):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[key] += time.perf_counter() - t
        return run

    if share is not None:  # instance attributes shadow the class's methods until deleted below
        share.load, share.compute = timed(share.load, "share_queue"), timed(share.compute, "share_queue")

    def timed_replay():
        events = []
        for i, g in enumerate(chain.graphs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record(stream)
            g.replay()
            end.record(stream)
            t1 = time.perf_counter()
            stream.synchronize()
            t2 = time.perf_counter()
            acc["launch"] += t1 - t0
            acc["wait"] += t2 - t1
            events.append((start, end))
            if i < len(chain.cuts):
                q = acc["share_queue"]
                chain.cuts[i].compute(chain.share, chain.rows)
                acc["cpu_call"] += time.perf_counter() - t2 - (acc["share_queue"] - q)
        acc["gpu_in_graphs"] += sum(a.elapsed_time(b) for a, b in events) / 1e3

    chain._replay, n = timed_replay, 0
    token = torch.tensor([5])
    cpu_kernel.stats(reset=True)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            while n < steps and dec.length < dec.max_len:
                dec.step(token, dec.length).argmax()
                n += 1
    finally:
        del chain._replay  # back to the class's methods
        if share is not None:
            del share.load, share.compute
    wall = time.perf_counter() - t0
    k = cpu_kernel.stats(reset=True)
    kernel_s = k.get("calls", 0) * (k.get("prep_us", 0) + k.get("region1_us", 0) + k.get("region2_us", 0)) / 1e6
    n = max(n, 1)
    ms = {f"{key}_ms": round(v / n * 1e3, 3) for key, v in acc.items()}
    ms["kernel_ms"] = round(kernel_s / n * 1e3, 3)
    ms["rest_ms"] = round((wall - acc["launch"] - acc["wait"] - acc["share_queue"] - acc["cpu_call"]) / n * 1e3, 3)
    emit({"bench": "decode_breakdown", **labels, "tokens": n, "graphs_per_token": len(chain.graphs),
          "cuts": len(chain.cuts), "ms_per_token": round(wall / n * 1e3, 3), **ms,
          "kernel_busy": [round(k.get("busy1", 0), 2), round(k.get("busy2", 0), 2)]})
