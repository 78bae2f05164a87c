"""Side-by-side baseline: KTransformers' CPU MoE kernel (kt-kernel, PyPI) vs our CPU experts path, one MoE layer at
DeepSeek-V2-Lite shapes (64 experts, top-6, hidden 2048, moe_intermediate 1408, bf16 weights, random).

    python benchmarks/ktkernel_moe.py [--tokens 1024 4096] [--prefill-tokens 1024] [--layers 8] [--threads 16]
    # smoke test on a small machine (no kt-kernel there):
    python benchmarks/ktkernel_moe.py --tokens 64 --prefill-tokens 64 --decode-calls 3 --layers 1 --hidden 256 --inter 128

Measured (one JSON line each, on stdout; kt-kernel's own C++ logging goes to stderr):
- mode "sft":     forward + backward of one layer with LoRA r=8 (kt: AMXBF16_SFT on gate, up and down; ours: LoRA on
                  gate_up_proj and down_proj), --tokens tokens, random routing over all experts. The base weights are
                  frozen in both, so the backward is dX (+ routing-weight and LoRA grads): ~2x the forward FLOPs.
- mode "decode":  inference, one token per call, --decode-calls calls cycling over --layers distinct layers with fresh
                  random routing each call, so the weights come from RAM (not the 300 MB L3); GB/s of expert weights read
                  (K*3*H*I*bytes per token per layer) against --limit-gbps.
- mode "prefill": inference, --prefill-tokens tokens per call, cycling over the same layers.
kt-kernel inference runs the bf16 kernel (AMXBF16_MOE) and, if the build has it, int8 (AMXInt8_MOE, quantized online from
the same bf16 weights). Each kt-kernel phase starts with a small numerical check against a torch fp32 reference
("check" lines: relative error of output / grad_input), which shows the weights and LoRA are laid out as the kernel reads
them.

Every phase runs in its own subprocess: kt-kernel's worker threads are pinned and spin, so they must not share a process
with our torch threads; and a kt-kernel crash (e.g. SIGILL on a CPU without AVX512/AMX) ends only that phase.

kt-kernel API followed (v0.6.1, github.com/kvcache-ai/ktransformers tag v0.6.1, kt-kernel/; the wheel's python files are
identical to python/ at that tag):
- SFT:       python/sft/amx.py AMXSFTMoEWrapper (load_weights_from_tensors, init_lora_weights) and python/sft/base.py
             BaseSFTMoEWrapper.forward / .backward, used in the order python/sft/wrapper.py uses them.
- inference: bench/bench_bf16_moe.py (MOEConfig + AMXBF16_MOE + load_weights_task + forward_task), with the online
             int8 quantization of python/utils/amx.py AMXMoEWrapper.load_weights_from_tensors (but save=False).
- threads:   python/experts_base.py _MoEBase._get_cpu_infer (WorkerPoolConfig: subpools x threads, NUMA map 0..n-1).

GPU host (offline, Python 3.12, torch 2.11): kt-kernel 0.6.1 requires torch>=2.10,<2.12 but its extension does not link
torch; its runtime imports are torch, numpy, safetensors and gguf (+ pyyaml, via gguf). Install without dependencies:
    pip install --no-index --find-links .wheels --no-deps --target /tmp/pydeps kt-kernel==0.6.1 gguf
    PYTHONPATH=$PWD/src:/tmp/pydeps python benchmarks/ktkernel_moe.py
(add pyyaml to the install line on a host without it). Checked without AMX: the inference path (this script's calls,
layout and reference check, rel. error 0.004) with kt-kernel 0.7.2's AVX2 build, --kt-bf16-class AVX2BF16_MOE --no-int8;
the 0.6.1 wheel is a single AVX512/AMX build (SIGILL at import on an AVX2-only CPU), and the SFT kernels are AMX-only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

import torch

PHASES = ("kt_sft", "kt_infer", "ours")
_OUT = sys.stdout  # JSON lines go here; in kt phases the real stdout, after fd 1 is pointed at stderr


# ----------------------------------------------------------------------------------------------------------------------
# common
# ----------------------------------------------------------------------------------------------------------------------
def machine(args) -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    try:
        numa = len([d for d in os.listdir("/sys/devices/system/node") if d[4:].isdigit() and d.startswith("node")])
    except OSError:
        numa = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "numa_nodes": numa, "threads": args.threads,
            "isa": sorted(f for f in ("amx_bf16", "amx_int8", "amx_tile", "avx512f", "avx512_bf16") if f in flags),
            "torch": torch.__version__, "python": platform.python_version()}


def kt_version() -> str | None:
    try:
        return importlib.metadata.version("kt-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def emit(args, rec: dict) -> None:
    rec = {"bench": "ktkernel_moe", **rec, "experts": args.experts, "topk": args.topk, "hidden": args.hidden,
           "inter": args.inter, "kt_kernel": kt_version(), "machine": machine(args)}
    _OUT.write(json.dumps(rec) + "\n")
    _OUT.flush()


def error(args, impl: str, phase: str, e: BaseException | str) -> None:
    emit(args, {"impl": impl, "mode": phase, "error": e if isinstance(e, str) else f"{type(e).__name__}: {e}"[:500]})


def fwd_flops(args, t: int) -> int:
    return 2 * 3 * args.hidden * args.inter * t * args.topk


def weights(args, layer: int, base: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 expert weights in kt-kernel's layout: gate [E, I, H], up [E, I, H], down [E, H, I] (contiguous).

    Layers > 0 are the layer-0 weights rolled by `layer` columns: the same statistics, distinct memory (what matters
    for the cache), and much cheaper than drawing 0.55 G random numbers per layer."""
    if base is None or layer == 0:
        g = torch.Generator().manual_seed(0)
        e, i, h = args.experts, args.inter, args.hidden
        return tuple((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                     for shape in ((e, i, h), (e, i, h), (e, h, i)))
    return tuple(w.roll(layer, dims=-1).contiguous() for w in base)


def routing(args, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[t, K] distinct experts per token (uniform over all experts) as int64, and positive fp32 weights summing to 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(t, args.experts, generator=g).argsort(dim=-1)[:, : args.topk].contiguous()
    w = torch.rand(t, args.topk, generator=g) + 0.1
    return ids, (w / w.sum(-1, keepdim=True)).contiguous()


def hidden_states(args, t: int, seed: int) -> torch.Tensor:
    return torch.randn(t, args.hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def lora_factors(args, seed: int = 7) -> dict[str, torch.Tensor]:
    """kt-kernel's LoRA layout (python/sft/lora.py _create_fused_expert_lora_buffers): A [E, r, in], B [E, out, r], bf16.
    B is non-zero (a trained adapter), so no LoRA product is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    e, r, h, i = args.experts, args.rank, args.hidden, args.inter
    shapes = {"gate_lora_a": (e, r, h), "gate_lora_b": (e, i, r), "up_lora_a": (e, r, h), "up_lora_b": (e, i, r),
              "down_lora_a": (e, r, i), "down_lora_b": (e, h, r)}
    return {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


def reference(x, ids, w, gate, up, down, lora=None, scale=1.0):
    """fp32 torch reference of one MoE layer: sum_k w[t,k] * down(silu(gate(x)) * up(x)) with optional LoRA on each."""
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float32)
    for e in ids.unique().tolist():
        tok, kpos = torch.where(ids == e)
        xe = x[tok]

        def lin(inp, wt, name, e=e):
            y = inp @ wt[e].float().T
            if lora is not None:
                y = y + scale * (inp @ lora[name + "_lora_a"][e].float().T) @ lora[name + "_lora_b"][e].float().T
            return y

        h = torch.nn.functional.silu(lin(xe, gate, "gate")) * lin(xe, up, "up")
        out = out.index_add(0, tok, lin(h, down, "down") * w[tok, kpos, None])
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item(), 5)


def timed(fn, reps: int) -> list[float]:
    """fn(i) for i = 0 (warm-up: first touch, buffer growth) .. reps; the seconds of calls 1..reps."""
    fn(0)
    out = []
    for i in range(1, reps + 1):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def decode_record(args, s_per_call: float, bytes_per_weight: float) -> dict:
    gb = args.topk * 3 * args.hidden * args.inter * bytes_per_weight / 1e9
    return {"tokens": 1, "ms_per_layer": round(s_per_call * 1e3, 3), "GBps": round(gb / s_per_call, 1),
            "limit_GBps": args.limit_gbps, "pct_of_limit": round(100 * gb / s_per_call / args.limit_gbps, 1),
            "TFLOPs": round(fwd_flops(args, 1) / s_per_call / 1e12, 4), "calls": args.decode_calls,
            "layers": args.layers, "bytes_per_weight": bytes_per_weight}


# ----------------------------------------------------------------------------------------------------------------------
# kt-kernel
# ----------------------------------------------------------------------------------------------------------------------
def kt_import(args):
    import kt_kernel
    from kt_kernel import kt_kernel_ext
    from kt_kernel.experts_base import _MoEBase

    # python/experts_base.py _MoEBase._get_cpu_infer: one CPUInfer per process (a singleton shared with the SFT
    # wrapper), WorkerPoolConfig with `threadpool_count` subpools on NUMA nodes 0..n-1, threads split evenly.
    cpu_infer = _MoEBase._get_cpu_infer(args.threads, args.threadpools)
    return kt_kernel, kt_kernel_ext, cpu_infer


def kt_sft(args) -> None:
    try:
        kt_kernel, _, _ = kt_import(args)
        from kt_kernel.sft.amx import AMXSFTMoEWrapper
    except Exception as e:  # noqa: BLE001
        return error(args, "kt_kernel", "sft", f"import: {type(e).__name__}: {e}")
    base = {"impl": "kt_kernel", "mode": "sft", "method": args.kt_sft_method, "rank": args.rank, "alpha": args.alpha,
            "variant": getattr(kt_kernel, "__cpu_variant__", None), "threadpools": args.threadpools,
            "share_backward_bb": args.kt_share_backward_bb}
    try:
        gate, up, down = weights(args, 0)
        lora = lora_factors(args)
        ref_weights = (gate, up, down) if args.check_tokens else None
        # python/sft/amx.py AMXSFTMoEWrapper.__init__ (the signature KTMoEWrapper(mode="sft") forwards to).
        wrapper = AMXSFTMoEWrapper(
            layer_idx=0, num_experts=args.experts, num_experts_per_tok=args.topk, hidden_size=args.hidden,
            moe_intermediate_size=args.inter, num_gpu_experts=0, cpuinfer_threads=args.threads,
            threadpool_count=args.threadpools, weight_path="", chunked_prefill_size=max(args.tokens + [args.check_tokens]),
            lora_rank=args.rank, lora_alpha=args.alpha, max_cache_depth=1, method=args.kt_sft_method)
        # python/sft/amx.py load_weights reads `getattr(self, "share_backward_bb", False)` into MOESFTConfig;
        # python/sft/wrapper.py sets it before loading (KTConfig default True: backward weights repacked per layer on
        # demand; with one layer the repack is cached after the first backward). False: prepacked at load.
        wrapper.share_backward_bb = args.kt_share_backward_bb
        # Same order as python/sft/wrapper.py: base weights first (gate/up [E, I, H], down [E, H, I] bf16), then the
        # LoRA buffers (python/sft/lora.py), which init_lora_weights pushes to C++ via update_lora_weights().
        wrapper.load_weights_from_tensors(gate.clone(), up.clone(), down.clone(),
                                          torch.arange(args.experts, dtype=torch.int64))
        grads = {"grad_" + k: torch.zeros_like(v) for k, v in lora.items()}
        wrapper.init_lora_weights(**lora, **grads)
    except Exception as e:  # noqa: BLE001
        return error(args, "kt_kernel", "sft", f"setup: {type(e).__name__}: {e}")

    if args.check_tokens:
        try:
            t = args.check_tokens
            x, (ids, w) = hidden_states(args, t, 1), routing(args, t, 1)
            g_out = hidden_states(args, t, 2)
            y = wrapper.forward(x, ids, w, save_for_backward=True)
            gx, gw = wrapper.backward(g_out)
            xr, wr = x.float().requires_grad_(True), w.clone().requires_grad_(True)
            yr = reference(xr, ids, wr, *ref_weights, lora=lora, scale=args.alpha / args.rank)
            gxr, gwr = torch.autograd.grad(yr, (xr, wr), g_out.float())
            emit(args, {**base, "check": True, "tokens": t, "rel_err_out": rel(y, yr), "rel_err_grad_input": rel(gx, gxr),
                        "rel_err_grad_weights": rel(gw, gwr)})
        except Exception as e:  # noqa: BLE001
            error(args, "kt_kernel", "sft check", e)
    del ref_weights

    for t in args.tokens:
        try:
            x, (ids, w), g_out = hidden_states(args, t, 10 + t), routing(args, t, 10 + t), hidden_states(args, t, 20 + t)
            fwd, bwd = [], []

            def step(_, x=x, ids=ids, w=w, g_out=g_out, fwd=fwd, bwd=bwd):
                t0 = time.perf_counter()
                wrapper.forward(x, ids, w, save_for_backward=True)  # python/sft/base.py BaseSFTMoEWrapper.forward
                t1 = time.perf_counter()
                wrapper.backward(g_out)  # -> (grad_input [T, H] bf16, grad_weights [T, K] fp32); LoRA grads in place
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)

            total = timed(step, args.reps)
            fwd, bwd = fwd[1:], bwd[1:]
            s = median(total)
            emit(args, {**base, "tokens": t, "ms_per_layer": round(s * 1e3, 2), "fwd_ms": round(median(fwd) * 1e3, 2),
                        "bwd_ms": round(median(bwd) * 1e3, 2), "TFLOPs": round(2 * fwd_flops(args, t) / s / 1e12, 4),
                        "fwd_TFLOPs": round(fwd_flops(args, t) / median(fwd) / 1e12, 4), "reps": args.reps})
        except Exception as e:  # noqa: BLE001
            error(args, "kt_kernel", f"sft tokens={t}", e)


def kt_infer(args) -> None:
    try:
        kt_kernel, ext, cpu_infer = kt_import(args)
    except Exception as e:  # noqa: BLE001
        return error(args, "kt_kernel", "inference", f"import: {type(e).__name__}: {e}")
    variant = getattr(kt_kernel, "__cpu_variant__", None)
    classes = [("bf16", args.kt_bf16_class, 2.0)]
    if args.int8:
        classes.append(("int8", args.kt_int8_class, 1.0))
    layer_w, base = [], None
    try:
        for li in range(args.layers):
            layer_w.append(weights(args, li, base))
            base = layer_w[0]
    except Exception as e:  # noqa: BLE001
        return error(args, "kt_kernel", "inference", f"weights: {type(e).__name__}: {e}")
    max_len = max(args.prefill_tokens, args.check_tokens, 1)
    p2l = torch.arange(args.experts, dtype=torch.int64)  # physical_to_logical_map: identity
    for dtype, cls_name, bytes_per_weight in classes:
        rec = {"impl": "kt_kernel", "dtype": dtype, "method": cls_name, "variant": variant,
               "threadpools": args.threadpools}
        cls = getattr(ext.moe, cls_name, None)
        if cls is None:
            error(args, "kt_kernel", f"inference {dtype}", f"kt_kernel_ext.moe has no {cls_name} in this build")
            continue
        moes = []
        try:
            for li, (gate, up, down) in enumerate(layer_w):
                # bench/bench_bf16_moe.py: MOEConfig(expert_num, num_experts_per_tok, hidden, intermediate, 0) (the
                # 5th argument binds to num_gpu_experts, ext_bindings.cpp), weights by pointer, pool = CPUInfer.backend_.
                cfg = ext.moe.MOEConfig(args.experts, args.topk, args.hidden, args.inter, 0)
                cfg.layer_idx = li
                cfg.max_len = max_len
                cfg.pool = cpu_infer.backend_
                cfg.gate_proj, cfg.up_proj, cfg.down_proj = gate.data_ptr(), up.data_ptr(), down.data_ptr()
                # save/load False (defaults): AMXBF16 copies the bf16 weights (operators/amx/bf16-moe.hpp
                # TP_MOE<AMX_BF16_MOE_TP>::load_weights); AMXInt8 quantizes them online, in memory
                # (operators/amx/moe.hpp AMX_MOE_TP::load_weights "online quant from bf16"), writing nothing to disk.
                moe = cls(cfg)
                cpu_infer.submit(moe.load_weights_task(p2l.data_ptr()))
                cpu_infer.sync()
                moes.append(moe)
        except Exception as e:  # noqa: BLE001
            error(args, "kt_kernel", f"inference {dtype}", f"load: {type(e).__name__}: {e}")
            continue

        def run(moe, qlen_t, k, ids, w, x, y):
            # python/experts_base.py BaseMoEWrapper.submit_forward / bench_bf16_moe.py: forward_task(qlen int32 ptr,
            # k, expert_ids int64 [T, K], weights fp32 [T, K], input bf16 [T, H], output bf16 [T, H], incremental).
            cpu_infer.submit(moe.forward_task(qlen_t.data_ptr(), k, ids.data_ptr(), w.data_ptr(), x.data_ptr(),
                                              y.data_ptr(), False))
            cpu_infer.sync()

        if args.check_tokens:
            try:
                t = args.check_tokens
                x, (ids, w) = hidden_states(args, t, 1), routing(args, t, 1)
                y = torch.empty_like(x)
                run(moes[0], torch.tensor([t], dtype=torch.int32), args.topk, ids, w, x, y)
                emit(args, {**rec, "mode": "check", "check": True, "tokens": t,
                            "rel_err_out": rel(y, reference(x.float(), ids, w, *layer_w[0]))})
            except Exception as e:  # noqa: BLE001
                error(args, "kt_kernel", f"check {dtype}", e)

        try:  # decode: one token per call, random routing per call, cycling over the layers
            n, L = args.decode_calls, len(moes)
            ids = torch.stack([routing(args, 1, 1000 + i)[0] for i in range(n)])  # [n, 1, K]
            w = torch.stack([routing(args, 1, 1000 + i)[1] for i in range(n)])
            x = torch.stack([hidden_states(args, 1, 3000 + li) for li in range(L)])  # [L, 1, H]
            y = torch.empty_like(x)
            one = torch.tensor([1], dtype=torch.int32)
            for li in range(L):  # warm-up: every layer once
                run(moes[li], one, args.topk, ids[li % n], w[li % n], x[li], y[li])
            t0 = time.perf_counter()
            for i in range(n):
                run(moes[i % L], one, args.topk, ids[i], w[i], x[i % L], y[i % L])
            s = (time.perf_counter() - t0) / n
            emit(args, {**rec, "mode": "decode", **decode_record(args, s, bytes_per_weight)})
        except Exception as e:  # noqa: BLE001
            error(args, "kt_kernel", f"decode {dtype}", e)

        try:  # prefill: --prefill-tokens per call
            t, L = args.prefill_tokens, len(moes)
            x, (ids, w) = hidden_states(args, t, 5), routing(args, t, 5)
            y = torch.empty_like(x)
            qlen = torch.tensor([t], dtype=torch.int32)
            times = timed(lambda i, moes=moes, L=L, qlen=qlen, ids=ids, w=w, x=x, y=y:
                          run(moes[i % L], qlen, args.topk, ids, w, x, y), max(args.reps, L))
            s = median(times)
            emit(args, {**rec, "mode": "prefill", "tokens": t, "ms_per_layer": round(s * 1e3, 2),
                        "TFLOPs": round(fwd_flops(args, t) / s / 1e12, 4), "reps": len(times)})
        except Exception as e:  # noqa: BLE001
            error(args, "kt_kernel", f"prefill {dtype}", e)
        moes = None  # free this kernel's weight copies before the next


# ----------------------------------------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------------------------------------
def ours_module(args, gate, up, down, lora: dict | None):
    from torch import nn

    from hybridmoe.experts import ExpertsSpec, HybridExperts

    m = HybridExperts(ExpertsSpec(args.experts, args.hidden, args.inter), nn.SiLU(), torch.bfloat16)
    m.weights.gate_up[:, : args.inter].copy_(gate)  # transformers' fused layout: rows [:I] gate, [I:] up
    m.weights.gate_up[:, args.inter :].copy_(up)
    m.weights.down.copy_(down)
    for v in m.weights.loaded.values():
        v.fill_(True)
    if lora is not None:
        # The same rank on the fused gate_up (one A for gate and up, as PEFT's target_parameters does) and on down.
        for proj, a, b in (("gate_up_proj", lora["gate_lora_a"], torch.cat([lora["gate_lora_b"], lora["up_lora_b"]], 1)),
                           ("down_proj", lora["down_lora_a"], lora["down_lora_b"])):
            lo = m.add_lora(proj, rank=args.rank, alpha=args.alpha)
            lo.A.copy_(a)
            lo.B.copy_(b)
            lo.requires_grad_(True)
    return m


def ours(args) -> None:
    torch.set_num_threads(args.threads)
    rec = {"impl": "hybridmoe", "dtype": "bf16", "torch_threads": torch.get_num_threads()}
    try:
        gate, up, down = weights(args, 0)
        m = ours_module(args, gate, up, down, lora_factors(args))
    except Exception as e:  # noqa: BLE001
        return error(args, "hybridmoe", "sft", f"setup: {type(e).__name__}: {e}")
    for t in args.tokens:
        try:
            x, (ids, w), g_out = hidden_states(args, t, 10 + t), routing(args, t, 10 + t), hidden_states(args, t, 20 + t)
            x.requires_grad_(True)
            w.requires_grad_(True)
            fwd, bwd = [], []

            def step(_, x=x, ids=ids, w=w, g_out=g_out, fwd=fwd, bwd=bwd, m=m):
                for p in [x, w, *m.lora_tensors()]:
                    p.grad = None
                t0 = time.perf_counter()
                y = m(x, ids, w)
                t1 = time.perf_counter()
                y.backward(g_out)
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)

            total = timed(step, args.reps)
            fwd, bwd = fwd[1:], bwd[1:]
            s = median(total)
            emit(args, {**rec, "mode": "sft", "rank": args.rank, "alpha": args.alpha, "tokens": t,
                        "ms_per_layer": round(s * 1e3, 2), "fwd_ms": round(median(fwd) * 1e3, 2),
                        "bwd_ms": round(median(bwd) * 1e3, 2), "TFLOPs": round(2 * fwd_flops(args, t) / s / 1e12, 4),
                        "fwd_TFLOPs": round(fwd_flops(args, t) / median(fwd) / 1e12, 4), "reps": args.reps})
        except Exception as e:  # noqa: BLE001
            error(args, "hybridmoe", f"sft tokens={t}", e)
    m = None

    try:  # inference: no LoRA (kt-kernel's inference kernels have none), --layers distinct layers
        base, mods = (gate, up, down), []
        for li in range(args.layers):
            mods.append(ours_module(args, *(base if li == 0 else weights(args, li, base)), None))
        del base, gate, up, down
    except Exception as e:  # noqa: BLE001
        return error(args, "hybridmoe", "inference", f"setup: {type(e).__name__}: {e}")
    L = len(mods)
    with torch.inference_mode():
        try:
            n = args.decode_calls
            routes = [routing(args, 1, 1000 + i) for i in range(n)]
            xs = [hidden_states(args, 1, 3000 + li) for li in range(L)]
            for li in range(L):
                mods[li](xs[li], *routes[li % n])
            t0 = time.perf_counter()
            for i in range(n):
                mods[i % L](xs[i % L], *routes[i])
            s = (time.perf_counter() - t0) / n
            emit(args, {**rec, "mode": "decode", **decode_record(args, s, 2.0)})
        except Exception as e:  # noqa: BLE001
            error(args, "hybridmoe", "decode", e)
        try:
            t = args.prefill_tokens
            x, (ids, w) = hidden_states(args, t, 5), routing(args, t, 5)
            times = timed(lambda i: mods[i % L](x, ids, w), max(args.reps, L))
            s = median(times)
            emit(args, {**rec, "mode": "prefill", "tokens": t, "ms_per_layer": round(s * 1e3, 2),
                        "TFLOPs": round(fwd_flops(args, t) / s / 1e12, 4), "reps": len(times)})
        except Exception as e:  # noqa: BLE001
            error(args, "hybridmoe", "prefill", e)


# ----------------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------------
def run_phase(args, phase: str) -> None:
    """Run one phase in a child process; forward its JSON lines; report a crash or a timeout as a JSON error line."""
    impl = "hybridmoe" if phase == "ours" else "kt_kernel"
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--phase", phase]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # stderr: inherited (kt-kernel's logging)

    def forward():
        for line in proc.stdout:
            print(line, end="", flush=True)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=args.phase_timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(timeout=10)
        return error(args, impl, phase, f"{phase} subprocess timed out after {args.phase_timeout:.0f}s")
    reader.join()
    if rc != 0:
        why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        hint = " (the CPU lacks an instruction the kt-kernel build needs, e.g. AVX512/AMX)" if rc == -signal.SIGILL else ""
        error(args, impl, phase, f"{phase} subprocess {why}{hint}; see stderr")


def main() -> None:
    global _OUT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="SFT token counts")
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--decode-calls", type=int, default=400)
    p.add_argument("--layers", type=int, default=8, help="distinct layers cycled by the inference measurements")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--threadpools", type=int, default=1, help="kt-kernel NUMA subpools (threads split over them)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (median reported)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--limit-gbps", type=float, default=100.0, help="the host's memory bandwidth, for decode")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens of the kt-kernel accuracy check (0: skip)")
    p.add_argument("--kt-sft-method", default="AMXBF16_SFT", help="AMXBF16_SFT, AMXINT8_SFT, ...")
    p.add_argument("--kt-share-backward-bb", action="store_true",
                   help="kt-kernel SFT: repack backward weights on demand (training default) instead of at load")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip kt-kernel's int8 inference")
    p.add_argument("--kt-bf16-class", default="AMXBF16_MOE", help="kt_kernel_ext.moe class (AVX2BF16_MOE: no AMX)")
    p.add_argument("--kt-int8-class", default="AMXInt8_MOE")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--phase-timeout", type=float, default=400.0, help="seconds per phase (subprocess)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.phase is None:
        kt_phases = [ph for ph in args.phases if ph != "ours"]
        if kt_phases and importlib.util.find_spec("kt_kernel") is None:
            emit(args, {"bench": "ktkernel", "impl": "kt_kernel",
                        "error": "kt_kernel not installed: pip install --no-index --find-links .wheels --no-deps "
                                 "--target /tmp/pydeps kt-kernel==0.6.1 gguf; PYTHONPATH=...:/tmp/pydeps"})
            kt_phases = []
        for ph in args.phases:
            if ph == "ours" or ph in kt_phases:
                run_phase(args, ph)
        return

    if args.phase == "ours":
        return ours(args)
    # kt phases: JSON to the real stdout; fd 1 (kt-kernel's C++ printf) to stderr.
    _OUT = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    torch.set_num_threads(args.threads)  # only for drawing the random weights; kt-kernel has its own pool
    (kt_sft if args.phase == "kt_sft" else kt_infer)(args)


if __name__ == "__main__":
    main()
