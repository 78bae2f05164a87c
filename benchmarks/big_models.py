"""100B-class MoE models on one GPU host, built in place (random, in the target format): one JSON line per measure.

    python benchmarks/big_models.py --model gpt-oss-120b --format mxfp4        # MXFP4 experts as shipped
    python benchmarks/big_models.py --model glm-4.5-air --format int4          # int4 experts
    python benchmarks/big_models.py --model gpt-oss-120b --layers 2 --device cpu --tiny   # check the script anywhere

The GPU host's 64 GiB disk cannot hold these checkpoints, so the model is assembled the way ``load_model`` assembles
it (meta model, fused experts swapped for HybridExperts in the target format, every other weight on the compute
device, streaming and page-locking as configured), with random values: expert codes from a random 64 MiB block
tiled over each layer (decode and training speed do not depend on the values), scales that give weights of ~0.02,
other weights N(0, 0.02), routers wide enough that every expert gets tokens. The reading path itself is measured by
``benchmarks/accuracy.py`` / the format tests on checkpoints written in each format.

Measures (each a JSON line): ``build`` (seconds, host RSS, expert GiB against the format's nominal size, GPU),
``decode`` (batch 1, CUDA graphs + CPU kernel + GPU share: ``hybridmoe.generate``), ``prefill`` (a --prompt-len
prompt), ``train`` (LoRA r=8 on every target, routed experts included, --batch x --seq, gradient checkpointing, AdamW:
the trainer's math without its data pipeline: its chunked LM-head loss, its overlapped AdamW; tok/s of the median
step, peak GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from decode_breakdown import graph_breakdown, kernel_profile
from v2lite import huge_pages_gib, peak_host_gib

MODELS = {
    # transformers model_type, config overrides; dims from the released configs
    "gpt-oss-120b": ("gpt_oss", dict(num_hidden_layers=36, num_local_experts=128, num_experts_per_tok=4,
                                     hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                                     num_key_value_heads=8, head_dim=64, vocab_size=201088, sliding_window=128)),
    # transformers' default glm4_moe config is GLM-4.5-Air: 46 layers, 128 experts top-8, hidden 4096
    "glm-4.5-air": ("glm4_moe", {}),
    "v2-lite": ("deepseek_v2", dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                                    num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                                    num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                                    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)),
}
TINY = dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512, num_local_experts=8, n_routed_experts=8,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def host_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _config(args):
    from transformers import AutoConfig

    model_type, kw = MODELS[args.model]
    kw = dict(kw)
    if args.layers:
        kw["num_hidden_layers"] = args.layers
        if model_type == "gpt_oss":
            kw["layer_types"] = ["sliding_attention", "full_attention"] * (args.layers // 2) + \
                ["sliding_attention"] * (args.layers % 2)
    if args.tiny:
        probe = AutoConfig.for_model(model_type)
        kw.update({k: v for k, v in TINY.items() if hasattr(probe, k)})
        if model_type == "deepseek_v2":  # MLA: one KV head per query head
            kw["num_key_value_heads"] = kw["num_attention_heads"]
    return AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)


def random_block(dtype: torch.dtype, nbytes: int = 64 << 20) -> torch.Tensor:
    """nbytes of random values of `dtype` (floats N(0, 0.02); codes uniform), as uint8."""
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        n = nbytes // torch.finfo(dtype).bits * 8
        return (torch.randn(n, generator=g) * 0.02).to(dtype).view(torch.uint8)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def tile_block(t: torch.Tensor, block: torch.Tensor) -> None:
    """Write `block` (uint8 bytes) over the contiguous tensor t again and again (a memcpy: a 60 GB model in seconds,
    where random_ over it took minutes)."""
    flat = t.view(-1).view(torch.uint8)
    for s in range(0, flat.numel(), block.numel()):
        n = min(block.numel(), flat.numel() - s)
        flat[s:s + n].copy_(block[:n])


def _fill_experts(ex) -> None:
    """Random-looking weights in the experts' own format, written in place (no float copy): a random 64 MiB block
    tiled over each tensor (a memcpy, so a 60 GB model builds in seconds)."""
    w = ex.weights
    for proj in ("gate_up_proj", "down_proj"):
        t = w.tensor(proj)
        tile_block(t, random_block(t.dtype))
        if w.scales is not None:
            peak = 6.0 if w.packed is not None and w.packed.kind == "mxfp4" else (8.0 if w.packed else 127.0)
            scale = 0.05 / peak
            if w.scales[proj].dtype == torch.uint8:  # MXFP4's e8m0 exponent of the nearest power of two
                scale = round(torch.log2(torch.tensor(scale)).item()) + 127
            w.scales[proj].fill_(scale)
        if w.bias is not None:
            w.bias[proj].zero_()
        w.loaded[proj][:] = True
        if w.bias is not None:
            w.loaded[f"{proj}_bias"][:] = True


def _bf16_scales(w) -> None:
    """MXFP4 scales held as bf16 values instead of the shipped e8m0 bytes (sessions 6-15's form; the baseline of
    --mxfp4-bf16-scales): every consumer takes either."""
    from hybridmoe.experts.cpu_experts import _ones_on_huge_pages

    w.scales = {p: _ones_on_huge_pages(s.shape, s.device, torch.bfloat16) for p, s in w.scales.items()}


def build(args):
    """The hybrid model, assembled in place; returns (model, tokenizer)."""
    from hybridmoe.attention_backend import avoid_per_shape_plans
    from hybridmoe.experts.backends import ExpertSettings
    from hybridmoe.host_embedding import embeddings_to_host
    from hybridmoe.loading import (
        HybridMeta,
        _block_format,
        _build_empty,
        _set_tensor,
        _setup_streaming,
        _swap_experts,
        resolve_expert_dtype,
    )
    from hybridmoe.testing import build_tokenizer

    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    avoid_per_shape_plans(dev)  # as hybridmoe.load does on a GPU (no cuDNN attention)
    config = _config(args)
    t0 = time.perf_counter()
    model = _build_empty(config, dt)
    settings = ExpertSettings()
    fmt = resolve_expert_dtype(args.format, dev)
    experts = _swap_experts(model, fmt, settings=settings)
    for ex in experts.values():
        if args.mxfp4_bf16_scales and ex.weights.packed is not None and ex.weights.packed.kind == "mxfp4":
            _bf16_scales(ex.weights)
        _fill_experts(ex)
    expert_bytes = sum(ex.weights.nbytes for ex in experts.values())
    expert_params = sum(ex.spec.num_experts * (ex.spec.shape("gate_up_proj")[1] * ex.spec.shape("gate_up_proj")[2]
                                               + ex.spec.shape("down_proj")[1] * ex.spec.shape("down_proj")[2])
                        for ex in experts.values())
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta":
            continue
        if "norm" in name or name.endswith("sinks"):
            t = torch.ones(p.shape, dtype=dt, device=dev)
        else:
            std = 0.5 if (".gate." in name or ".router." in name) and not name.endswith("bias") else 0.02
            t = (torch.randn(p.shape, generator=gen, device=dev, dtype=torch.float32) * std).to(dt)
            if name.endswith("e_score_correction_bias"):
                t = torch.zeros(p.shape, dtype=torch.float32, device=dev)
        _set_tensor(model, name, t)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    model.hybridmoe = HybridMeta(f"built in place: {args.model}", dev, dt, fmt, list(experts), settings=settings,
                                 source_format=f"random, {args.format}")
    _setup_streaming(model, experts, dev, None, args.stream_slots)
    if dev.type == "cuda" and embeddings_to_host(model, dev):
        torch.cuda.empty_cache()
    nominal = {"bfloat16": 2.0, "int8": 1.0, "int4": 0.5, "mxfp4": 0.5}[args.format]
    first = next(iter(experts.values())).weights
    emit({"bench": "build", "model": args.model, "format": args.format,
          "expert_format": str(_block_format(fmt, next(iter(experts.values())).spec, "")),
          "scales": None if first.scales is None else str(first.scales["down_proj"].dtype).removeprefix("torch."),
          "layers": config.num_hidden_layers, "seconds": round(time.perf_counter() - t0, 1),
          "expert_params_B": round(expert_params / 1e9, 2), "expert_gib": round(expert_bytes / 2**30, 2),
          "expert_gib_at_nominal_bits": round(expert_params * nominal / 2**30, 2),
          "bf16_expert_gib": round(expert_params * 2 / 2**30, 2),
          "host_rss_gib": round(host_rss_gib(), 2), "peak_host_gib": round(peak_host_gib(), 2),
          "gpu_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if dev.type == "cuda" else 0.0,
          "machine": platform.processor() or platform.machine(), "torch": torch.__version__})
    return model, build_tokenizer()


def decode(model, tok, args) -> None:
    import hybridmoe
    import hybridmoe.generation as gen

    gen.eos_token_ids = lambda *a: set()  # a fixed number of tokens
    prompt = torch.randint(2, model.config.vocab_size, (args.decode_prompt,), generator=torch.Generator().manual_seed(1))
    from hybridmoe import decode_norm, graph_gate
    from hybridmoe.decode_graph import drop_decoder
    from hybridmoe.experts.streaming import enable_streaming, model_streamer

    # (GPU share, call, resident layers, compiled, fused norms, graph gates): the first call captures the graphs;
    # then other GPU shares, then other resident layer counts at the default share
    fused, gated = decode_norm.ENABLED, graph_gate.ENABLED
    runs = [(None, 0, 0, False, fused, gated), (None, 1, 0, False, fused, gated)]
    if args.norms_ab:  # the RMSNorms fused and not, alternating, twice (hybridmoe.decode_norm)
        runs = [(None, i, 0, False, norms, gated) for _ in range(2) for norms in (True, False) for i in (0, 1)]
    if args.gates_ab:  # graphs launched ahead at gates and not, alternating, twice (hybridmoe.graph_gate)
        order = (True, False) if args.gates_first == "on" else (False, True)
        runs = [(None, i, 0, False, fused, g) for _ in range(2) for g in order for i in (0, 1)]
    runs += [(share, 1, 0, False, fused, gated) for share in args.gpu_shares]
    runs += [(None, i, n, False, fused, gated) for n in args.resident_layers for i in (0, 1)]
    if args.compile_decode:  # the GPU stretches compiled (hybridmoe.decode_compile): call 0 compiles
        runs += [(None, 0, 0, True, fused, gated), (None, 1, 0, True, fused, gated)]
    if args.again:  # the default decode once more, after the other runs (does the process's state change its speed?)
        runs += [(None, 0, 0, False, fused, gated), (None, 1, 0, False, fused, gated)]
    def set_resident(n: int) -> None:
        streamer = model_streamer(model)
        if n == (streamer.resident if streamer is not None else 0):
            return
        drop_decoder(model)  # its graphs hold the old slots: free them first
        del streamer
        enable_streaming(model, args.device, 0, 2, 0)  # drops the old slots
        torch.cuda.empty_cache()
        enable_streaming(model, args.device, streamer_min_tokens(model), args.stream_slots, n)

    for share, i, resident, compiled, norms, gates in runs:
        model.hybridmoe.settings.gpu_share = share  # None: the default for the experts' format
        model.hybridmoe.settings.compile_decode = compiled
        if norms != decode_norm.ENABLED or gates != graph_gate.ENABLED:  # read when a decoder is built or captured
            decode_norm.ENABLED, graph_gate.ENABLED = norms, gates
            drop_decoder(model)
        set_resident(resident)
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = hybridmoe.generate(model, tok, prompt.tolist(), max_new_tokens=args.new_tokens, temperature=0)
        dec = getattr(model, "_hybridmoe_decoder", None)
        gated_now = dec is not None and dec.chain.gates is not None  # (off with a GPU share)
        emit({"bench": "decode", "model": args.model, "format": args.format, "call": i, "gpu_share": share,
              "resident_layers": resident, "compile_decode": compiled, "fused_norms": norms and not compiled,
              "graph_gates": gated_now, "wall_s": round(time.perf_counter() - t0, 1),
              "decode_tok_s": round(res.decode_tokens_per_s, 2), "mode": res.decode_mode,
              "new_tokens": res.new_tokens, "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1),
              "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if model.device.type == "cuda" else 0,
              "host_rss_gib": round(host_rss_gib(), 2), "host_huge_gib": huge_pages_gib()})
        if i:  # the captured decoder, replayed piece by piece
            graph_breakdown(model, 16, emit, run=args.model, gpu_share=share, resident_layers=resident,
                            compile_decode=compiled, fused_norms=norms and not compiled, graph_gates=gated_now)
    model.hybridmoe.settings.compile_decode = False
    decode_norm.ENABLED, graph_gate.ENABLED = fused, gated
    if args.kernel_profile:
        kernel_profile(model, emit, run=args.model, fused_norms=fused)
        if args.norms_ab:
            decode_norm.ENABLED = not fused
            kernel_profile(model, emit, run=args.model, fused_norms=not fused)
            decode_norm.ENABLED = fused
        if args.compile_decode:
            model.hybridmoe.settings.compile_decode = True
            kernel_profile(model, emit, run=args.model, compile_decode=True)
            model.hybridmoe.settings.compile_decode = False
    set_resident(0)


def streamer_min_tokens(model) -> int:
    from hybridmoe.loading import DEFAULT_STREAM_MIN_TOKENS

    return DEFAULT_STREAM_MIN_TOKENS if model.device.type == "cuda" else 0


def prefill(model, tok, args) -> None:
    import hybridmoe
    from hybridmoe.experts import HybridExperts, amx
    from hybridmoe.experts.split import STATS
    from hybridmoe.experts.streaming import StreamStats, model_streamer

    prompt = torch.randint(2, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(2))
    settings = model.hybridmoe.settings
    streamer = model_streamer(model)
    cuda = model.device.type == "cuda"
    threads_before = amx.THREADS
    if streamer is not None:
        streamer.time_copies = cuda  # the copy stream's busy seconds: is the prefill bound by the copies?
    for i in range(3):  # the settings side by side: each call of round i at every (AMX threads, share) in turn
        for threads in args.amx_threads or [amx.THREADS]:
            for share in args.cpu_shares or [None]:
                settings.cpu_share = share
                amx.THREADS = threads
                cpu_experts = {m.settings.prefill_cpu_experts(m.weights.fmt, m.num_experts, model.hybridmoe.device)
                               for m in model.modules() if isinstance(m, HybridExperts)}
                STATS.reset()
                amx.stats(reset=True)
                if streamer is not None:
                    streamer.stats = StreamStats()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                res = hybridmoe.generate(model, tok, prompt.tolist(), max_new_tokens=1, temperature=0)
                gemm = amx.stats(reset=True)  # the split's AMX GEMMs: their share of cpu_s
                amx_s = gemm.get("calls", 0) * (gemm.get("pack_x_us", 0) + gemm.get("region_us", 0)) / 1e6
                copy_s = streamer.stats.copy_seconds() if streamer is not None and cuda else 0.0
                copied = streamer.stats.bytes if streamer is not None else 0
                emit({"bench": "prefill", "model": args.model, "format": args.format, "call": i, "cpu_share": share,
                      "amx_threads": threads or torch.get_num_threads(), "cpu_experts": sorted(cpu_experts),
                      "prompt_tokens": res.prompt_tokens, "prefill_tok_s": round(res.prompt_tokens / res.prefill_s, 1),
                      "prefill_s": round(res.prefill_s, 4),
                      "split_layers": STATS.calls, "cpu_s": round(STATS.cpu_s, 3), "cpu_wait_s": round(STATS.wait_s, 3),
                      "fetch_s": round(STATS.fetch_s, 3), "start_s": round(STATS.start_s, 3),
                      "queue_s": round(STATS.queue_s, 3),
                      "amx_calls": gemm.get("calls", 0), "amx_s": round(amx_s, 3),
                      "amx_tiles_s": round(gemm.get("calls", 0) * gemm.get("tiles_us", 0) / 1e6, 3),
                      "copy_s": round(copy_s, 3), "copy_gib": round(copied / 2**30, 2),
                      "copy_gb_s": round(copied / copy_s / 1e9, 1) if copy_s else 0.0,
                      "amx": amx.status(),
                      "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0})
    amx.THREADS = threads_before
    if streamer is not None:
        streamer.time_copies = False
    for share in (args.cpu_shares or [None]) if args.profile_prefill and model.device.type == "cuda" else ():
        settings.cpu_share = share  # then one prompt at each share under the profiler
        profile_step(lambda: hybridmoe.generate(model, tok, prompt.tolist(), max_new_tokens=1, temperature=0),
                     f"prefill_{args.model}_{args.format}_share{share}", model.device)
    settings.cpu_share = None


def train(model, args) -> None:
    from hybridmoe.adapters import apply_lora
    from hybridmoe.cpu_optim import PlainStep, overlapped_step
    from hybridmoe.loss import causal_lm_loss
    from hybridmoe.training import expert_lora_layers, named_trainable

    peft_model = apply_lora(model, "all", rank=8, alpha=16, seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    params = [p for _, p in named_trainable(peft_model)]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dev = model.hybridmoe.device
    stepper = overlapped_step(opt, expert_lora_layers(peft_model), dev) or PlainStep(opt)  # as the trainer steps
    g = torch.Generator().manual_seed(3)

    def loss_of(ids: torch.Tensor) -> torch.Tensor:  # the trainer's loss: the LM head in checkpointed chunks
        return causal_lm_loss(peft_model, {"input_ids": ids, "labels": ids}, ids.numel() - ids.shape[0])

    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        ids = torch.randint(2, model.config.vocab_size, (args.batch, args.seq), generator=g).to(dev)
        t0 = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        stepper.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        emit({"bench": "train_step", "model": args.model, "step": step, "seconds": round(times[-1], 2),
              "loss": round(loss.item(), 4)})
    med = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    emit({"bench": "train", "model": args.model, "format": args.format, "batch": args.batch, "seq": args.seq,
          "tokens_per_s": round(args.batch * args.seq / med, 1), "steps": args.steps,
          "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else 0,
          "host_rss_gib": round(host_rss_gib(), 2), "peak_host_gib": round(peak_host_gib(), 2)})
    if args.profile:
        ids = torch.randint(2, model.config.vocab_size, (args.batch, args.seq), generator=g).to(dev)

        def one_step():
            loss_of(ids).backward()
            stepper.step()
            opt.zero_grad(set_to_none=True)

        profile_step(one_step, f"train_trace_{args.model}_{args.format}", dev)


def profile_step(fn, name: str, dev: torch.device) -> None:
    """One call of fn under torch.profiler: its chrome trace (gzipped) into $OUT (or /tmp) and one JSON line of
    benchmarks/trace_summary.py's summary (kernels vs host->device copies vs an idle GPU, top kernels, ranges)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sys.path.insert(0, str(Path(__file__).parent))
    from trace_summary import save_and_summarize

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof, record_function("step"):
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    emit({"bench": "step_trace", "name": name, **save_and_summarize(prof, os.environ.get("OUT", "/tmp"), name, "step")})


