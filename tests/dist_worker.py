"""One rank of `hybridmoe train` with a fault injected on one rank; tests/test_distributed.py launches it with torchrun.

    torchrun --nproc-per-node 2 tests/dist_worker.py CONFIG RANK FAULT@STEP [FAULT@STEP ...]

Each FAULT happens at the STEP-th micro-step (1-based) of rank RANK only:
  raise  the rank crashes (RuntimeError)
  hang   the rank stalls (sleeps for an hour) without dying
  nan    the rank's routed-expert LoRA gradient gets a NaN (the other rank's stays finite)
"""

from __future__ import annotations

import os
import sys
import time

from hybridmoe import training
from hybridmoe.cli import main
from hybridmoe.experts import HybridExperts


def inject(rank: int, faults: dict[int, str]) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    original = training._micro_step
    calls = {"n": 0}

    def faulty(model, batch, device, n_items):
        loss = original(model, batch, device, n_items)
        calls["n"] += 1
        mode = faults.get(calls["n"])
        if mode is not None:
            if mode == "raise":
                raise RuntimeError(f"injected failure on rank {rank}")
            if mode == "hang":
                time.sleep(3600)
            if mode == "nan":
                ex = next(m for m in model.modules() if isinstance(m, HybridExperts))
                ex.lora["down_proj"].B.grad[0, 0, 0] = float("nan")
        return loss

    training._micro_step = faulty


if __name__ == "__main__":
    config, rank, *specs = sys.argv[1:]
    inject(int(rank), {int(step): mode for mode, step in (spec.split("@") for spec in specs)})
    sys.exit(main(["train", config]))
