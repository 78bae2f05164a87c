"""The first call of scaled_dot_product_attention on a new shape, by backend (the server's prefills are new shapes).

    python benchmarks/sdpa_shapes.py

V2-Lite's attention (16 heads, q/k head dim 192, v 128, bf16) with a padding mask, batches of 1..16 prompts of 16..48
tokens: each backend's first call of every shape, then the same shapes again (cached). One JSON line per backend.
"""

from __future__ import annotations

import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa


def run(backend: SDPBackend, shapes: list[tuple[int, int]]) -> dict:
    out = {}
    for label in ("first", "again"):
        times = []
        for b, n in shapes:
            q = torch.randn(b, 16, n, 192, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, 16, n, 192, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, 16, n, 128, device="cuda", dtype=torch.bfloat16)
            mask = torch.ones(b, 1, n, n, device="cuda", dtype=torch.bool).tril()
            torch.cuda.synchronize()
            t = time.perf_counter()
            with sdpa_kernel([backend]):
                sdpa(q, k, v, attn_mask=mask, scale=0.1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[label + "_ms_mean"] = round(1e3 * sum(times) / len(times), 2)
        out[label + "_ms_max"] = round(1e3 * max(times), 2)
    return out


def main() -> None:
    torch.ones(1, device="cuda")
    shapes = [(b, n) for b in (1, 3, 8, 16) for n in (17, 23, 31, 40, 48)]
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            res = run(backend, shapes)
        except RuntimeError as e:
            res = {"error": str(e).splitlines()[0][:160]}
        print(json.dumps({"bench": "sdpa_new_shapes", "backend": backend.name, "shapes": len(shapes), **res}),
              flush=True)


if __name__ == "__main__":
    main()
