"""Kill soak: `hybridmoe train` SIGKILLed again and again at random moments (some inside a checkpoint save), each
time resumed with `resume_from_checkpoint: true`, until it finishes; then its logged losses and adapter must equal an
uninterrupted run's bit for bit. RELIABILITY.md records the result.

    PYTHONPATH=src python benchmarks/kill_soak.py [--kills 16] [--steps 40] [--seed 0]

CPU, tiny model, LoRA dropout 0.1, gradient accumulation 2. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests.helpers

RUNNING = "trainer_log.running.jsonl"
# Kills this process inside its k-th checkpoint save, after the optimizer file is written and before the rename.
MID_SAVE = ("import hybridmoe.train_state as ts; _save, _n = ts.save_file, [0]\n"
            "def _kill_in_save(*a, **k):\n"
            "    _save(*a, **k); _n[0] += 1\n"
            "    if _n[0] == {k}: os.kill(os.getpid(), signal.SIGKILL)\n"
            "ts.save_file = _kill_in_save\n")


def _child(cfg_path: Path, mid_save: int | None) -> list[str]:
    patch = MID_SAVE.format(k=mid_save) if mid_save else ""
    code = (f"import os, signal, sys, torch\ntorch.set_num_threads({torch.get_num_threads()})\n{patch}"
            f"from hybridmoe.cli import main\nsys.exit(main(['train', {str(cfg_path)!r}]))\n")
    return [sys.executable, "-c", code]


def _lines(p: Path) -> int:
    return len(p.read_text().splitlines()) if p.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rng = random.Random(args.seed)

    from tests.helpers import make_checkpoint, read_log, write_dataset

    import hybridmoe

    root = Path(tempfile.mkdtemp(prefix="hybridmoe_soak_"))
    try:
        model, data = make_checkpoint("qwen3_moe", root / "m"), write_dataset(root / "d.jsonl", n=12)
        cfg = dict(model_name_or_path=str(model), dataset=str(data), learning_rate=3e-3, per_device_train_batch_size=2,
                   gradient_accumulation_steps=2, logging_steps=1, device="cpu", progress=False, lora_rank=4,
                   lora_alpha=8, lora_dropout=0.1, gradient_checkpointing=False, max_steps=args.steps, save_steps=1,
                   save_total_limit=2)
        hybridmoe.train({**cfg, "output_dir": str(root / "straight")})
        out = root / "killed"
        cfg_path = root / "cfg.json"
        kills = {"mid_step": 0, "mid_save": 0}
        attempts, t0 = 0, time.time()
        while True:
            resume = any(out.glob("checkpoint-*"))
            cfg_path.write_text(json.dumps({**cfg, "output_dir": str(out), "resume_from_checkpoint": resume}))
            left = sum(kills.values()) < args.kills
            mid_save = rng.randint(1, 2) if left and rng.random() < 0.4 else None
            before = _lines(out / RUNNING) if resume else 0
            proc = subprocess.Popen(_child(cfg_path, mid_save), stderr=subprocess.PIPE, text=True)
            attempts += 1
            if left and mid_save is None:
                while proc.poll() is None and _lines(out / RUNNING) <= before:
                    time.sleep(0.01)  # it has made progress since the last resume
                time.sleep(rng.uniform(0, 1.0))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
            if proc.returncode == -signal.SIGKILL:
                kills["mid_save" if mid_save else "mid_step"] += 1
                continue
            if proc.returncode != 0:
                raise SystemExit(f"attempt {attempts} failed with exit {proc.returncode}:\n{err[-3000:]}")
            break
        got, want = read_log(out), read_log(root / "straight")
        a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(root / "straight" / "adapter_model.safetensors"))
        same_losses = [r["loss"] for r in got] == [r["loss"] for r in want]
        same_adapter = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(json.dumps({"bench": "kill_soak", "kills": kills, "attempts": attempts, "steps": args.steps,
                          "log_lines": len(got), "identical_losses": same_losses, "identical_adapter": same_adapter,
                          "temp_folders_left": [p.name for p in out.glob(".tmp-*")], "seconds": round(time.time() - t0)}))
        if not (same_losses and same_adapter and len(got) == args.steps):
            raise SystemExit(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
