"""DeepSeek-V2-Lite-shaped measurements on the GPU host (random weights, no download).

    python benchmarks/v2lite.py make  --dir /tmp/v2lite            # write the checkpoint (hub per-expert layout)
    python benchmarks/v2lite.py chat  --dir /tmp/v2lite            # equivalence vs all-GPU transformers+PEFT, decode
    python benchmarks/v2lite.py train --dir /tmp/v2lite --steps 100 --batch 2 --seq 256

Each measurement prints one JSON line: machine, settings, tokens/s, peak GPU and host memory.
The model: 27 layers (layer 0 dense), 64 routed experts top-6, 2 shared experts, hidden 2048, moe_intermediate 1408,
bf16, 15.7B parameters. Random routers spread tokens over all experts, so every step touches every expert of every
layer (the 300 MB L3 cannot flatter the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from decode_breakdown import graph_breakdown

V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1,
               topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=4096, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=1)


# `--tiny`: the same script on a small model, to check it on a machine without a GPU before spending device time.
TINY = dict(vocab_size=600, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def huge_pages_gib() -> float:
    """Anonymous memory of this process on 2 MiB transparent huge pages (the expert weights ask for them)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return 0.0


def emit(rec: dict) -> None:
    print(json.dumps({**rec, "machine": machine()}), flush=True)


