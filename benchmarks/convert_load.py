"""`hybridmoe convert` on a V2-Lite-shaped checkpoint, and what it saves at every start (random weights, no download).

    python benchmarks/convert_load.py --dir /tmp/cv --layers 4          # the first 4 layers (27 = the whole model)
    python benchmarks/convert_load.py --dir /tmp/cv --tiny               # check the script on a small model first

Writes the bf16 checkpoint with benchmarks/v2lite.py's `make` (hub per-expert layout, 4 GiB shards), then, each in a
fresh process so the peaks are its own, prints one JSON line per step:
- convert: `hybridmoe convert --expert-dtype int4`: wall time, input and output size, and how far the peak RSS rose
  above the process after its imports (streaming: about one output shard plus one input tensor);
- load-bf16-as-int4: `load_model(bf16 checkpoint, expert_dtype="int4")`, quantizing every expert at start;
- load-converted: `load_model(converted, expert_dtype="int4")`, the codes copied in as stored;
each load with its wall time, host RSS after loading, peak RSS, and a checksum of the expert codes and scales: the two
loads must give the same checksum (bit-identical experts).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def size_gib(d: Path) -> float:
    return round(sum(p.stat().st_size for p in d.glob("*.safetensors")) / 2**30, 3)


def step_convert(args) -> dict:
    from hybridmoe.convert import convert_checkpoint

    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts here, after the imports
    base = kib("VmRSS")
    t0 = time.perf_counter()
    convert_checkpoint(args.src, args.out, "int4", overwrite=True, progress=False)
    return {"step": "convert", "seconds": round(time.perf_counter() - t0, 2), "input_gib": size_gib(Path(args.src)),
            "output_gib": size_gib(Path(args.out)), "peak_rss_rise_gib": round((kib("VmHWM") - base) / 2**20, 3)}


def step_load(args) -> dict:
    from hybridmoe.loading import load_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = load_model(args.src, device=dev, expert_dtype="int4", progress=False)
    seconds = time.perf_counter() - t0
    total = 0
    for name in model.hybridmoe.moe_layers:
        for t in model.get_submodule(name).weights.host_tensors():
            total = (total * 1000003 + int(t.view(torch.uint8).flatten().to(torch.int64).sum())) % (1 << 61)
    return {"step": args.step, "device": dev, "seconds": round(seconds, 2), "rss_gib": round(kib("VmRSS") / 2**20, 3),
            "peak_rss_gib": round(kib("VmHWM") / 2**20, 3), "experts": model.hybridmoe.source_format,
            "checksum": total}


def run_step(step: str, src: Path, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--src", str(src)] + (["--out", str(out)] if out else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{step} failed:\n{res.stderr[-3000:]}")
    line = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/convert_bench")
    ap.add_argument("--layers", type=int, default=4, help="first N layers of V2-Lite (27 = all)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step_convert(args) if args.step == "convert" else step_load(args)))
        return
    sys.path.insert(0, str(HERE))
    import v2lite

    src, out = Path(args.dir) / "bf16", Path(args.dir) / "int4"
    v2lite.make(argparse.Namespace(dir=str(src), tiny=args.tiny, make_layers=args.layers))
    run_step("convert", src, out)
    a = run_step("load-bf16-as-int4", src)
    b = run_step("load-converted", out)
    print(json.dumps({"step": "summary", "layers": args.layers, "bit_identical_experts": a["checksum"] == b["checksum"],
                      "load_speedup": round(a["seconds"] / max(b["seconds"], 1e-9), 2)}))


if __name__ == "__main__":
    main()
