"""`hybridmoe` command line. Logs and progress go to stderr, results to stdout.

A user error (HybridMoEError) prints one line `hybridmoe: error: ...` on stderr and exits 2 (1 for `inspect`
finding non-finite tensors), with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _cmd_train(args) -> int:
    if args.nproc != 1:
        return _launch_ranks(args)
    from .training import train

    train(args.config, args.overrides)
    return 0


def _launch_ranks(args) -> int:
    """`train --nproc N`: torchrun on this host (the same launcher, in this process), each rank running `hybridmoe
    train` with the same arguments. For several hosts, run torchrun yourself (see the README)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .config import load_config
    from .distributed import launched_by_torchrun
    from .errors import ConfigError

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if launched_by_torchrun():
        raise ConfigError("--nproc given inside a torchrun job; drop --nproc (torchrun already started the ranks)")
    load_config(args.config, args.overrides)  # a bad config is reported once here, not once per rank
    # torchrun would set 1 thread per rank; the routed experts run on the CPU, so share the cores out instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    argv = ["--standalone", f"--nproc-per-node={args.nproc}", "-m", "hybridmoe"]
    argv += (["--verbose"] if args.verbose else []) + ["train", args.config, *args.overrides]
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        print(f"hybridmoe: error: training stopped: rank {rank} exited with code {code} (its error is above); "
              "the other ranks were stopped", file=sys.stderr)
        return code if 0 < code < 128 else 1
    except SignalException:  # Ctrl-C: torchrun passed it on; the ranks saved a checkpoint if they could
        print("hybridmoe: interrupted", file=sys.stderr)
        return 130
    return 0


def _cmd_info(args) -> int:
    from .adapters import load_adapter
    from .loading import load_model
    from .placement import format_report, placement_report

    model = load_model(args.model, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                       progress=not args.json)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    rep = placement_report(model)
    if args.adapter:
        rep["adapter"] = _adapter_summary(model, args.adapter)
    text = format_report(rep)
    if args.adapter:
        a = rep["adapter"]
        text += (f"\nadapter: {a['path']} ({a['format']} layout); routed-expert LoRA on MoE layers "
                 f"{a['routed_expert_layers'] or 'none'}")
    print(json.dumps(rep, indent=2) if args.json else text)
    return 0 if rep["ok"] else 1


def _adapter_summary(model, adapter_dir: str) -> dict:
    """Which layout the adapter came in and which MoE layers got routed-expert LoRA from it (a KT bundle's come
    from fused_expert_lora.safetensors; seeing them here shows they were not dropped)."""
    from .adapter_convert import layout_of
    from .adapters import base_model_of
    from .experts import HybridExperts
    from .kt_bundle import layer_of

    layers = sorted(layer_of(name) for name, ex in base_model_of(model).named_modules()
                    if isinstance(ex, HybridExperts) and ex.lora and layer_of(name) is not None)
    layout = layout_of(adapter_dir)
    fmt = "kt-bundle" if layout == "kt" else layout
    return {"path": str(adapter_dir), "format": fmt, "routed_expert_layers": layers}


def _cmd_inspect(args) -> int:
    from .inspect import run_inspect

    return run_inspect(args.adapter_dir, args.json)


def _cmd_chat(args) -> int:
    from .chat import run_chat

    return run_chat(args)


def _cmd_export(args) -> int:
    from .export import export_merged

    print(export_merged(args.model, args.adapter, args.output, overwrite=args.overwrite, dtype=args.dtype))
    return 0


def _cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    print(convert_checkpoint(args.model, args.output, args.expert_dtype, overwrite=args.overwrite,
                             max_shard_size=int(args.max_shard_size * (1 << 30))))
    return 0


def _cmd_serve(args) -> int:
    from .errors import HybridMoEError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise HybridMoEError(f"`hybridmoe serve` needs the serve extra ({e.name} is missing); "
                             "pip install 'hybridmoe[serve]'") from None
    from .serve.server import run_serve

    return run_serve(args)


