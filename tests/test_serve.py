"""`hybridmoe serve` on loopback, driven by the official openai client.

One server (tiny DeepSeek-V2: dense first layer, shared and routed experts) serves the base model and three
adapters: `alpha` (LoRA on everything), `beta` (two attention projections + routed experts) and `broken` (finite
but huge LoRA B, so the forward overflows to NaN: it loads, like a diverged adapter would, and fails at run time).

Replies are compared for exact equality. A request that runs alone decodes through the same inputs as
`hybridmoe chat`, bit for bit. Requests batched together differ from a lone run by fp32 rounding (~1e-6 in the
logits, see hybridmoe.serve.batch), which could only change a greedy choice at a near tie; the prompts here are
fixed, so the same handful of choices is checked every run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import math
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import hybridmoe
from hybridmoe.adapters import apply_lora, save_adapter
from hybridmoe.chat import render_prompt, reply
from hybridmoe.cli import main
from hybridmoe.generation import SamplingConfig
from hybridmoe.placement import placement_report
from hybridmoe.serve import build_app, serve_in_thread
from hybridmoe.serve.engine import Delta, Engine, Failed, Handle, _Request

from .helpers import make_checkpoint, randomize_lora

ARCH = "deepseek_v2"
BASE = "tiny"  # the name the base model is served under
ADAPTERS = {"alpha": ("all", 1, 0.1), "beta": ("q_proj,kv_b_proj,experts", 2, 0.1), "broken": ("all", 3, 1e30)}


def _make_adapter(ckpt: Path, out: Path, target: str, seed: int, scale: float) -> Path:
    model, _ = hybridmoe.load(ckpt, device="cpu", progress=False)
    peft_model = apply_lora(model, target, rank=4, alpha=8, seed=seed)
    randomize_lora(peft_model, seed, scale)
    save_adapter(peft_model, out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(ARCH, root / BASE)
    adapters = {name: _make_adapter(ckpt, root / name, *spec) for name, spec in ADAPTERS.items()}
    return ckpt, adapters


@pytest.fixture(scope="module")
def server(files):
    ckpt, adapters = files
    app = build_app(ckpt, {n: str(p) for n, p in adapters.items()}, device="cpu", model_name=BASE, max_batch_size=16)
    # One torch thread: the tiny model's ops are too small to split, and the event loop, the clients and the other
    # jobs on a 2-core CI machine need the other core (two OpenMP threads there made each forward ~10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with serve_in_thread(app) as url:
            yield url, app.state.engine
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client, model, prompt, stream=False, **kw):
    """(reply text, finish_reason, usage) through the openai client, streaming or not."""
    kw.setdefault("temperature", 0)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    parts, finish, usage = [], None, None
    for c in client.chat.completions.create(model=model, messages=messages, stream=True,
                                            stream_options={"include_usage": True}, **kw):
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
        if c.usage is not None:
            usage = c.usage
    return "".join(parts), finish, usage


def _chat_cli(capsys, files, model, prompt, *flags, device="cpu") -> str:
    """`hybridmoe chat --prompt` (the CLI, in process): prints the reply and a newline."""
    ckpt, adapters = files
    args = ["chat", "--model", str(ckpt), "--prompt", prompt, "--device", device, *flags]
    if model != BASE:
        args += ["--adapter", str(adapters[model])]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def test_models_and_health(server, client):
    url, engine = server
    cards = {m.id: m for m in client.models.list()}
    assert list(cards) == [BASE, "alpha", "beta", "broken"]
    assert client.models.retrieve("alpha").id == "alpha"
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    # all adapters loaded at once: Linear LoRA as named PEFT adapters on the compute device, none wrapping experts
    report = placement_report(engine.adapters.model)
    assert report["ok"], report["problems"]
    assert set(engine.adapters.names) == {"alpha", "beta", "broken"}
    expert_lora = {n: [lo.A for d in engine.adapters.expert_lora[n].values() for lo in d.values()]
                   for n in engine.adapters.names}
    assert all(expert_lora.values())  # each adapter keeps its own routed-expert LoRA, on the CPU
    assert len({id(a) for As in expert_lora.values() for a in As}) == sum(map(len, expert_lora.values()))
    assert all(a.device.type == "cpu" for As in expert_lora.values() for a in As)


@pytest.mark.parametrize("model", [BASE, "alpha", "beta"])
def test_greedy_reply_equals_chat(model, files, client, capsys):
    prompt = "Hello there, how are you?"
    want = _chat_cli(capsys, files, model, prompt, "--temperature", "0", "--max-new-tokens", "12")
    text, finish, usage = _ask(client, model, prompt, max_tokens=12)
    assert text == want and finish in ("stop", "length")
    assert usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert _ask(client, model, prompt, stream=True, max_tokens=12) == (text, finish, usage)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_greedy_equals_chat_alone_and_batched(files, capsys):
    """On the GPU host: the server on cuda (experts on the CPU), fp32 so that batching is exact up to fp32
    rounding; a lone greedy request equals `hybridmoe chat --device cuda`, concurrent ones their lone replies."""
    ckpt, adapters = files
    app = build_app(ckpt, {"alpha": str(adapters["alpha"])}, device="cuda", dtype="float32", model_name=BASE)
    _lone_equal_chat_and_concurrent_equal_lone(app, files, capsys, 6, "--dtype", "float32", device="cuda")
    assert placement_report(app.state.engine.adapters.model)["ok"]  # LoRA on cuda, experts and their LoRA on cpu


def _lone_equal_chat_and_concurrent_equal_lone(app, files, capsys, n_prompts: int, *chat_flags, device="cpu"):
    """Through the openai client: a lone greedy reply equals `hybridmoe chat`'s (base and alpha), and the replies of
    concurrent requests (batched) equal their lone replies."""
    prompts = [f"Question number {i}" for i in range(n_prompts)]
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for model in (BASE, "alpha"):
            want = _chat_cli(capsys, files, model, prompts[0], "--temperature", "0", "--max-new-tokens", "12",
                             *chat_flags, device=device)
            assert _ask(c, model, prompts[0], max_tokens=12)[0] == want
        alone = {(m, p): _ask(c, m, p, max_tokens=12)[0] for m in (BASE, "alpha") for p in prompts}
        with cf.ThreadPoolExecutor(len(alone)) as ex:
            together = dict(zip(alone, ex.map(lambda k: _ask(c, k[0], k[1], max_tokens=12)[0], alone)))
        assert together == alone
        assert app.state.engine.stats["max_batch"] > 1


def test_lone_requests_on_the_static_decoder_equal_chat_and_batched_ones_their_lone_replies(files, capsys):
    """`cuda_graphs` (the default on CUDA) forced on the CPU: a lone request decodes through the static-cache decoder
    (eagerly here), its reply equals `hybridmoe chat`'s; concurrent requests, which switch between the padded batch
    and the static decoder as they join and finish, equal their lone replies."""
    ckpt, adapters = files
    app = build_app(ckpt, {"alpha": str(adapters["alpha"])}, device="cpu", model_name=BASE, cuda_graphs=True)
    _lone_equal_chat_and_concurrent_equal_lone(app, files, capsys, 4)
    assert getattr(app.state.engine.adapters.model, "_hybridmoe_decoder", None) is not None


def test_seeded_sampling_equals_chat_and_repeats(files, client, capsys):
    flags = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "10"]
    want = _chat_cli(capsys, files, "alpha", "Tell me a story", *flags)
    kw = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=10)
    assert _ask(client, "alpha", "Tell me a story", **kw)[0] == want
    assert _ask(client, "alpha", "Tell me a story", stream=True, **kw)[0] == want
    assert _ask(client, "alpha", "Tell me a story", **{**kw, "seed": 8})[0] != want


def test_max_tokens_and_stop(client):
    text, finish, usage = _ask(client, BASE, "Count with me", max_tokens=16)
    assert finish == "length" and usage.completion_tokens == 16
    # a stop string taken from the middle of the greedy reply: the reply ends right before it
    m = re.search(r"[A-Za-z]{2}", text[1:])
    assert m, text
    stop = m.group(0)
    cut = text.find(stop)
    for stream in (False, True):
        got, finish, _ = _ask(client, BASE, "Count with me", stream=stream, max_tokens=16, stop=[stop, "\x00never"])
        assert (got, finish) == (text[:cut], "stop")


def _solo_replies(files, pairs, max_tokens):
    """The reply to each (model, prompt) alone, with hybridmoe.chat's code path on a freshly loaded model."""
    ckpt, adapters = files
    out = {}
    for model in sorted({m for m, _ in pairs}):
        m, tok = hybridmoe.load(ckpt, adapter=None if model == BASE else adapters[model], device="cpu",
                                progress=False)
        for _, prompt in [p for p in pairs if p[0] == model]:
            res = reply(m, tok, [{"role": "user", "content": prompt}], SamplingConfig(temperature=0,
                                                                                      max_new_tokens=max_tokens))
            out[(model, prompt)] = res.text
    return out


