"""CPU AdamW over DeepSeek-V2-Lite's routed-expert LoRA (26 layers x 4 factors, r=8, fp32, 109M values):
foreach vs fused, seconds per optimizer step. The expert LoRA's optimizer runs on the CPU every training step.

    python benchmarks/adamw_cpu.py
"""

from __future__ import annotations

import json
import time

import torch

E, H, I, R, LAYERS = 64, 2048, 1408, 8, 26  # noqa: E741


def params() -> list[torch.Tensor]:
    shapes = [(E, R, H), (E, 2 * I, R), (E, R, I), (E, H, R)]  # gate_up A, B; down A, B
    out = []
    for _ in range(LAYERS):
        for s in shapes:
            p = torch.randn(s) * 0.01
            p.grad = torch.randn(s) * 0.01
            out.append(p)
    return out


def main() -> None:
    for mode in ("foreach", "fused"):
        ps = params()
        opt = torch.optim.AdamW(ps, lr=1e-4, **{mode: True})
        opt.step()
        t = time.perf_counter()
        for _ in range(5):
            opt.step()
        s = (time.perf_counter() - t) / 5
        n = sum(p.numel() for p in ps)
        print(json.dumps({"bench": "adamw_cpu", "mode": mode, "params": n, "threads": torch.get_num_threads(),
                          "ms_per_step": round(s * 1e3, 1), "GBps": round(n * 4 * 7 / s / 1e9, 1)}), flush=True)


if __name__ == "__main__":
    main()
