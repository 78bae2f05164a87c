"""Load test of `hybridmoe serve` on loopback: N concurrent clients x M requests each, official openai client.

    python benchmarks/serve_load.py                                  # tiny random DeepSeek-V2, CPU, 16 x 20
    python benchmarks/serve_load.py --max-batch-size 1               # the same load without batching (baseline)
    python benchmarks/serve_load.py --threads 1                      # 2-core CI machine: leave a core to HTTP
    python benchmarks/serve_load.py --model DIR --device cuda --dtype bfloat16 --max-tokens 64   # a real checkpoint
    # issue 18's load table: 16 streaming clients x 128 tokens, half with an adapter, then 1 client, then `chat`
    python benchmarks/serve_load.py --model DIR --adapter a=ADAPTER --device cuda --dtype bfloat16 --issue-table
    # the same against `hybridmoe serve` started as users start it (a process of its own), and `hybridmoe chat -v`
    python benchmarks/serve_load.py --model DIR --device cuda --dtype bfloat16 --issue-table --serve-cli

Starts the real server (uvicorn, in this process, on 127.0.0.1 and a free port), runs the clients in a child process
with `openai.AsyncOpenAI` (greedy, a mix of the base model and two adapters, half the requests streamed), and prints one
JSON line: requests/s, generated tokens/s, latency percentiles, errors, and the engine's decode-batch statistics.
Without --model it builds a tiny random model and two random adapters in a temp dir (no downloads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def _tiny_setup(root: Path) -> tuple[Path, dict[str, str]]:
    import hybridmoe
    from hybridmoe.adapters import apply_lora, save_adapter
    from hybridmoe.testing import build_tokenizer, save_tiny_model

    tok = build_tokenizer()
    ckpt = root / "tiny-deepseek-v2"
    save_tiny_model("deepseek_v2", ckpt, tokenizer=tok, vocab_size=len(tok))
    adapters = {}
    for name, target, seed in [("alpha", "all", 1), ("beta", "q_proj,kv_b_proj,experts", 2)]:
        model, _ = hybridmoe.load(ckpt, device="cpu", progress=False)
        peft_model = apply_lora(model, target, rank=4, alpha=8, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # LoRA B starts at 0: make the adapters change the outputs
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        save_adapter(peft_model, root / name)
        adapters[name] = str(root / name)
    return ckpt, adapters


async def _drive(url: str, models: list[str], clients: int, requests: int, max_tokens: int,
                 stream_all: bool = False, ignore_eos: bool = False, token_timing: bool = False) -> dict:
    """``clients`` concurrent clients, ``requests`` each one after another; client c asks ``models[c % len]``.

    Streamed requests measure time to first token (first content chunk) and inter-token latency (the mean gap
    between tokens of one request: (last chunk - first chunk) / (tokens - 1)); percentiles are over requests.
    ``token_timing``: the requests ask for logprobs, so every token arrives in a chunk even while its text is held
    back (random weights make incomplete UTF-8 and hold text back for long stretches); TTFT and ITL then count tokens,
    at the price of each row's logprob in the server's step.
    """
    import openai

    prompts = ["Hi!", "What is the capital of France?", "Write a poem about the sea.", "How are you today?"]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    latencies: list[float] = []
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = errors = 0

    async def one(model: str, prompt: str, stream: bool) -> None:
        nonlocal tokens, errors
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens)
        if ignore_eos:
            kw["extra_body"] = {"ignore_eos": True}
        if token_timing:
            kw.update(logprobs=True, top_logprobs=0)
        t0 = time.perf_counter()
        try:
            n = 0  # (not `tokens += await ...`: that reads `tokens` before the await and loses updates)
            if stream:
                first = last = None
                async for c in await client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                                    **kw):
                    if c.choices and (c.choices[0].delta.content or (token_timing and c.choices[0].logprobs)):
                        last = time.perf_counter()
                        first = first or last
                    if c.usage is not None:
                        n = c.usage.completion_tokens
                if first is not None:
                    ttfts.append(first - t0)
                    if n > 1 and last > first:
                        itls.append((last - first) / (n - 1))
            else:
                n = (await client.chat.completions.create(**kw)).usage.completion_tokens
            tokens += n
        except openai.APIError:
            errors += 1
        latencies.append(time.perf_counter() - t0)

    async def worker(c: int) -> None:
        for i in range(requests):
            await one(models[c % len(models)], prompts[(c + i) % len(prompts)],
                      stream=stream_all or (c + i) % 2 == 1)

    t0 = time.perf_counter()
    async with client:
        await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - t0

    def pct(xs: list[float], q: int) -> float | None:
        return round(statistics.quantiles(xs, n=100)[q - 1], 4) if len(xs) > 1 else (round(xs[0], 4) if xs else None)

    return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "completion_tokens": tokens,
            "completion_tokens_per_s": round(tokens / wall, 1), "latency_p50_s": pct(latencies, 50),
            "latency_p95_s": pct(latencies, 95), "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95),
            "itl_p50_s": pct(itls, 50), "itl_p95_s": pct(itls, 95)}


def _drive_child(queue, *args, **kwargs) -> None:
    queue.put(asyncio.run(_drive(*args, **kwargs)))


def drive(*args, **kwargs) -> dict:
    """:func:`_drive` in a child process: the clients' own Python work (SSE parsing, the openai client) must not
    compete with the server's engine thread for this process's GIL, as real clients on other machines do not."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_drive_child, args=(queue, *args), kwargs=kwargs)
    proc.start()
    try:
        return queue.get()
    finally:
        proc.join()