def test_concurrent_requests_for_different_adapters(files, server, client):
    """Requests for three models at once (and two for a broken adapter) are decoded in shared batches, adapters
    mixed in one forward (the engine's stats and /metrics count those steps), and each reply equals its lone reply;
    the broken adapter fails its own requests (streaming and not) and nothing else."""
    url, engine = server
    pairs = [(m, f"Question number {i}: what is {i} plus {i}?") for i in range(3) for m in (BASE, "alpha", "beta")]
    want = _solo_replies(files, pairs, 24)
    before = dict(engine.stats)

    def ask(job):
        kind, model, prompt = job
        try:
            return _ask(client, model, prompt, stream=kind == "stream", max_tokens=24)[0]
        except openai.APIError as e:
            return e

    jobs = [("plain", m, p) for m, p in pairs] + [("plain", "broken", "hi"), ("stream", "broken", "hi")]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(ask, jobs))
    for (_, model, prompt), got in zip(jobs[:-2], results[:-2]):
        assert got == want[(model, prompt)], (model, prompt)
    plain, streamed = results[-2:]
    assert isinstance(plain, openai.APIStatusError) and plain.status_code == 500
    assert plain.body["code"] == "non_finite_logits" and "adapter 'broken'" in plain.body["message"]
    assert isinstance(streamed, openai.APIError) and "non-finite" in streamed.message
    assert engine.stats["max_batch"] > 1 and engine.stats["decode_steps"] > before["decode_steps"]
    assert engine.stats["mixed_decode_steps"] > before["mixed_decode_steps"]
    mixed = {s.labels["phase"]: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
             for s in f.samples if s.name == "hybridmoe:mixed_adapter_forwards_total"}
    assert mixed["decode"] >= engine.stats["mixed_decode_steps"] - before["mixed_decode_steps"]
    assert _ask(client, BASE, pairs[0][1], max_tokens=24)[0] == want[pairs[0]]  # still serving


