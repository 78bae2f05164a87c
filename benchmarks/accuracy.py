"""The accuracy cost of compact routed experts, against bf16 experts on the same model: one JSON line per format.

    python benchmarks/accuracy.py                                   # tiny deepseek_v2 + gpt_oss, CPU, ~2 min
    python benchmarks/accuracy.py --shape v2lite --layers 4 --device cuda --steps 30   # the V2-Lite shape (GPU host)

Formats: int8 (per-row), int4 at each --int4-groups, FP8-e4m3 128x128 blocks as hybridmoe loads them (experts int8,
the default, and bf16), and for gpt-oss MXFP4 as shipped (kept as MXFP4). The FP8/MXFP4 checkpoints are written
here from the bf16 one, so "FP8 as loaded" includes the FP8 rounding itself: it is the cost of using the FP8 release
instead of a bf16 one.

Per format, against the bf16-experts model (everything else identical):
- logit_rel_err: ‖Δlogits‖/‖logits‖ over a batch of random prompts (one forward);
- greedy: 64 greedy tokens from 4 prompts; ``agree`` = share of positions equal, ``first_diff`` = mean tokens before
  the first difference (64 = none);
- loss curve: LoRA training (every target, routed experts included) through ``hybridmoe train`` for --steps steps
  on a synthetic chat dataset, the same seed and data per format; ``loss`` = the curve, ``final_loss_delta`` = the
  mean of the last 5 losses minus bf16's.
The models are random (nothing can be downloaded here): real checkpoints have heavier-tailed weights, which cost
int4 more; the numbers bound nothing beyond these models and are stated as such in README and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHAPES = {
    # hidden, moe_intermediate, dense intermediate, experts, top-k, shared experts, heads
    "tiny": dict(hidden_size=64, moe_intermediate_size=96, intermediate_size=160, n_routed_experts=8,
                 num_experts_per_tok=2, n_shared_experts=1, num_attention_heads=4, kv_lora_rank=32,
                 qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
    "v2lite": dict(hidden_size=2048, moe_intermediate_size=1408, intermediate_size=10944, n_routed_experts=64,
                   num_experts_per_tok=6, n_shared_experts=2, num_attention_heads=16, kv_lora_rank=512,
                   qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}


def _deepseek_checkpoint(root: Path, shape: str, layers: int, std: float) -> Path:
    from transformers import AutoConfig

    from hybridmoe.testing import save_random_model
    from hybridmoe.testing.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model("deepseek_v2", vocab_size=len(tok), num_hidden_layers=layers, q_lora_rank=None,
                               first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
                               num_key_value_heads=SHAPES[shape]["num_attention_heads"], tie_word_embeddings=False,
                               bos_token_id=0, eos_token_id=1, pad_token_id=1, routed_scaling_factor=1.0,
                               max_position_embeddings=4096, **SHAPES[shape])
    save_random_model(cfg, root / f"deepseek_v2_{shape}", dtype=torch.bfloat16, init_std=std, tokenizer=tok)
    return root / f"deepseek_v2_{shape}"


def _gpt_oss_checkpoint(root: Path, layers: int, std: float) -> Path:
    from transformers import AutoConfig

    from hybridmoe.testing import save_random_model
    from hybridmoe.testing.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=len(tok), hidden_size=128, intermediate_size=128,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                               num_local_experts=8, num_experts_per_tok=2, sliding_window=64,
                               layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                               tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    save_random_model(cfg, root / "gpt_oss", dtype=torch.bfloat16, init_std=std, tokenizer=tok)
    return root / "gpt_oss"


def _rewrite(src: Path, dst: Path, convert, quantization_config: dict) -> Path:
    """A copy of checkpoint `src` with its tensors passed through `convert` and config.json declaring the format."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    save_file(convert(tensors), str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _fp8(tensors: dict, block: int = 128) -> dict:
    """Every 2-D weight (not norms, embeddings, lm_head, router) to FP8-e4m3 with fp32 scale_inv per block."""
    out = {}
    for k, t in tensors.items():
        if t.dim() != 2 or not k.endswith("proj.weight") or ".gate." in k:
            out[k] = t
            continue
        o, i = t.shape
        po, pi = -(-o // block) * block, -(-i // block) * block
        tp = torch.nn.functional.pad(t.float(), (0, pi - i, 0, po - o))
        tb = tp.reshape(po // block, block, pi // block, block)
        scale = (tb.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
        q = (tb / scale[:, None, :, None]).reshape(po, pi)[:o, :i].to(torch.float8_e4m3fn)
        out[k], out[k[: -len("weight")] + "weight_scale_inv"] = q, scale.float()
    return out


def _mxfp4(tensors: dict) -> dict:
    """gpt-oss's fused expert projections ([E, in, out] in transformers) to MXFP4 blocks + e8m0 scales [E, out, ...]."""
    from hybridmoe.experts.packed import quantize_mxfp4

    out = {}
    for k, t in tensors.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            codes, exps = quantize_mxfp4(t.transpose(1, 2).float())  # [E, out, in/2], [E, out, in/32] uint8
            e, o, _ = codes.shape
            out[k + "_blocks"] = codes.reshape(e, o, -1, 16).contiguous()
            out[k + "_scales"] = exps
        else:
            out[k] = t
    return out


def _write_data(path: Path, n: int = 64) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            a, b = i * 7 % 50, i * 13 % 50
            rec = {"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer briefly."},
                                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            f.write(json.dumps(rec) + "\n")
    return path


def _load(path: Path, fmt, device: str):
    import hybridmoe

    model, tok = hybridmoe.load(path, device=device, dtype="bfloat16" if device == "cuda" else "float32",
                                expert_dtype=fmt, progress=False)
    return model, tok


@torch.no_grad()
def _measure(model, tok, prompts: torch.Tensor, greedy_prompts: list[list[int]], tokens: int) -> dict:
    from hybridmoe import generation
    from hybridmoe.generation import SamplingConfig, generate

    generation.eos_token_ids = lambda *a: set()  # all `tokens` tokens, whatever the random model emits
    dev = next(p for p in model.parameters()).device
    logits = model(prompts.to(dev)).logits.float().cpu()
    outs = []
    for p in greedy_prompts:
        res = generate(model, tok, p, SamplingConfig(temperature=0, max_new_tokens=tokens))
        outs.append(res.token_ids)
    return {"logits": logits, "greedy": outs}


def _train_curve(path: Path, fmt, data: Path, out: Path, steps: int, device: str) -> list[float]:
    from hybridmoe.cli import main

    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"model_name_or_path: {path}\ndataset: {data}\noutput_dir: {out}\nmax_steps: {steps}\n"
                   f"expert_dtype: {fmt}\ndevice: {device}\nlora_target: all\nlora_rank: 8\nlearning_rate: 1e-3\n"
                   "logging_steps: 1\nprogress: false\nseed: 0\nper_device_train_batch_size: 4\ncutoff_len: 256\n")
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [round(r["loss"], 4) for r in rows if "loss" in r and "eval_loss" not in r]


def _compare(name: str, got: dict, ref: dict, curve, ref_curve, extra: dict) -> dict:
    rel = float((got["logits"] - ref["logits"]).norm() / ref["logits"].norm())
    agree, first = [], []
    for a, b in zip(got["greedy"], ref["greedy"]):
        n = min(len(a), len(b))
        agree.append(sum(x == y for x, y in zip(a, b)) / max(n, 1))
        first.append(next((i for i in range(n) if a[i] != b[i]), n))
    row = {"bench": "accuracy", "format": name, "logit_rel_err": round(rel, 5),
           "greedy_agree": round(sum(agree) / len(agree), 3), "greedy_first_diff": round(sum(first) / len(first), 1),
           **extra}
    if curve is not None and ref_curve:
        k = min(5, len(curve))
        row["final_loss_delta"] = round(sum(curve[-k:]) / k - sum(ref_curve[-k:]) / k, 4)
        row["loss"] = curve
    return row


def run(args) -> None:
    from hybridmoe.experts.packed import INT4_GROUP, PackedFormat

    root = Path(tempfile.mkdtemp(prefix="hm-accuracy-"))
    data = _write_data(root / "data.jsonl")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (4, 64), generator=g)
    greedy_prompts = [torch.randint(3, 500, (16,), generator=g).tolist() for _ in range(4)]
    # (model name, checkpoint, format label, expert_dtype for load, expert_dtype for `hybridmoe train` or None: no
    # curve; "" = the checkpoint's default)
    cases = []
    if "deepseek_v2" in args.archs:
        name = f"deepseek_v2_{args.shape}"
        base = _deepseek_checkpoint(root, args.shape, args.layers, args.std)
        fp8 = _rewrite(base, root / "fp8", _fp8, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                  "weight_block_size": [128, 128]})
        cases += [(name, base, "bf16", "bfloat16", "bfloat16"), (name, base, "int8", "int8", "int8")]
        cases += [(name, base, f"int4_g{grp}", PackedFormat("int4", grp), "int4" if grp == INT4_GROUP else None)
                  for grp in args.int4_groups]
        cases += [(name, fp8, "fp8_as_loaded_int8", None, ""), (name, fp8, "fp8_as_loaded_bf16", "bfloat16", None)]
    if "gpt_oss" in args.archs:
        base = _gpt_oss_checkpoint(root, max(2, args.layers // 2 * 2), args.std)
        mx = _rewrite(base, root / "mxfp4", _mxfp4, {"quant_method": "mxfp4", "modules_to_not_convert": None})
        cases += [("gpt_oss", base, "bf16", "bfloat16", "bfloat16"), ("gpt_oss", base, "int8", "int8", "int8"),
                  ("gpt_oss", base, "int4_g64", PackedFormat("int4", 64), "int4"),
                  ("gpt_oss", mx, "mxfp4_as_shipped", None, "")]
    refs = {}
    for model_name, path, label, fmt, train_fmt in cases:
        t0 = time.perf_counter()
        model, tok = _load(path, fmt, args.device)
        load_s = time.perf_counter() - t0
        got = _measure(model, tok, prompts, greedy_prompts, args.tokens)
        expert_format = model.hybridmoe.expert_format
        expert_bytes = sum(m.weights.nbytes for m in model.modules() if type(m).__name__ == "HybridExperts")
        del model
        curve = None
        if args.steps and train_fmt is not None:
            curve = _train_curve(path, train_fmt or "null", data, root / f"out-{model_name}-{label}", args.steps,
                                 args.device)
        if label == "bf16":
            refs[model_name] = (got, curve)
        ref, ref_curve = refs[model_name]
        print(json.dumps(_compare(label, got, ref, curve, ref_curve, {
            "model": model_name, "expert_format": expert_format, "expert_GiB": round(expert_bytes / 2**30, 3),
            "load_s": round(load_s, 1), "layers": args.layers, "device": args.device})), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--layers", type=int, default=3, help="decoder layers (the first is dense, as in V2-Lite)")
    p.add_argument("--archs", nargs="+", default=["deepseek_v2", "gpt_oss"])
    p.add_argument("--int4-groups", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="LoRA training steps per format (0: skip the loss curves)")
    p.add_argument("--std", type=float, default=0.02, help="init std of the random weights")
    p.add_argument("--device", default="cpu")
    run(p.parse_args())


if __name__ == "__main__":
    main()