def _chat_decode_baseline(app, max_tokens: int) -> float:
    """Single-user decode tokens/s of `hybridmoe chat`'s path (`generate`, static cache and CUDA graphs where chat
    uses them) on the server's own model with the base model active: the 1-client target's reference."""
    from hybridmoe.chat import render_prompt
    from hybridmoe.generation import SamplingConfig, generate

    engine = app.state.engine
    engine.adapters.activate(None)
    ids = render_prompt(engine.tokenizer, [{"role": "user", "content": "Write a poem about the sea."}])
    best = 0.0
    for _ in range(2):  # the first run warms up (graph capture, kernel build)
        res = generate(engine.adapters.model, engine.tokenizer, ids, SamplingConfig(temperature=0,
                                                                                   max_new_tokens=max_tokens))
        best = max(best, res.decode_tokens_per_s)
    return round(best, 1)


def _model_flags(args) -> list[str]:
    """The model flags `hybridmoe serve` and `hybridmoe chat` share, from this script's."""
    flags = ["--resident-expert-layers", str(args.resident_expert_layers)]
    for name in ("device", "dtype", "expert_dtype"):
        if getattr(args, name):
            flags += [f"--{name.replace('_', '-')}", getattr(args, name)]
    return flags


@contextmanager
def _cli_server(args, ckpt: Path, adapters: dict[str, str], log: Path):
    """`hybridmoe serve` in a process of its own on a free loopback port; yields its URL once /health answers, and
    stops it with SIGINT (a graceful shutdown) on exit."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hybridmoe", "serve", "--model", str(ckpt), "--model-name", "base",
           "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--max-prefill-tokens", str(args.max_prefill_tokens), "--prefill-chunk-tokens",
           str(args.prefill_chunk_tokens), "--log-stats-interval", "0", *_model_flags(args)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"`hybridmoe serve` exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"`hybridmoe serve` did not answer /health in 900 s; see {log}")
                time.sleep(1)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cli_chat_decode(args, ckpt: Path, max_tokens: int) -> float | None:
    """`hybridmoe chat --prompt ... -v` as users run it: the decode tokens/s it prints (its one reply)."""
    cmd = [sys.executable, "-m", "hybridmoe", "chat", "--model", str(ckpt), "--prompt", "Write a poem about the sea.",
           "--temperature", "0", "--max-new-tokens", str(max_tokens), "-v", *_model_flags(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    m = re.search(r"decode ([0-9.]+) tok/s", res.stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random DeepSeek-V2 in a temp dir)")
    ap.add_argument("--adapter", action="append", metavar="NAME=DIR", help="adapters to serve and mix in")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--prefill-chunk-tokens", type=int, default=2048)
    ap.add_argument("--expert-dtype", choices=["bfloat16", "float32", "int8", "int4"], default=None)
    ap.add_argument("--resident-expert-layers", type=int, default=0,
                    help="the first N MoE layers' experts stay on the GPU (serve --resident-expert-layers)")
    ap.add_argument("--issue-table", action="store_true",
                    help="16 clients x 1 streamed request x 128 tokens (ignore_eos), half on the first adapter; then 1 "
                         "client alone; then single-user chat decode on the same model (clients/requests/max-tokens "
                         "flags set the first run)")
    ap.add_argument("--serve-cli", action="store_true",
                    help="start `hybridmoe serve` as a process of its own (as users do) instead of in this process; "
                         "the chat baseline is then `hybridmoe chat -v`")
    ap.add_argument("--token-timing", action="store_true",
                    help="ask for logprobs so TTFT/ITL count tokens, not text (random weights hold text back)")
    ap.add_argument("--decode-gpu-share", type=float, default=None,
                    help="in-process only: the share of a decode step's picked experts computed on the GPU "
                         "(model.hybridmoe.settings.gpu_share; default: by weight dtype, 1/3 for bf16; 0: all on the CPU)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in the server's process (seconds; Python's default 0.005): how much "
                         "of a step is the engine thread waiting for the GIL held by the HTTP thread")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.issue_table:
        args.clients, args.requests, args.max_tokens = 16, 1, 128
    if args.threads:
        torch.set_num_threads(args.threads)

    from hybridmoe.serve import build_app, serve_in_thread
    from hybridmoe.serve.server import parse_adapters

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            ckpt, adapters = Path(args.model), parse_adapters(args.adapter, Path(args.model).resolve().name)
        else:
            ckpt, adapters = _tiny_setup(Path(tmp))
        models = ["base", *list(adapters)[:1]] if args.issue_table else ["base", *adapters]
        extra = {}

        def load(url: str) -> dict:
            out = drive(url, models, args.clients, args.requests, args.max_tokens, stream_all=args.issue_table,
                        ignore_eos=args.issue_table, token_timing=args.token_timing)
            if args.issue_table:
                extra["one_client"] = drive(url, ["base"], 1, 3, args.max_tokens, stream_all=True,
                                            ignore_eos=True, token_timing=args.token_timing)
            return out

        if args.serve_cli:
            import httpx

            with _cli_server(args, ckpt, adapters, Path(tmp) / "serve.log") as url:
                result = load(url)
                health = httpx.get(url + "/health", timeout=30).json()
            stats = {k: round(v, 2) for k, v in health.items() if k not in ("status", "running", "waiting")}
            if args.issue_table:
                extra["chat_decode_tokens_per_s"] = _cli_chat_decode(args, ckpt, args.max_tokens)
        else:
            t_start = time.perf_counter()
            app = build_app(ckpt, adapters, device=args.device, dtype=args.dtype, model_name="base",
                            max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
                            prefill_chunk_tokens=args.prefill_chunk_tokens, log_stats_interval=0,
                            expert_dtype=args.expert_dtype, resident_expert_layers=args.resident_expert_layers)
            if args.decode_gpu_share is not None:  # the setting, then decoders captured again with it
                from hybridmoe.decode_graph import drop_decoder

                engine = app.state.engine
                for ex in engine.adapters.experts.values():
                    ex.settings.gpu_share = args.decode_gpu_share
                drop_decoder(engine.adapters.model)
                engine.warm_up()
            extra["startup_s"] = round(time.perf_counter() - t_start, 1)  # load + adapters + warm-up (graph captures)
            with serve_in_thread(app) as url:
                result = load(url)
                stats = {k: round(v, 2) for k, v in app.state.engine.stats.items()}
            if args.issue_table:  # after the server stopped: the engine thread no longer uses the model
                extra["chat_decode_tokens_per_s"] = _chat_decode_baseline(app, args.max_tokens)
        if args.issue_table:
            one, chat = extra["one_client"], extra["chat_decode_tokens_per_s"]
            extra["one_client_vs_chat"] = round(1 / one["itl_p50_s"] / chat, 3) if one["itl_p50_s"] and chat else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({
        "bench": "serve_load", "model": "tiny-deepseek-v2 (random)" if not args.model else str(args.model),
        "device": device, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "models": ["base", *adapters],
        "expert_dtype": args.expert_dtype, "resident_expert_layers": args.resident_expert_layers,
        "token_timing": args.token_timing, "serve_cli": args.serve_cli, "switch_interval": sys.getswitchinterval(),
        "decode_gpu_share": args.decode_gpu_share,
        **result, "engine": stats,
        "mean_decode_batch": round(stats["decoded_tokens"] / max(stats["decode_steps"], 1), 2),
        "mean_prefill_batch": round(stats["prefills"] / max(stats["prefill_batches"], 1), 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" and not args.serve_cli
        else None,
        **extra,
    }))


if __name__ == "__main__":
    main()