PREFILL_QUESTIONS = ["Hi", "What is two plus two?", "Tell me a long story about a dragon, a knight and a castle by "
                     "the sea.", "Why?", "Name three colours, please, and say which one you like best."]


def _run_queued(files, jobs, max_tokens, prefill_chunk_tokens=2048):
    """Serve (model, question) ``jobs`` on a fresh engine (base, alpha, broken) with all of them queued before the
    worker starts, so that its first admission sees every one; returns (reply text or Failed per job, engine)."""
    ckpt, adapters = files
    app = build_app(ckpt, {n: str(adapters[n]) for n in ("alpha", "broken")}, device="cpu", model_name=BASE,
                    prefill_chunk_tokens=prefill_chunk_tokens)
    engine = app.state.engine
    cfg = SamplingConfig(temperature=0, max_new_tokens=max_tokens)

    async def collect(handle):
        parts = []
        async for ev in handle.events():
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Failed):
                return ev
        return "".join(parts)

    async def run():
        handles = [Handle(asyncio.get_running_loop()) for _ in jobs]
        for (m, q), handle in zip(jobs, handles):  # queued directly: submit() refuses before the worker runs
            prompt = render_prompt(engine.tokenizer, [{"role": "user", "content": q}])
            engine._waiting.put(_Request(prompt, None if m == BASE else m, cfg, handle))
        engine.start()
        try:
            return await asyncio.gather(*(collect(h) for h in handles))
        finally:
            engine.stop()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return asyncio.run(run()), engine
    finally:
        torch.set_num_threads(threads)