def make(args) -> None:
    """Write random bf16 weights shard by shard in the hub's per-expert layout, with an index."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from hybridmoe.testing import build_tokenizer

    out = Path(args.dir)
    if (out / "model.safetensors.index.json").exists():
        print(f"{out} exists", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("deepseek_v2", **{**V2_LITE, **(TINY if args.tiny else {})})
    if args.make_layers:
        config.num_hidden_layers = args.make_layers
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    weight_map, shard, shard_bytes, n_shard, total = {}, {}, 0, 0, 0
    t0 = time.perf_counter()

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            n_shard += 1
            shard, shard_bytes = {}, 0

    def add(key, shape, std):
        nonlocal shard_bytes, total
        if "norm" in key:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std).to(torch.bfloat16).cpu()
        shard[key] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes > 4 * 2**30:
            flush()

    for key, shape in shapes.items():
        if key.endswith("experts.gate_up_proj"):
            e, two_i, h = shape
            for j in range(e):
                add(key.replace("gate_up_proj", f"{j}.gate_proj.weight"), (two_i // 2, h), 0.02)
                add(key.replace("gate_up_proj", f"{j}.up_proj.weight"), (two_i // 2, h), 0.02)
        elif key.endswith("experts.down_proj"):
            e, h, i = shape
            for j in range(e):
                add(key.replace("down_proj", f"{j}.down_proj.weight"), (h, i), 0.02)
        elif key.endswith("mlp.gate.weight"):
            add(key, shape, 0.5)  # a spread-out router: every expert gets tokens
        else:
            add(key, shape, 0.02)
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(str(out))
    build_tokenizer().save_pretrained(str(out))
    print(f"wrote {total / 1e9:.1f} GB in {time.perf_counter() - t0:.0f}s to {out}", file=sys.stderr)


def _load_hybrid(path, expert_dtype=None):
    from hybridmoe.loading import load_model

    rss0 = peak_host_gib()
    t0 = time.perf_counter()
    model = load_model(path, device=DEV, dtype="bfloat16", expert_dtype=expert_dtype, progress=False)
    gpu = torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0
    emit({"bench": "load", "seconds": round(time.perf_counter() - t0, 1), "peak_host_gib": round(peak_host_gib(), 2),
          "host_gib_before": round(rss0, 2), "gpu_gib": round(gpu, 2),
          "expert_gib": round(sum(m.weights.nbytes for m in model.modules() if hasattr(m, "weights")) / 2**30, 2)})
    return model


def _bench_adapter(path: str, name: str = "bench_adapter", seed: int = 0):
    """The hybrid model with a non-zero LoRA on every target (B = small random values), saved as `path/name`."""
    from hybridmoe.adapters import apply_lora, save_adapter

    torch.manual_seed(seed)
    model = apply_lora(_load_hybrid(path), "all", rank=8, alpha=16, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
        for m in model.modules():
            for lo in getattr(m, "lora", {}).values():
                lo.B.normal_(0, 0.01)
    adapter = Path(path) / name
    save_adapter(model, adapter)
    return model.eval(), adapter


def adapter(args) -> None:
    """Write a random adapter on every target (DIR/bench_adapter), e.g. for the server benchmark."""
    _, out = _bench_adapter(args.dir)
    emit({"bench": "adapter", "path": str(out)})


def chat(args) -> None:
    """Prefill logits vs all-GPU transformers+PEFT (bf16) with an adapter on every target; greedy decode speed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hybridmoe.adapters import no_peft_moe_rewrite
    from hybridmoe.generation import SamplingConfig, generate

    model, adapter = _bench_adapter(args.dir)

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, model.config.vocab_size, (1, args.prompt_len), generator=g).to(DEV)
    with torch.no_grad():
        ours = model(prompt).logits.float()
    ref = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map=DEV)
    with no_peft_moe_rewrite():
        ref = PeftModel.from_pretrained(ref, str(adapter)).eval()
    with torch.no_grad():
        want = ref(prompt).logits.float()
    rel = ((ours - want).norm() / want.norm()).item()
    top1 = (ours.argmax(-1) == want.argmax(-1)).float().mean().item()
    emit({"bench": "equivalence_bf16", "prompt_tokens": args.prompt_len, "rel_err_logits": rel, "top1_agree": top1})

    cfg = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)
    import hybridmoe.generation as gen

    gen.eos_token_ids = lambda *a: set()  # measure a fixed number of tokens
    from hybridmoe.loading import load_tokenizer

    tok = load_tokenizer(args.dir)
    res = generate(ref, tok, prompt[0].tolist(), cfg)
    emit({"bench": "decode_all_gpu_transformers_peft", "new_tokens": res.new_tokens,
          "decode_tok_s": round(res.decode_tokens_per_s, 2),
          "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1)})
    del ref
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _hybrid_decode(model, tok, prompt[0].tolist(), cfg, "lora r=8 on every target")


def _hybrid_decode(model, tok, prompt: list[int], cfg, adapter: str, gpu_shares=(None,), repeats: int = 1) -> None:
    """Greedy decode of the hybrid model, side by side: the eager DynamicCache path, then the static-cache decoder
    with CUDA graphs (its first call captures; later ones only replay) with the CPU experts through the torch
    per-expert loop, then through the compiled kernel with each GPU share of the routed experts (None: the default).
    One JSON line each, and after each share where a graph-decoded token's time goes."""
    from hybridmoe.experts import cpu_kernel
    from hybridmoe.experts.backends import DEFAULT_GPU_SHARE, format_key
    from hybridmoe.generation import generate

    settings = model.get_base_model().hybridmoe.settings if hasattr(model, "get_base_model") else model.hybridmoe.settings
    expert_fmt = format_key(next(m for m in model.modules() if type(m).__name__ == "HybridExperts").weights.fmt)
    runs = [("dynamic_cache_eager", dict(static_cache=False), True, 0.0),
            ("static_graphs_torch_loop_first_call", {}, False, 0.0), ("static_graphs_torch_loop", {}, False, 0.0)]
    for share in gpu_shares:
        share = DEFAULT_GPU_SHARE[expert_fmt] if share is None else share
        runs += [(f"static_graphs_share{share:.2f}_first_call", {}, True, share)]
        runs += [(f"static_graphs_share{share:.2f}", {}, True, share)] * repeats
    tokens = {}
    for name, kw, kernel, share in runs:
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        settings.cpu_kernel, settings.gpu_share = kernel, share  # through the model's settings, as users set them
        res = generate(model, tok, prompt, cfg, **kw)
        tokens[name] = res.token_ids
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
        emit({"bench": f"decode_hybrid_{name}", "adapter": adapter, "mode": res.decode_mode,
              "cpu_experts": f"kernel ({cpu_kernel.isa()})" if kernel and cpu_kernel.available() else "torch loop",
              "gpu_share": share, "prompt_tokens": res.prompt_tokens, "new_tokens": res.new_tokens,
              "decode_tok_s": round(res.decode_tokens_per_s, 2),
              "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1), "peak_gpu_gib": round(peak, 2),
              "peak_host_gib": round(peak_host_gib(), 2), "huge_pages_gib": huge_pages_gib(),
              "same_tokens_as_eager": sum(a == b for a, b in zip(res.token_ids, tokens["dynamic_cache_eager"]))})
        if not name.endswith("first_call") and kw == {}:
            graph_breakdown(model, 16, emit, run=name)
    settings.cpu_kernel, settings.gpu_share = True, None


def decode(args) -> None:
    """Batch-1 greedy decode of the hybrid model without an adapter: eager vs CUDA graphs (no baseline load);
    --expert-dtype int8 for int8 experts."""
    import hybridmoe.generation as gen
    from hybridmoe.generation import SamplingConfig
    from hybridmoe.loading import load_tokenizer

    model = _load_hybrid(args.dir, args.expert_dtype).eval()
    gen.eos_token_ids = lambda *a: set()  # a fixed number of tokens
    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)
    _hybrid_decode(model, load_tokenizer(args.dir), prompt.tolist(), cfg, f"none; experts {args.expert_dtype or 'bf16'}",
                   gpu_shares=args.gpu_share, repeats=args.repeats)


def api(args) -> None:
    """The README's Python example as a user runs it (hybridmoe.load, then model.generate with a 1024-token prompt),
    side by side with transformers' own eager generate on the same model object (the path it replaces), and the
    `hybridmoe chat --prompt -v` line's numbers through hybridmoe.generate. Greedy, EOS off, --new-tokens tokens."""
    import time

    import hybridmoe
    import hybridmoe.generation as gen

    gen.eos_token_ids = lambda *a: set()  # a fixed number of tokens on every path
    t0 = time.perf_counter()
    model, tok = hybridmoe.load(args.dir, progress=False)
    emit({"bench": "api_load", "seconds": round(time.perf_counter() - t0, 1), "peak_host_gib": round(peak_host_gib(), 2)})
    ids = torch.randint(2, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    ids = ids.to(model.device)
    model.generation_config.eos_token_id = None
    runs = [("readme_model_generate_first_call", model.generate), ("readme_model_generate", model.generate),
            ("transformers_eager_generate", model._hybridmoe_slow_generate)]
    outs = {}
    for name, fn in runs:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        outs[name] = out[0, ids.shape[1]:].tolist()
        emit({"bench": f"api_{name}", "prompt_tokens": args.prompt_len, "new_tokens": len(outs[name]),
              "seconds": round(s, 2), "tok_s_incl_prefill": round(len(outs[name]) / s, 2),
              })
    res = hybridmoe.generate(model, tok, ids[0].tolist(), max_new_tokens=args.new_tokens, temperature=0)
    emit({"bench": "api_hybridmoe_generate", "decode_tok_s": round(res.decode_tokens_per_s, 2),
          "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1), "mode": res.decode_mode,
          "same_tokens": sum(a == b for a, b in zip(outs["readme_model_generate"], outs["transformers_eager_generate"]))})


def prefill(args) -> None:
    """Prefill of a --prompt-len prompt with --stream-slots N layers of expert weights on the GPU and --cpu-share S of
    each layer's experts computed on the CPU meanwhile, for each (N, S). The shares run side by side: four rounds of
    one prompt at each share in turn (round 0 is cold; inference keeps the first N-2 layers resident between
    prompts). One JSON line per prompt (tokens/s, bytes copied, the split's CPU seconds and the seconds the host
    then waited for them), then one per share with the median of rounds 1-3. --expert-dtype int8 for int8 experts."""
    import statistics

    import hybridmoe.generation as gen
    from hybridmoe.experts.split import STATS
    from hybridmoe.experts.streaming import enable_streaming
    from hybridmoe.generation import SamplingConfig, generate
    from hybridmoe.loading import load_tokenizer

    model = _load_hybrid(args.dir, args.expert_dtype).eval()
    tok = load_tokenizer(args.dir)
    gen.eos_token_ids = lambda *a: set()
    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(2))
    cfg = SamplingConfig(temperature=0, max_new_tokens=1)
    settings = model.hybridmoe.settings
    experts = args.expert_dtype or "bf16"
    for slots in args.stream_slots:
        streamer = enable_streaming(model, DEV, min_tokens=64, slots=slots)
        if DEV == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rates = {share: [] for share in args.cpu_share}
        for i in range(4):
            for share in args.cpu_share:
                settings.cpu_share = share
                before = streamer.stats.bytes
                STATS.reset()
                res = generate(model, tok, prompt.tolist(), cfg)
                rate = res.prompt_tokens / res.prefill_s
                rates[share].append(rate)
                emit({"bench": "prefill", "experts": experts, "stream_slots": slots, "cpu_share": share, "prompt": i,
                      "prompt_tokens": res.prompt_tokens, "prefill_tok_s": round(rate, 1),
                      "copied_gb": round((streamer.stats.bytes - before) / 1e9, 3),
                      "split_layers": STATS.calls, "cpu_s": round(STATS.cpu_s, 3), "cpu_wait_s": round(STATS.wait_s, 3),
                      "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else 0.0})
        # Equivalence on the real shape: the last position's logits at each share against the first share's.
        logits = {}
        with torch.inference_mode():
            for share in args.cpu_share:
                settings.cpu_share = share
                logits[share] = model(prompt[None].to(DEV), logits_to_keep=1).logits[0, -1].float()
        base = logits[args.cpu_share[0]]
        for share, r in rates.items():
            rel = ((logits[share] - base).norm() / base.norm()).item()
            emit({"bench": "prefill_cpu_share", "experts": experts, "stream_slots": slots, "cpu_share": share,
                  "prompt_tokens": args.prompt_len, "prefill_tok_s_median": round(statistics.median(r[1:]), 1),
                  "prefill_tok_s": [round(x, 1) for x in r], "logits_rel_vs_first_share": float(f"{rel:.2e}")})
        settings.cpu_share = None
        del streamer
        enable_streaming(model, DEV, min_tokens=0)  # drop the slots before the next size


def _layer_view(src: str, layers: int) -> str:
    """A view of the checkpoint with only the first `layers` layers: same shards (symlinked), smaller config.
    Both loaders ignore the unused layers' tensors; the full-width layers keep the measurement honest."""
    view = Path(f"{src}_{layers}L")
    if not view.exists():
        view.mkdir()
        for f in Path(src).iterdir():
            if f.name != "config.json" and not f.name.startswith("bench"):
                (view / f.name).symlink_to(f)
        cfg = json.loads((Path(src) / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        (view / "config.json").write_text(json.dumps(cfg))
    return str(view)


def equiv32(args) -> None:
    """fp32 hybrid vs fp32 all-GPU transformers on a V2-Lite-width model cut to --layers layers, plus transformers'
    own bf16 error on the same input for scale."""
    from transformers import AutoModelForCausalLM

    from hybridmoe.loading import load_model

    path = _layer_view(args.dir, args.layers)
    g = torch.Generator().manual_seed(1)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompt = torch.randint(2, vocab, (2, args.prompt_len), generator=g).to(DEV)
    hyb = load_model(path, device=DEV, dtype="float32", progress=False)
    with torch.no_grad():
        ours = hyb(prompt).logits.float()
    del hyb
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=DEV).eval()
        with torch.no_grad():
            out[name] = ref(prompt).logits.float()
        del ref
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    emit({"bench": "equivalence_fp32", "layers": args.layers, "tokens": prompt.numel(),
          "rel_err_hybrid_fp32_vs_transformers_fp32": rel(ours, out["fp32"]),
          "max_abs_err": (ours - out["fp32"]).abs().max().item(),
          "rel_err_transformers_bf16_vs_fp32": rel(out["bf16"], out["fp32"]),
          "top1_agree": (ours.argmax(-1) == out["fp32"].argmax(-1)).float().mean().item()})


def write_bench_data(path: str, seq: int) -> Path:
    """`path`/bench_data.jsonl: 256 random chats (seeded) whose prompt + reply fill about `seq` tokens."""
    data = Path(path) / "bench_data.jsonl"
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "expert", "router", "token", "layer", "memory", "cache"]
    with open(data, "w") as f:
        for _ in range(256):  # ~2 tokens a word: prompt + reply fill about cutoff_len
            q = " ".join(words[j] for j in torch.randint(0, 10, (seq // 8,), generator=g).tolist())
            a = " ".join(words[j] for j in torch.randint(0, 10, (seq // 3,), generator=g).tolist())
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return data


def train(args) -> None:
    from hybridmoe.training import train as run

    data = write_bench_data(args.dir, args.seq)
    out = Path(args.dir) / f"bench_train_{args.nproc}_{args.expert_dtype or 'bfloat16'}"
    cfg = {"model_name_or_path": args.dir, "dataset": str(data), "output_dir": str(out), "max_steps": args.steps,
           "per_device_train_batch_size": args.batch, "cutoff_len": args.seq, "learning_rate": 1e-4,
           "lora_rank": 8, "lora_alpha": 16, "lora_target": "all", "logging_steps": args.log_every, "device": DEV,
           "dtype": "bfloat16", "gradient_checkpointing": True, "progress": False}
    if args.expert_dtype:
        cfg["expert_dtype"] = args.expert_dtype
    t0 = time.perf_counter()
    if args.trace_step:
        _trace_trainer_step(args.trace_step, f"trainer_trace_{args.expert_dtype or 'bfloat16'}")
    if args.nproc > 1:  # data-parallel over the host's GPUs, through the CLI a user would run
        cfg_path = out.with_suffix(".json")
        cfg_path.write_text(json.dumps(cfg))
        subprocess.run([sys.executable, "-m", "hybridmoe", "train", str(cfg_path), "--nproc", str(args.nproc)],
                       check=True)
        steps = skipped = final = None
        peak_gpu = peak_host = None
    else:
        res = run(cfg)
        steps, skipped, final = res.steps, res.skipped_steps, res.final_loss
        peak_gpu, peak_host = res.peak_gpu_bytes / 2**30, res.peak_host_bytes / 2**30
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in logs[1:] if "tokens_per_s" in r] or [logs[-1].get("tokens_per_s", 0)]
    last = logs[-1]
    emit({"bench": "train_lora_all_targets", "nproc": args.nproc, "expert_dtype": args.expert_dtype or "bfloat16", "steps": steps or last.get("step"),
          "skipped": skipped, "batch_per_gpu": args.batch, "seq": args.seq,
          "final_loss": final if final is not None else last.get("loss"), "first_loss": logs[0]["loss"],
          "tokens_per_s": round(sorted(tps)[len(tps) // 2], 1), "windows_tok_s": [round(t) for t in tps],
          "seconds": round(time.perf_counter() - t0, 1),
          "peak_gpu_gib_rank0": round(peak_gpu if peak_gpu is not None else last.get("peak_gpu_gib", 0), 2),
          "peak_host_gib": round(peak_host, 2) if peak_host is not None else last.get("host_rss_gib"),
          "last_log": last})


def _trace_trainer_step(n: int, name: str) -> None:
    """Trace one whole step of the trainer as it runs (torch.profiler from the end of optimizer step n to the end of
    step n + 1: logging, data, forward, backward, clip, optimizer), summarized by trace_summary.py; the trace (gzip)
    goes to $OUT. The trainer itself is unchanged: its optimizer step is wrapped for the one call."""
    from torch.profiler import ProfilerActivity, profile

    from hybridmoe import training

    sys.path.insert(0, str(Path(__file__).parent))
    from trace_summary import save_and_summarize

    real, calls, prof = training._Setup.optimizer_step, [0], []

    def step(self, clip_coef):
        real(self, clip_coef)
        calls[0] += 1
        if calls[0] == n:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
            prof.append(profile(activities=acts))
            prof[0].__enter__()
        elif calls[0] == n + 1:
            if DEV == "cuda":
                torch.cuda.synchronize()
            prof[0].__exit__(None, None, None)
            emit({"bench": "trainer_step_trace", "name": name,
                  **save_and_summarize(prof[0], os.environ.get("OUT", "/tmp"), name)})

    training._Setup.optimizer_step = step


def train_baseline(args) -> None:
    """All-GPU transformers + PEFT LoRA (same targets incl. routed experts via target_parameters), same data and
    settings as `train`: the upper bound when the whole model fits on the GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hybridmoe.adapters import no_peft_moe_rewrite
    from hybridmoe.data import SFTDataset, batches, collate, load_records
    from hybridmoe.loading import load_tokenizer

    tok = load_tokenizer(args.dir)
    ds = SFTDataset(load_records(Path(args.dir) / "bench_data.jsonl"), tok, args.seq)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map=DEV)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"})
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=linear,
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with no_peft_moe_rewrite():
        model = get_peft_model(model, cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = batches(ds, args.batch, 0, 0)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for idx in order[: args.steps]:
        b = {k: v.to(DEV) for k, v in collate([ds[j] for j in idx], tok.pad_token_id).items()}
        t = time.perf_counter()
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        if DEV == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        tokens.append(int(b["attention_mask"].sum()))
    tps = sum(tokens[2:]) / sum(times[2:])  # after two warm-up steps
    emit({"bench": "train_baseline_all_gpu_transformers_peft", "steps": len(times), "batch": args.batch,
          "seq": args.seq, "tokens_per_s": round(tps, 1),
          "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else 0.0})


def profile(args) -> None:
    """torch.profiler over a LoRA training step of the hybrid model as the trainer runs it (gradient checkpointing,
    chunked loss, the joint clip and the fused AdamW over both devices): phase times with a sync between phases
    (median of 3 steps), then one profiled step whose chrome trace goes to $OUT (or --dir) and is summarized by
    benchmarks/trace_summary.py (copies vs kernels vs an idle GPU)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from hybridmoe.adapters import apply_lora
    from hybridmoe.cpu_optim import PlainStep, overlapped_step
    from hybridmoe.experts.streaming import model_streamer
    from hybridmoe.grad_clip import clip_grad_norm_deferred
    from hybridmoe.loss import causal_lm_loss
    from hybridmoe.training import expert_lora_layers, named_trainable

    sys.path.insert(0, str(Path(__file__).parent))
    from trace_summary import save_and_summarize

    model = apply_lora(_load_hybrid(args.dir, args.expert_dtype), "all", rank=8, alpha=16, seed=0)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for _, p in named_trainable(model)]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    # as the trainer steps: the expert LoRA's update on a worker thread while the next forward runs
    stepper = overlapped_step(opt, expert_lora_layers(model), torch.device(DEV)) or PlainStep(opt)
    ids = torch.randint(2, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(DEV), "attention_mask": torch.ones_like(ids).to(DEV), "labels": ids.to(DEV)}

    def sync():
        if DEV == "cuda":
            torch.cuda.synchronize()

    def step(phases: dict | None = None):
        t = time.perf_counter()
        with record_function("forward"):
            loss = causal_lm_loss(model, batch, ids.numel())
        if phases is not None:
            sync()
            phases["forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
        with record_function("backward"):
            loss.backward()
        if phases is not None:
            sync()
            phases["backward"].append(time.perf_counter() - t)
            t = time.perf_counter()
        with record_function("optimizer"):
            _, coef = clip_grad_norm_deferred(params, 1.0, stepper.tensors)
            stepper.step(coef)
            opt.zero_grad(set_to_none=True)
        sync()
        if phases is not None:
            phases["optimizer"].append(time.perf_counter() - t)

    step()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls, phases = [], {"forward": [], "backward": [], "optimizer": []}
    for _ in range(3):
        t = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t)
    for _ in range(2):
        step(phases)
    plain = sorted(walls)[1]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof, record_function("train_step"):
        step()
    streamer = model_streamer(model)
    emit({"bench": "profile_train_step", "expert_dtype": args.expert_dtype or "bfloat16",
          "seconds_per_step": round(plain, 3), "tokens": args.batch * args.seq,
          "tokens_per_s": round(args.batch * args.seq / plain, 1),
          "phases_s": {k: [round(v, 3) for v in vs] for k, vs in phases.items()},
          "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else 0.0,
          "stream_stats": vars(streamer.stats) if streamer else None})
    emit({"bench": "train_step_trace", "expert_dtype": args.expert_dtype or "bfloat16",
          **save_and_summarize(prof, os.environ.get("OUT", args.dir), f"train_trace_{args.expert_dtype or 'bfloat16'}",
                               "train_step")})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)


def profile_decode(args) -> None:
    """torch.profiler over greedy decode steps of the hybrid model (bf16): where a token's time goes."""
    from torch.profiler import ProfilerActivity, profile

    import hybridmoe.generation as gen
    from hybridmoe.generation import SamplingConfig, generate
    from hybridmoe.loading import load_tokenizer

    model = _load_hybrid(args.dir)
    tok = load_tokenizer(args.dir)
    gen.eos_token_ids = lambda *a: set()  # a fixed number of tokens
    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)
    generate(model, tok, prompt.tolist(), cfg)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts) as prof:
        res = generate(model, tok, prompt.tolist(), cfg)
    emit({"bench": "profile_decode", "new_tokens": res.new_tokens, "decode_tok_s": round(res.decode_tokens_per_s, 2),
          "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1)})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["make", "adapter", "chat", "decode", "api", "prefill", "train", "train_baseline", "equiv32", "profile", "profile_decode"])
    p.add_argument("--make-layers", type=int, default=0, help="make: write only this many layers")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--layers", type=int, default=4, help="equiv32: layers kept")
    p.add_argument("--dir", default="/tmp/v2lite")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--expert-dtype", choices=["bfloat16", "int8", "int4"], default=None, help="decode, train: routed-expert dtype")
    p.add_argument("--repeats", type=int, default=1, help="decode: replay-only runs per GPU share")
    p.add_argument("--stream-slots", type=int, nargs="+", default=[2], help="prefill: GPU slots of expert weights")
    p.add_argument("--cpu-share", type=float, nargs="+", default=[0.0],
                   help="prefill: shares of each layer's experts the CPU computes while the rest stream to the GPU")
    p.add_argument("--gpu-share", type=float, nargs="+", default=[None],
                   help="decode: shares of the routed experts the GPU computes (default: hybridmoe's)")
    p.add_argument("--trace-step", type=int, default=0, help="train: trace the trainer's step after this one")
    p.add_argument("--nproc", type=int, default=1, help="train: GPUs (data-parallel, via `hybridmoe train --nproc`)")
    p.add_argument("--tiny", action="store_true", help="small dims: check the script without a GPU")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    modes = {"make": make, "adapter": adapter, "chat": chat, "decode": decode, "api": api, "prefill": prefill, "train": train, "train_baseline": train_baseline, "equiv32": equiv32,
             "profile": profile, "profile_decode": profile_decode}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