def _share(v: str) -> float | None:
    return None if v == "default" else float(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--format", choices=["bfloat16", "int8", "int4", "mxfp4"], required=True)
    p.add_argument("--mxfp4-bf16-scales", action="store_true",
                   help="MXFP4: hold the scales as bf16 values (the form before session 16), not the e8m0 bytes")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the model's)")
    p.add_argument("--tiny", action="store_true", help="small widths: check the script without a GPU host")
    p.add_argument("--device", default="cuda")
    p.add_argument("--stream-slots", type=int, default=2)
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gpu-shares", type=float, nargs="*", default=[], help="decode: also these GPU shares")
    p.add_argument("--kernel-profile", action="store_true", help="decode: then the GPU kernels of one eager step")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode: also with the GPU stretches compiled (settings.compile_decode)")
    p.add_argument("--again", action="store_true", help="decode: the default decode again after the other runs")
    p.add_argument("--norms-ab", action="store_true",
                   help="decode: with the RMSNorms fused and not, alternating (hybridmoe.decode_norm)")
    p.add_argument("--gates-ab", action="store_true",
                   help="decode: graphs launched ahead at gates and not, alternating (hybridmoe.graph_gate)")
    p.add_argument("--gates-first", choices=["on", "off"], default="on", help="--gates-ab: which comes first")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--cpu-shares", type=_share, nargs="*", default=[],
                   help="prefill: these shares of each layer's experts on the CPU (settings.cpu_share; 'default': "
                        "the default by format, as users get it), side by side")
    p.add_argument("--amx-threads", type=int, nargs="*", default=[],
                   help="prefill: also these AMX GEMM threads (amx.THREADS; 0: torch's), side by side")
    p.add_argument("--steps", type=int, default=4, help="training steps (0: no training)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--profile", action="store_true", help="train: then one step under torch.profiler (trace to $OUT)")
    p.add_argument("--profile-prefill", action="store_true",
                   help="prefill: then one prompt at each share under torch.profiler (traces to $OUT)")
    p.add_argument("--skip", nargs="*", default=[], choices=["decode", "prefill", "train"])
    p.add_argument("--resident-layers", type=int, nargs="*", default=[],
                   help="decode: also with the first N MoE layers' experts resident on the GPU, for each N given")
    args = p.parse_args()
    model, tok = build(args)
    if "decode" not in args.skip:
        decode(model, tok, args)
    if "prefill" not in args.skip:
        prefill(model, tok, args)
    if args.steps and "train" not in args.skip:
        train(model, args)


if __name__ == "__main__":
    main()