def test_batched_prefill_replies_equal_lone_replies(files):
    """Requests waiting together are prefilled in left-padded batches, adapters mixed: after the first request
    (prefilled alone while the engine learns that the cache can be padded), the four other `alpha` prompts, of four
    different lengths, the two `broken` ones and the two base-model ones go in ONE forward, and decode together.
    Each greedy reply equals its lone reply (a padded row's logits differ from a lone run by fp32 rounding, ~1e-6,
    see hybridmoe.serve.prefill; the prompts are fixed, so the same choices are checked every run), and the broken
    adapter's NaN logits fail its own two requests only, though its rows shared forwards with the others."""
    jobs = [("alpha", q) for q in PREFILL_QUESTIONS] + [("broken", "hi"), ("broken", "Why is the sky blue?")]
    jobs += [(BASE, PREFILL_QUESTIONS[1]), (BASE, PREFILL_QUESTIONS[2])]
    want = _solo_replies(files, [j for j in jobs if j[0] != "broken"], 10)
    results, engine = _run_queued(files, jobs, 10)
    tok = engine.tokenizer
    assert len({len(render_prompt(tok, [{"role": "user", "content": q}])) for q in PREFILL_QUESTIONS[1:]}) == 4
    for job, got in zip(jobs, results):
        if job[0] == "broken":
            assert isinstance(got, Failed) and got.code == "non_finite_logits" and "adapter 'broken'" in got.message
        else:
            assert got == want[job], job
    assert engine.stats["prefills"] == len(jobs)
    assert engine.stats["prefill_batches"] == 2 and engine.stats["max_prefill_batch"] == 8
    assert engine.stats["mixed_prefill_chunks"] == 1 and engine.stats["mixed_decode_steps"] > 0
    assert engine.batchable


def test_chunked_batched_prefill_replies_equal_lone_replies(files):
    """Left-padded batches prefilled 24 padded tokens at a time (a few columns per forward, the first chunks all
    padding for the short rows), `alpha` and base-model rows in the same chunks: every reply still equals its lone
    reply."""
    jobs = [("alpha", q) for q in PREFILL_QUESTIONS[:3]] + [(BASE, q) for q in PREFILL_QUESTIONS[3:]]
    want = _solo_replies(files, jobs, 6)
    results, engine = _run_queued(files, jobs, 6, prefill_chunk_tokens=24)
    assert [want[j] for j in jobs] == results
    assert engine.stats["prefill_batches"] == 2 and engine.stats["max_prefill_batch"] == 4
    assert engine.stats["prefill_chunks"] > 2 * 4  # many chunks per batch
    assert engine.stats["mixed_prefill_chunks"] == engine.stats["prefill_chunks"] - 1  # all but the lone first


def test_failed_batched_prefill_is_retried_one_request_at_a_time(files, monkeypatch):
    """A batched prefill that runs out of memory is retried request by request: every request is still served,
    with its lone reply (bit for bit: each is then prefilled alone), instead of the whole batch failing."""
    import hybridmoe.serve.engine as engine_module

    real = engine_module.prefill_batch
    tried = []  # rows of each batched attempt

    def only_alone(model, prompts, capacity):
        if len(prompts) > 1:
            tried.append(len(prompts))
            raise torch.cuda.OutOfMemoryError("pretend the padded batch does not fit")
        return real(model, prompts, capacity)

    monkeypatch.setattr(engine_module, "prefill_batch", only_alone)
    jobs = [("alpha", q) for q in PREFILL_QUESTIONS[:3]]
    want = _solo_replies(files, jobs, 6)
    results, engine = _run_queued(files, jobs, 6)
    assert [want[j] for j in jobs] == results
    assert tried == [2]  # the first request went alone (batchability unknown), the other two were tried together
    assert engine.stats["prefill_batches"] == 3 and engine.stats["max_prefill_batch"] == 1


