"""Where a graph-decoded token's time goes: JSON lines of milliseconds per token (used by v2lite.py, big_models.py).

:func:`graph_breakdown` runs batch-1 decode steps of the model's current static decoder (``model._hybridmoe_decoder``,
which ``hybridmoe.generate`` left captured) with the replay's host clock on (``GraphChain.clock``), ``steps`` tokens,
twice. Per token:

    launch_ms          the host's graph launches (with graph gates, hybridmoe.graph_gate: graph i+1's launch is
                       made while graph i runs, so it is off the token's path unless it outlasts the graph)
    wait_ms            the host waiting for each graph to finish (the GPU's time, less what ran during the launch)
    experts_ms         the cuts' experts, of which:
      share_load_ms      queueing the copy share's weight copies (a mapped share, hybridmoe.mapped_share, queues
      share_compute_ms   queueing its graph           nothing: its kernels are in the graphs)
      cpu_experts_ms     the CPU call, Python included
      kernel_ms          the compiled kernel's own time (its counters: before and in its parallel regions)
    kernel_busy        how much of each region the kernel's threads spent working; kernel_threads: their number
    rest_ms            the token's wall time minus launch, wait and experts (the step's Python, the logits copy)

:func:`kernel_profile` lists the GPU kernels of one eager decode step (the same kernels the graphs hold).
"""

from __future__ import annotations

import time

import torch


def _timed(obj, name: str, acc: dict, key: str) -> None:
    """Shadow ``obj.name`` by a wrapper adding its seconds to ``acc[key]`` (undone by ``del obj.name``)."""
    fn = getattr(obj, name)

    def run(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t

    setattr(obj, name, run)


def graph_breakdown(model, steps: int, emit, **labels) -> None:
    """Time ``steps`` graph-decoded tokens, twice, and ``emit`` one dict (plus ``labels``) per run."""
    from hybridmoe.experts import cpu_kernel

    dec = getattr(model, "_hybridmoe_decoder", None)
    if dec is None or dec.graphs is None or not torch.cuda.is_available():
        return
    chain, share = dec.chain, dec.chain.share
    token = torch.tensor([5])
    parts: dict[str, float] = {}
    copy_share = share is not None and hasattr(share, "load")  # (a mapped share queues nothing from the host)
    if copy_share:
        _timed(share, "load", parts, "share_load")
        _timed(share, "compute", parts, "share_compute")
    for cut in chain.cuts:
        _timed(cut, "_experts", parts, "cpu_experts")
    try:
        for _ in range(2):
            chain.clock.on, chain.clock.seconds = True, {}
            parts.clear()
            cpu_kernel.stats(reset=True)
            n, t0 = 0, time.perf_counter()
            with torch.inference_mode():
                while n < steps and dec.length < dec.max_len:
                    dec.step(token, dec.length).argmax()  # (the argmax waits for the token's logits)
                    n += 1
            wall = time.perf_counter() - t0
            k = cpu_kernel.stats(reset=True)
            kernel_s = k.get("calls", 0) * (k.get("prep_us", 0) + k.get("region1_us", 0) + k.get("region2_us", 0)) / 1e6
            n = max(n, 1)
            ms = {f"{key}_ms": round(v / n * 1e3, 3) for key, v in {**chain.clock.seconds, **parts}.items()}
            ms["kernel_ms"] = round(kernel_s / n * 1e3, 3)
            ms["rest_ms"] = round((wall - sum(chain.clock.seconds.values())) / n * 1e3, 3)
            emit({"bench": "decode_breakdown", **labels, "tokens": n, "graphs_per_token": len(chain.graphs),
                  "cuts": len(chain.cuts), "tok_s": round(n / wall, 2), "ms_per_token": round(wall / n * 1e3, 3),
                  **ms, "kernel_busy": [round(k.get("busy1", 0), 2), round(k.get("busy2", 0), 2)],
                  "kernel_threads": round(k.get("kernel_threads", 0), 1)})
    finally:
        chain.clock.on = False
        if copy_share:
            del share.load, share.compute
        for cut in chain.cuts:
            del cut._experts


def kernel_profile(model, emit, top: int = 15, **labels) -> None:
    """The GPU kernels of one eager batch-1 decode step (a static decoder without graphs, after one warm-up step):
    count, total GPU time, and the ``top`` kernels by time. One dict to ``emit``."""
    from torch.profiler import ProfilerActivity, profile

    from hybridmoe.decode_graph import StaticDecoder

    if not torch.cuda.is_available():
        return
    dev = next(p.device for p in model.parameters() if p.device.type == "cuda")
    dec = StaticDecoder(model, 256, dev, use_graphs=False)
    try:
        with torch.inference_mode():
            dec.prefill(torch.arange(5, 21, device=dev)[None])
            dec.step(torch.tensor([5]), 16)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                dec.step(torch.tensor([6]), 17)
                torch.cuda.synchronize()
    finally:
        dec.close()
    rows = sorted(((e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[2])
    emit({"bench": "decode_kernels", **labels, "kernels": sum(r[1] for r in rows),
          "gpu_us": round(sum(r[2] for r in rows), 1),
          "top": [[name[:70], count, round(us, 1)] for name, count, us in rows[:top]]})
