"""Peak host memory and time of `hybridmoe export` into a quantized base (FP8 blocks or MXFP4), against the shard size.

Builds a random checkpoint in place (no download): a `qwen3_moe` (FP8, per-expert keys, DeepSeek-V3's 128x128 block
scales) or `gpt_oss` (MXFP4 fused experts) model of the given shape, sharded at --shard-mb, a rank-8 adapter on every
target, then runs the re-quantizing export in a fresh process and prints one JSON line: the checkpoint's bytes, its
largest shard, the export's wall time and its peak RSS above the process's baseline (a first export in the same
process pays for imports and model classes; the second is measured). The claim under
test: peak RSS is about one output shard plus one tensor's fp32 slice, whatever the checkpoint's size.

    python benchmarks/export_quantized.py --format fp8 --hidden 2048 --moe-intermediate 768 --experts 64 --layers 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import hybridmoe.export as ex
# A first export pays for imports and model classes (~150 MiB, whatever the checkpoint's size); the second is measured.
ex.export_merged(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, overwrite=True)
def rss_kib():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM)
base = rss_kib()
t0 = time.perf_counter()
ex.export_merged(sys.argv[1], sys.argv[2], sys.argv[3], progress=False, overwrite=True)
dt = time.perf_counter() - t0
peak = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({"export_s": round(dt, 2), "peak_rss_above_base_mib": round((peak - base) / 1024, 1)}))
"""


def build(args, root: Path) -> tuple[Path, Path]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hybridmoe.adapters import apply_lora, save_adapter
    from hybridmoe.loading import load_model
    from hybridmoe.testing import build_tokenizer

    plain = root / "plain"
    if args.format in ("fp8", "bf16"):
        cfg = AutoConfig.for_model("qwen3_moe", vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden,
                                   moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
                                   num_experts_per_tok=4, num_hidden_layers=args.layers, num_attention_heads=16,
                                   num_key_value_heads=4, head_dim=128, tie_word_embeddings=False)
    else:
        cfg = AutoConfig.for_model("gpt_oss", vocab_size=1024, hidden_size=args.hidden,
                                   intermediate_size=args.moe_intermediate, num_local_experts=args.experts,
                                   num_experts_per_tok=4, num_hidden_layers=args.layers, num_attention_heads=16,
                                   num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                                   layer_types=["full_attention"] * args.layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(plain, max_shard_size=f"{args.shard_mb}MB")
    build_tokenizer().save_pretrained(plain)
    del model
    adapter = root / "adapter"
    peft = apply_lora(load_model(plain, device="cpu", dtype="float32", expert_dtype="bfloat16", progress=False),
                      "all", 8, 16.0)
    save_adapter(peft, adapter)
    del peft
    if args.format == "bf16":
        return plain, adapter
    # quantize shard by shard, in place
    for f in sorted(plain.glob("*.safetensors")):
        sd, out = load_file(str(f)), {}
        for k, t in sd.items():
            if args.format == "fp8" and k.endswith("proj.weight") and t.dim() == 2:
                from hybridmoe.requantize import quantize_fp8
                out[k], out[k + "_scale_inv"] = quantize_fp8(t.float(), (128, 128), torch.float32)
            elif args.format == "mxfp4" and k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                from hybridmoe.requantize import quantize_mxfp4_blocks
                parts = [quantize_mxfp4_blocks(x.float().T) for x in t]  # [in, out] -> [out, in]
                out[k + "_blocks"] = torch.stack([b for b, _ in parts])
                out[k + "_scales"] = torch.stack([s for _, s in parts])
            else:
                out[k] = t
        save_file(out, str(f), metadata={"format": "pt"})
    index = plain / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: f.name for f in sorted(plain.glob("*.safetensors")) for k in load_file(str(f))}
        index.write_text(json.dumps(idx))
    c = json.loads((plain / "config.json").read_text())
    c["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [128, 128]} if args.format == "fp8"
                                else {"quant_method": "mxfp4"})
    (plain / "config.json").write_text(json.dumps(c))
    return plain, adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["fp8", "mxfp4", "bf16"], default="fp8",
                   help="bf16: the plain checkpoint of the fp8 shape, for comparison")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--shard-mb", type=int, default=200)
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="export_q_"))
    try:
        base, adapter = build(args, root)
        shards = sorted(base.glob("*.safetensors"))
        run = subprocess.run([sys.executable, "-c", CHILD, str(base), str(adapter), str(root / "merged")],
                             capture_output=True, text=True, check=True)
        res = json.loads(run.stdout.strip().splitlines()[-1])
        print(json.dumps({"format": args.format, "layers": args.layers, "experts": args.experts,
                          "hidden": args.hidden, "checkpoint_mib": round(sum(f.stat().st_size for f in shards) / 2**20, 1),
                          "largest_shard_mib": round(max(f.stat().st_size for f in shards) / 2**20, 1),
                          "shards": len(shards), **res, "time": time.strftime("%Y-%m-%d %H:%M")}))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