def _queued(adapter, n_tokens, cancelled=False):
    req = _Request([1] * n_tokens, adapter, SamplingConfig(temperature=0), Handle(asyncio.new_event_loop()))
    if cancelled:
        req.handle.cancel()
    return req


def test_prefill_batches_follow_arrival_order_slots_and_token_budget():
    """The scheduler alone (no model): waiting requests of any adapter (the base model included) join a prefill
    batch in arrival order while they fit the free slots and the padded-token budget (rows x longest prompt); the
    rest keep their order; cancelled requests are dropped; until the cache is known to be batchable, one at a time."""
    engine = Engine(adapters=None, tokenizer=None, max_batch_size=4, max_prefill_tokens=40)
    reqs = [_queued("a", 5), _queued("b", 3), _queued("a", 10), _queued("a", 2, cancelled=True), _queued("a", 30),
            _queued("a", 4), _queued(None, 8), _queued("b", 1), _queued("a", 1)]
    engine._pending.extend(reqs)
    assert engine._next_prefill() == [reqs[0]]  # batchable not known yet
    engine.batchable = True
    # b 3 (1 x 3), a 10 (2 x 10), a 30 would make 3 x 30 > 40, a 4 (3 x 10), base 8 (4 x 10): the 4 slots are full
    assert engine._next_prefill() == [reqs[1], reqs[2], reqs[5], reqs[6]]
    assert list(engine._pending) == [reqs[4], reqs[7], reqs[8]]
    engine.max_prefill_tokens = 5
    assert engine._next_prefill() == [reqs[4]]  # a prompt over the budget still goes, alone
    assert engine._next_prefill() == [reqs[7], reqs[8]]  # 2 x 1
    assert not engine._pending


def test_choices_of_one_request_count_as_one_prefill_row():
    """n choices share their prompt (one list object): they fill n slots but one row of the padded-token budget."""
    engine = Engine(adapters=None, tokenizer=None, max_batch_size=4, max_prefill_tokens=40)
    engine.batchable = True
    prompt = [1] * 30
    handle = Handle(asyncio.new_event_loop(), n=3)
    siblings = [_Request(prompt, None, SamplingConfig(temperature=0), handle, index=i) for i in range(3)]
    other = _queued(None, 30)
    engine._pending.extend([*siblings, other])
    assert engine._next_prefill() == siblings  # 1 row x 30 tokens; the other prompt would make 2 x 30 > 40
    assert list(engine._pending) == [other]


