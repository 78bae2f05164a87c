"""Where a graph-decoded token's time goes: JSON lines of milliseconds per token (used by v2lite.py, big_models.py).

Runs batch-1 decode steps of the model's current static decoder (``model._hybridmoe_decoder``, which
``hybridmoe.generate`` left captured) with the replay's host clock on (``GraphChain.clock``), alternating the serial
replay (each graph launched after the CPU's experts, the host waiting for the whole graph) and the gated one (graph
i+1 queued ahead behind a host flag: ``GraphChain._replay_gated``) when the driver allows it, ``steps`` tokens each,
twice. Per token:

    launch_ms    the host's graph launches (and, gated, the queued waits)
    wait_ms      the host waiting for a graph's copies to the host to land
    experts_ms   the cuts' experts: the CPU call (Python included) and queueing the GPU share
    kernel_ms    of which the compiled kernel's own time (its counters: before and in its parallel regions)
    rest_ms      the token's wall time minus the above (the step's Python: embedding, position, logits copy)
"""

from __future__ import annotations

import time

import torch


def graph_breakdown(model, steps: int, emit, **labels) -> None:
    """Time ``steps`` graph-decoded tokens per replay mode, twice each, and ``emit`` one dict (plus ``labels``) per
    run."""
    from hybridmoe.experts import cpu_kernel

    dec = getattr(model, "_hybridmoe_decoder", None)
    if dec is None or dec.graphs is None or not torch.cuda.is_available():
        return
    chain = dec.chain
    modes = ["serial", "gated"] if chain.gate is not None else ["serial"]
    token, gated = torch.tensor([5]), chain.gated
    try:
        for mode in modes * 2:
            chain.gated, chain.clock.on, chain.clock.seconds = mode == "gated", True, {}
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
            ms = {f"{key}_ms": round(v / n * 1e3, 3) for key, v in chain.clock.seconds.items()}
            ms["kernel_ms"] = round(kernel_s / n * 1e3, 3)
            ms["rest_ms"] = round((wall - sum(chain.clock.seconds.values())) / n * 1e3, 3)
            emit({"bench": "decode_breakdown", **labels, "replay": mode, "tokens": n,
                  "graphs_per_token": len(chain.graphs), "cuts": len(chain.cuts),
                  "tok_s": round(n / wall, 2), "ms_per_token": round(wall / n * 1e3, 3), **ms,
                  "kernel_busy": [round(k.get("busy1", 0), 2), round(k.get("busy2", 0), 2)]})
    finally:
        chain.gated, chain.clock.on = gated, False