def _cmd_adapter_convert(args) -> int:
    from .adapter_convert import convert

    print(convert(args.input, args.to, args.output, force=args.force, model=args.model))
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def _cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(args.output, fast=args.fast)


def _add_expert_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-dtype", choices=["bfloat16", "float32", "int8", "int4"], default=None,
                   help="routed-expert weights in CPU RAM (default: --dtype; MXFP4 checkpoints stay MXFP4, FP8 ones "
                        "become int8); int8 quantizes them per output row as they load (half the memory of bf16), "
                        "int4 group-wise (a quarter); README 'Accuracy of compact experts' states the cost")


def _add_stream_slots(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream-slots", type=int, default=2,
                        help="layers of expert weights the GPU keeps for long prompts (>= 2; each is one layer's "
                             "experts, 1.03 GiB for DeepSeek-V2-Lite; the first slots-2 layers stay on the GPU "
                             "between prompts, so more slots = faster prefill)")
    parser.add_argument("--stream-cpu-share", type=float, default=None, metavar="FRACTION",
                        help="share of each layer's experts the CPU computes while the others stream to the GPU, in "
                             "long prompts (0..1; default by expert format; 0 = the GPU computes them all)")
    parser.add_argument("--resident-expert-layers", type=int, default=0, metavar="N",
                        help="keep the first N MoE layers' routed experts on the GPU and compute them there for every "
                             "batch, decode included (N layers of expert weights of GPU memory; `hybridmoe info` "
                             "prints one layer's size)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hybridmoe",
        description="LoRA fine-tuning and chat for MoE LLMs whose routed experts live in CPU RAM and run on the CPU.",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="LoRA SFT from a YAML config", description="LoRA SFT: hybridmoe train CONFIG.yaml [key=value ...]")
    t.add_argument("config", help="YAML config (LLaMA-Factory key names)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=10")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel ranks on this host (one per GPU; launches torchrun for you)")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("chat", help="chat with a model (+ adapter)", description="Interactive chat, or one reply with --prompt.")
    c.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                   help="with --prompt: print prefill and decode tokens/s on stderr (and debug logging)")
    c.add_argument("--model", required=True, help="checkpoint directory")
    c.add_argument("--adapter", help="PEFT adapter directory")
    c.add_argument("--prompt", help="one user message; print only the reply")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--device", choices=["cuda", "cpu"], default=None)
    c.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    _add_expert_dtype(c)
    c.add_argument("--chat-template", help="Jinja chat template (file or string) for tokenizers without one")
    c.add_argument("--merge", action="store_true", help="fold the adapter into the weights at load time")
    c.add_argument("--stream-min-tokens", type=int, default=None,
                   help="prompts of at least this many tokens run the experts on the GPU, weights streamed in "
                        "(default 64 on CUDA; 0 = always on the CPU)")
    _add_stream_slots(c)
    c.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decode without CUDA graphs (default on CUDA: each decode step replays graphs cut at the "
                        "CPU experts)")
    c.add_argument("--compile-decode", action="store_true", default=None,
                   help="torch.compile the GPU work between the CPU experts of each decode step (CUDA: fewer, fused "
                        "kernels; the first reply compiles, ~12 s for V2-Lite; default: $HYBRIDMOE_COMPILE_DECODE)")
    c.set_defaults(func=_cmd_chat)

    i = sub.add_parser("inspect", help="adapter health by component", description="Adapter health by component; exit 1 on NaN/Inf.")
    i.add_argument("adapter_dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)

    f = sub.add_parser("info", help="placement report", description="Where each module lives, and the placement checks.")
    f.add_argument("--model", required=True)
    f.add_argument("--adapter")
    f.add_argument("--device", choices=["cuda", "cpu"], default=None)
    f.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    _add_expert_dtype(f)
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_cmd_info)

    e = sub.add_parser("export", help="merge an adapter into the base checkpoint (its own layout and format)",
                       description="Merge an adapter into the base checkpoint's own layout and format, shard by shard "
                                   "(quantized bases: the touched weights re-quantized), or with --dtype into a plain "
                                   "checkpoint.")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter", required=True)
    e.add_argument("--output", required=True)
    e.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output folder that is not a previous export")
    e.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="write a plain checkpoint in this dtype: quantized weights (FP8, MXFP4, compressed-tensors) "
                        "dequantized, their scales and the quantization_config dropped (default: the base's own "
                        "format and dtypes; quantized weights the adapter touches are re-quantized)")
    e.set_defaults(func=_cmd_export)

    cv = sub.add_parser("convert", help="write a checkpoint with int4/int8 routed experts (loads without re-quantizing)",
                        description="Read any checkpoint hybridmoe loads (bf16/fp32, FP8, MXFP4, compressed-tensors) and "
                                    "write it with the routed experts as compressed-tensors int4 (pack-quantized) or "
                                    "int8 (int-quantized), everything else float, shard by shard.")
    cv.add_argument("--model", required=True, help="checkpoint directory")
    cv.add_argument("--expert-dtype", required=True, choices=["int4", "int8"])
    cv.add_argument("--output", required=True, help="new checkpoint directory (written atomically)")
    cv.add_argument("--max-shard-size", type=float, default=4.0, help="GiB of tensors per output shard (default 4)")
    cv.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    cv.set_defaults(func=_cmd_convert)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (several adapters, batched decode)",
                       description="Serve the OpenAI API (POST /v1/chat/completions, /v1/completions, GET /v1/models) "
                                   "plus vLLM's /tokenize, /detokenize and runtime LoRA routes, GET /metrics and "
                                   "GET /health, for the base model and any number of adapters, switched per request.")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="PEFT adapter served as model NAME (repeatable; DIR alone is named after its folder)")
    s.add_argument("--model-name", help="the model name that selects the base model (default: the folder's name)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $HYBRIDMOE_API_KEY, if set)")
    s.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together at most")
    s.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="padded prompt tokens (requests x longest prompt) prefilled together at most")
    s.add_argument("--prefill-chunk-tokens", type=int, default=2048,
                   help="padded prompt tokens per prefill forward; a longer prefill is chunked, with decode steps of "
                        "the running requests in between")
    s.add_argument("--max-loras", type=int, default=8, help="adapters loaded at once at most (--adapter included)")
    s.add_argument("--allow-runtime-lora", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default)")
    s.add_argument("--lora-root", help="the directory runtime adapters must be under (needed with --allow-runtime-lora)")
    s.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                   help="request bodies above this get HTTP 413 (default 4 MiB)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take before it fails with HTTP 504 (0 = no limit)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM, seconds running streams get to finish before they are cancelled")
    s.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between throughput log lines (0 = off)")
    s.add_argument("--device", choices=["cuda", "cpu"], default=None)
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    _add_expert_dtype(s)
    _add_stream_slots(s)
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="decode every step eagerly over the padded batch (default on CUDA: CUDA graphs, a lone request "
                        "through chat's decoder, several through the batch decoder)")
    s.add_argument("--compile-decode", action="store_true", default=None,
                   help="torch.compile the GPU work between the CPU experts of a lone request's decode steps (CUDA; "
                        "compiled during warm-up, ~12 s for V2-Lite; default: $HYBRIDMOE_COMPILE_DECODE)")
    s.add_argument("--chat-template", help="Jinja chat template (file or string) for tokenizers without one")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (access log at info)")
    s.set_defaults(func=_cmd_serve)

    a = sub.add_parser("adapter", help="adapter tools (convert between layouts)",
                       description="Adapter tools that need no model.")
    a_sub = a.add_subparsers(dest="adapter_command", required=True)
    ac = a_sub.add_parser(
        "convert", help="convert an adapter between the PEFT, per-expert and KTransformers layouts",
        description="Convert a LoRA adapter between layouts, exactly: peft (PEFT target_parameters on fused experts, "
                    "transformers v5), per-expert (experts.{e}.gate_proj...: vLLM/SGLang, PEFT on transformers v4), "
                    "kt (a KTransformers bundle: fused_expert_lora.safetensors + kt_adapter_manifest.json).")
    ac.add_argument("input", help="adapter directory in any of the three layouts")
    ac.add_argument("--to", required=True, choices=["peft", "per-expert", "kt"], help="layout to write")
    ac.add_argument("--output", required=True, help="new adapter directory (written atomically)")
    ac.add_argument("--force", action="store_true", help="replace --output if it exists")
    ac.add_argument("--model", help="base checkpoint (optional): check the result against it, and name a KT "
                                    "bundle's experts by the model's modules")
    ac.set_defaults(func=_cmd_adapter_convert)

    v = sub.add_parser("eval", help="loss and perplexity of a model (+ adapter) on a dataset",
                       description="Mean cross-entropy over the assistant tokens of a dataset, and its perplexity; "
                                   "printed, and written as JSON to --output.")
    v.add_argument("--model", required=True, help="checkpoint directory")
    v.add_argument("--adapter", help="PEFT adapter directory")
    v.add_argument("--dataset", required=True,
                   help="comma list of dataset_info.json names or .json/.jsonl files (as the training key)")
    v.add_argument("--dataset-dir", default="data", help="folder with dataset_info.json (default: data)")
    v.add_argument("--template", help="LLaMA-Factory template name (checked against the tokenizer's template)")
    v.add_argument("--chat-template", help="Jinja chat template (file or string) for tokenizers without one")
    v.add_argument("--cutoff-len", type=int, default=2048, help="tokens per example (longer ones are truncated)")
    v.add_argument("--max-samples", type=int, default=None, help="first N records of each dataset")
    v.add_argument("--batch-size", type=int, default=1)
    v.add_argument("--device", choices=["cuda", "cpu"], default=None)
    v.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    _add_expert_dtype(v)
    v.add_argument("--output", default="eval_results.json", help="JSON results file (default: eval_results.json)")
    v.set_defaults(func=_cmd_eval)

    q = sub.add_parser("quickstart", help="offline demo: build, fine-tune and chat with a small MoE", description="Offline end-to-end demo on any machine.")
    q.add_argument("--output", default="hybridmoe_quickstart", help="work directory (cached between runs)")
    q.add_argument("--fast", action="store_true", help="a smaller, quicker run (used by the tests)")
    q.set_defaults(func=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import HybridMoEError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="[hybridmoe] %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    try:
        return args.func(args)
    except HybridMoEError as e:
        print(f"hybridmoe: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybridmoe: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a filesystem fault no inner layer put into words (e.g. a path removed while in use)
        from .io import fs_error

        print(f"hybridmoe: error: {_rank_prefix()}{fs_error(e, 'cannot access', '?')}", file=sys.stderr)
        return 2
    except _oom_types():  # outside a step or a reply (those raise GPUOutOfMemoryError): loading the model
        print(f"hybridmoe: error: {_rank_prefix()}{_load_oom_line()}", file=sys.stderr)
        return 2


def _rank_prefix() -> str:
    """Under torchrun several ranks may report; say which one did."""
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _load_oom_line() -> str:
    import torch

    from .memory import GiB, card_usage

    card, used = card_usage(torch.device("cuda", torch.cuda.current_device()))
    return (f"GPU out of memory while loading the model ({card / GiB:.1f} GiB card, {used / GiB:.1f} GiB in use): "
            "its GPU-side weights (everything but the routed experts) do not fit next to what already uses the card; "
            "free the card (nvidia-smi shows who holds it), use dtype=bfloat16, or a card with more memory")


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")


if __name__ == "__main__":
    sys.exit(main())