def test_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    url, engine = server
    before = engine.stats["decoded_tokens"]
    stream = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Tell me more"}],
                                            temperature=0, max_tokens=200, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    for _ in range(200):
        if httpx.get(url + "/health").json()["running"] == 0:
            break
        threading.Event().wait(0.05)
    assert engine.running == 0 and engine.waiting == 0
    assert engine.stats["decoded_tokens"] - before < 100  # stopped early, not run to max_tokens=200


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "missing required parameter 'model'"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "served models: tiny, alpha"),
    ({"model": BASE, "messages": []}, 400, "'messages'"),
    ({"model": BASE, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "'temperature'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "'temperature'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "'top_p'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "'max_tokens'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "'seed'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "'stop'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "'n'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "'tool_choice' needs 'tools'"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}, 400, "unrecognized"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "needs 'logprobs'"),
    ({"model": BASE, "messages": [{"role": "assistant", "content": None}]}, 400, "'content' is required"),
    ({"model": BASE, "messages": [{"role": "tool", "content": "42"}]}, 400, "tool_call_id"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400,
     "does not render the tool calls"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "does not render tools"),
    ({"model": BASE, "messages": [{"role": "user", "content": "word " * 300}]}, 400, "context of 256 tokens"),
    ({"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250}, 400, "lower max_tokens"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_request_gets_4xx(body, status, message, server):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"


def test_runtime_lora_routes_are_off_by_default(server):
    url, _ = server
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                        ("/v1/unload_lora_adapter", {"lora_name": "alpha"})):
        r = httpx.post(url + route, json=body)
        assert r.status_code == 403 and "--allow-runtime-lora" in r.json()["error"]["message"]


def test_server_keeps_running_after_bad_requests(server, client):
    url, _ = server
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(url + "/v1/chat/completions").status_code == 405
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert _ask(client, BASE, "hi", max_tokens=2)[2].completion_tokens >= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_errors_exit_2_with_one_line(files, tmp_path, capsys):
    ckpt, adapters = files
    other = make_checkpoint("qwen3_moe", tmp_path / "qwen")
    foreign = _make_adapter(other, tmp_path / "qwen_adapter", "all", 0, 0.1)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    serve = ["serve", "--model", str(ckpt)]
    cases = [
        (["serve", "--model", str(tmp_path / "missing")], "missing"),
        (serve + ["--adapter", f"a={tmp_path / 'nope'}"], "does not exist"),
        (serve + ["--adapter", f"q={foreign}"], "another model"),
        (serve + ["--adapter", f"a={adapters['alpha']}", "--adapter", f"a={adapters['beta']}"], "used twice"),
        (serve + ["--port", str(busy.getsockname()[1])], "already in use"),
        (serve + ["--port", "0", "--allow-runtime-lora"], "needs --lora-root"),
        (serve + ["--port", "0", "--max-request-bytes", "10"], "--max-request-bytes"),
    ]
    try:
        for args, message in cases:
            capsys.readouterr()
            assert main(args) == 2, args
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if ln.startswith("hybridmoe")]
            assert lines and message in lines[-1] and "Traceback" not in err, err
    finally:
        busy.close()


def test_cli_server_in_subprocess_with_api_key(files):
    """`python -m hybridmoe serve` as a user runs it: API key from the environment, port 0, Ctrl-C stops it."""
    ckpt, adapters = files
    src = str(Path(hybridmoe.__file__).parents[1])  # run the code under test, wherever it is imported from
    env = {**os.environ, "HYBRIDMOE_API_KEY": "s3cret", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "hybridmoe", "serve", "--model", str(ckpt), "--model-name", BASE, "--adapter",
           f"alpha={adapters['alpha']}", "--port", "0", "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=120)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                break
        base = f"http://127.0.0.1:{m.group(1)}"
        for _ in range(600):  # the port is bound before loading; requests work once uvicorn has started
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            threading.Event().wait(0.05)
        no_key = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            no_key.models.list()
        assert httpx.post(base + "/v1/chat/completions", content=b"{bad").status_code == 401
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [BASE, "alpha"]
        assert _ask(good, "alpha", "hi", max_tokens=3)[2].completion_tokens >= 1
        # graceful shutdown: Ctrl-C while a stream runs; the stream still finishes, then the server exits
        stream = iter(good.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=60, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        next(stream)
        proc.send_signal(signal.SIGINT)
        rest = list(stream)
        assert rest[-1].usage.completion_tokens == 60
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        with pytest.raises(openai.APIConnectionError):  # no new requests once shutting down
            for _ in range(100):
                good.models.list()
                threading.Event().wait(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    assert rc == 0


def test_load_16_clients_x_20_requests(files, server):
    """A bounded load test on loopback: 16 concurrent clients, 20 requests each, mixed models, half of them
    streamed. No errors, and every reply equals the same request's lone reply (throughput: benchmarks/serve_load.py)."""
    url, engine = server
    prompts = ["Hi!", "What is the capital of France?", "Write a poem about the sea.", "How are you today?"]
    pairs = [(m, p) for m in (BASE, "alpha", "beta") for p in prompts]
    want = _solo_replies(files, pairs, 8)
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(model, prompt, stream):
        kw = dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8)
        if not stream:
            return (await aclient.chat.completions.create(**kw)).choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in await aclient.chat.completions.create(
            stream=True, **kw) if c.choices])

    async def worker(c):
        got = []
        for i in range(20):
            model, prompt = pairs[(c + i) % len(pairs)]
            got.append(((model, prompt), await one(model, prompt, stream=(c + i) % 2 == 1)))
        return got

    async def run():
        async with aclient:
            return await asyncio.gather(*(worker(c) for c in range(16)))

    results = [r for per_client in asyncio.run(run()) for r in per_client]
    assert len(results) == 320
    assert all(got == want[key] for key, got in results)
    assert engine.stats["max_batch"] > 1 and engine.stats["max_prefill_batch"] > 1


def test_batched_greedy_tokens_and_logprobs_equal_each_rows_own():
    """The engine's one-transfer argmax + logprobs for greedy rows (_batched_greedy) against each row's own accept()
    math (argmax; _logprob of the raw distribution): same tokens and top ids, logprobs within fp32 rounding; a row with
    a NaN gets -1 (its accept() then names the step)."""
    from hybridmoe.serve.engine import _batched_greedy
    from hybridmoe.serve.sampling import _logprob

    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = float("nan")
    lp_k = [None, 3, 2, 0, None]
    tokens, picked, logprobs = _batched_greedy(logits, [True, False, False, False, False], lp_k)
    assert tokens[2] == -1 and sorted(logprobs) == [1, 2, 3]
    assert tokens == [int(logits[i].argmax()) if i != 2 else -1 for i in range(5)]
    assert picked.view(-1).tolist() == tokens
    for i in (1, 3):
        want, got = _logprob(logits[i : i + 1], tokens[i], lp_k[i]), logprobs[i]
        assert got.token_id == want.token_id and math.isclose(got.logprob, want.logprob, rel_tol=1e-6)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got.top, want.top))


