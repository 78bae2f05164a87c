"""One hybrid LoRA training step (forward + backward, LoRA on all targets) on a DeepSeek-V2-Lite-width model cut to
a few layers, on whatever machine runs it (device=cpu by default: the embedded default of the quickstart and CI).

    python benchmarks/cpu_step.py --dir /tmp/v2lite_w3 --tokens 128 1024 [--device cpu] [--dtype float32]

Compare two versions side by side by running it with each version's `src` on PYTHONPATH in one session.
Prints one JSON line per token count: seconds per step (median of --reps after one warm-up), tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def build(path: Path, layers: int) -> None:
    from hybridmoe.testing import save_tiny_model

    save_tiny_model("deepseek_v2", path, init_std=0.02, vocab_size=4096, hidden_size=2048, intermediate_size=10944,
                    moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                    num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                    qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/v2lite_w3")
    p.add_argument("--layers", type=int, default=3, help="layer 0 is dense, the rest MoE")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").exists():
        build(path, args.layers)

    import hybridmoe
    from hybridmoe.adapters import apply_lora
    from hybridmoe.loading import load_model

    model = apply_lora(load_model(path, device=args.device, dtype=args.dtype, progress=False), "all", 8, 16, seed=0)
    model.train()
    for t in args.tokens:
        ids = torch.randint(2, 4096, (1, t), generator=torch.Generator().manual_seed(t)).to(args.device)
        times = []
        for _ in range(args.reps + 1):
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        s = statistics.median(times[1:])
        print(json.dumps({"bench": "cpu_step", "version": hybridmoe.__file__, "tokens": t, "moe_layers": args.layers - 1,
                          "s_per_step": round(s, 3), "tokens_per_s": round(t / s, 1), "device": args.device,
                          "dtype": args.dtype, "threads": torch.get_num_threads(), "cpu": platform.processor()}),
              flush=True)


if __name__ == "__main__":
    main()