def test_a_failing_warm_up_is_logged_and_the_server_serves_on(files, monkeypatch, caplog):
    """The warm-up before serving (Engine.warm_up) is not fatal: a failure is one warning, and requests are then
    served as before (their replies equal the lone reference)."""
    import logging

    import hybridmoe.serve.prefill as prefill_module

    def broken(*args, **kwargs):
        raise RuntimeError("pretend the warm-up's prefill failed")

    monkeypatch.setattr(prefill_module, "prefill_batch", broken)  # the engine's own prefills import it by name
    jobs = [(BASE, PREFILL_QUESTIONS[0])]
    with caplog.at_level(logging.WARNING, logger="hybridmoe.serve"):
        results, _ = _run_queued(files, jobs, 4)
    assert sum("warming up failed" in r.message for r in caplog.records) == 1
    assert results == [_solo_replies(files, jobs, 4)[jobs[0]]]


def test_the_warm_up_runs_every_decoder_the_first_requests_would_capture(files):
    """Engine.warm_up with graph decode on (on the CPU the decoders run their cut eagerly; on CUDA the same steps
    capture): the batch decoder ran every batch size below the first power of two (4 and 2 for 4 rows), and a lone
    row's decoder exists for the base model and for each adapter, keyed by the LoRA that runs."""
    from hybridmoe.loading import load_tokenizer
    from hybridmoe.serve.adapters import AdapterSet

    ckpt, adapters = files
    model, _ = hybridmoe.load(ckpt, device="cpu", progress=False)
    aset = AdapterSet(model)
    for name in ("alpha", "beta"):
        aset.load(name, adapters[name])
    engine = Engine(aset, load_tokenizer(ckpt), max_batch_size=4, graph_decode=True)
    with torch.inference_mode():
        assert engine.warm_up() > 0
    assert sorted(aset.model._hybridmoe_batch_decoder.chains) == [2, 4]
    keys = {dec.key[0] for dec in aset.model._hybridmoe_decoders.values()}
    assert len(aset.model._hybridmoe_decoders) == 3 and None in keys  # base, alpha, beta
    assert aset.active is None  # back to the base model
