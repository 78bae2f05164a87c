"""The OpenAI / vLLM API surface of `hybridmoe serve`, driven by the official openai client on loopback.

One server (tiny DeepSeek-V2 with a 1024-token context, a Qwen-style chat template that renders tools) serves the
base model and one adapter, with runtime LoRA loading allowed under a LoRA root. Replies are compared with
`hybridmoe.generation.generate` on a separately loaded model (greedy: exact; a request alone decodes bit for bit like `chat`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import math
import os
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

import hybridmoe
from hybridmoe.adapters import apply_lora, save_adapter
from hybridmoe.generation import SamplingConfig, decode_one_token, generate, prefill
from hybridmoe.serve import build_app, serve_in_thread

from .helpers import make_checkpoint, randomize_lora

BASE = "tiny"
LIMIT = 64 * 1024  # --max-request-bytes of the test server

# ChatML with tools the way Qwen2.5 / Qwen3 templates render them (Hermes format), kept short for the tiny context
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "\n</tools>\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for tc in message.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                "celsius": {"type": "boolean"}}, "required": ["city", "celsius"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}


def _adapter(ckpt: Path, out: Path, seed: int) -> Path:
    model, _ = hybridmoe.load(ckpt, device="cpu", progress=False)
    peft_model = apply_lora(model, "all", rank=4, alpha=8, seed=seed)
    randomize_lora(peft_model, seed, 0.1)
    save_adapter(peft_model, out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    ckpt = make_checkpoint("deepseek_v2", root / BASE, max_position_embeddings=1024)
    alpha = _adapter(ckpt, root / "alpha", 1)
    loras = root / "loras"
    loras.mkdir()
    _adapter(ckpt, loras / "gamma", 2)
    return ckpt, alpha, loras


@pytest.fixture(scope="module")
def server(files):
    ckpt, alpha, loras = files
    app = build_app(ckpt, {"alpha": str(alpha)}, device="cpu", model_name=BASE, chat_template=TOOL_TEMPLATE,
                    allow_runtime_lora=True, lora_root=loras, max_loras=2, max_request_bytes=LIMIT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_serve.py: leave the other core to the event loop and the clients
    try:
        with serve_in_thread(app) as url:
            yield url, app
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(files):
    """The base model and tokenizer loaded apart from the server, for `generate` references."""
    model, tok = hybridmoe.load(files[0], device="cpu", progress=False)
    tok.chat_template = TOOL_TEMPLATE
    return model.eval(), tok


def _chat_ids(tok, prompt: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


# -- /v1/completions -------------------------------------------------------------------------------------------------
def test_completions_prompt_echo_list_stream_and_suffix(client, reference):
    model, tok = reference
    want = generate(model, tok, tok("Hello there")["input_ids"], SamplingConfig(temperature=0, max_new_tokens=8)).text
    r = client.completions.create(model=BASE, prompt="Hello there", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == want and r.usage.completion_tokens <= 8
    echoed = client.completions.create(model=BASE, prompt="Hello there", max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello there" + want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE, prompt="Hello there", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == want
    two = client.completions.create(model=BASE, prompt=["Hello there", "The sea"], max_tokens=8, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == want
    ids = tok("The sea")["input_ids"]
    by_ids = client.completions.create(model=BASE, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == two.choices[1].text
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=BASE, prompt="def f(", suffix="return 1", max_tokens=4)


BAD_COMPLETIONS = [
    ({"model": BASE, "prompt": {"a": 1}}, "a string, a non-empty list of strings or a non-empty list of token ids"),
    ({"model": BASE, "prompt": []}, "non-empty list"),
    ({"model": BASE}, "missing required parameter 'prompt'"),
    ({"model": BASE, "prompt": "x", "logprobs": 30}, "'logprobs'"),
    ({"model": BASE, "prompt": "x", "echo": True, "logprobs": 1}, "'echo' with 'logprobs'"),
    ({"model": BASE, "prompt": ""}, "empty after tokenization"),
    ({"model": BASE, "prompt": [10**6]}, "below the vocabulary size"),
    ({"model": BASE, "prompt": "x", "best_of": 3}, "only best_of=1"),
    ({"model": BASE, "prompt": "word " * 1100}, "context of 1024 tokens"),
]


@pytest.mark.parametrize("body,message", BAD_COMPLETIONS, ids=range(len(BAD_COMPLETIONS)))
def test_bad_completions_get_400(server, body, message):
    r = httpx.post(server[0] + "/v1/completions", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


# -- n, logprobs, vLLM's extra sampling parameters -------------------------------------------------------------------
def test_n_choices_share_one_prefill_and_equal_lone_seeded_runs(server, client, reference):
    _, app = server
    model, tok = reference
    engine = app.state.engine
    prompt = "Tell me a story about the sea"
    before = dict(engine.stats)
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": prompt}], n=3,
                                       temperature=0.9, seed=11, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    n_prompt = len(_chat_ids(tok, prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert engine.stats["prefills"] - before["prefills"] == 3  # three rows ...
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == n_prompt  # ... from one prompt row
    for i, c in enumerate(r.choices):  # choice i samples with seed + i
        lone = generate(model, tok, _chat_ids(tok, prompt), SamplingConfig(temperature=0.9, seed=11 + i,
                                                                          max_new_tokens=10))
        assert c.message.content == lone.text
    assert len({c.message.content for c in r.choices}) > 1


def test_logprobs_on_chat_and_completions(client, reference):
    model, tok = reference
    ids = _chat_ids(tok, "Hi")
    with torch.inference_mode():
        from transformers import DynamicCache

        logits, _ = prefill(model, torch.tensor([ids]), DynamicCache(config=model.config))  # [1, V]
    first = torch.log_softmax(logits[0], -1)
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                       max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    top_id = int(first.argmax())
    assert content[0].token == tok.decode([top_id])
    assert math.isclose(content[0].logprob, float(first[top_id]), abs_tol=1e-4)  # fp32 rounding of the forward
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-6)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    chunks = [c for c in client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                                         temperature=0, max_tokens=6, logprobs=True, stream=True)
              if c.choices and c.choices[0].logprobs]
    assert [e.logprob for c in chunks for e in c.choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in content], abs=1e-6)
    comp = client.completions.create(model=BASE, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def _greedy_with_penalties(model, ids, steps, presence_penalty=0.0, frequency_penalty=0.0):
    """A plain greedy loop applying OpenAI's presence/frequency penalties over the generated ids (the reference)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        logits, cache = prefill(model, torch.tensor([ids]), DynamicCache(config=model.config))
        out: list[int] = []
        for _ in range(steps):
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[-1]).float()
            token = int((logits[0] - frequency_penalty * counts - presence_penalty * (counts > 0).float()).argmax())
            out.append(token)
            logits, cache = decode_one_token(model, torch.tensor([[token]]), cache, len(ids) + len(out) - 1)
    return out


def test_vllm_sampling_params(client, reference):
    model, tok = reference
    prompt = "Count with me"
    ids = _chat_ids(tok, prompt)
    msgs = [{"role": "user", "content": prompt}]

    def ask(**kw):
        r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=12, **kw)
        return r.choices[0].message.content

    greedy = ask(temperature=0)
    assert ask(temperature=1.0, seed=1, extra_body={"top_k": 1}) == greedy  # top-1 sampling is greedy
    assert ask(temperature=1.0, seed=1, extra_body={"min_p": 1.0}) == greedy  # only the most likely survives
    rep = generate(model, tok, ids, SamplingConfig(temperature=0, max_new_tokens=12, repetition_penalty=1.5)).text
    assert ask(temperature=0, extra_body={"repetition_penalty": 1.5}) == rep  # chat's --repetition-penalty
    for kw in ({"presence_penalty": 1.5}, {"frequency_penalty": 0.7}):
        want = _greedy_with_penalties(model, ids, 12, **kw)
        eos = want.index(tok.eos_token_id) + 1 if tok.eos_token_id in want else len(want)
        assert ask(temperature=0, **kw) == tok.decode(want[:eos], skip_special_tokens=True), kw
    with pytest.raises(openai.BadRequestError, match="min_p"):
        ask(extra_body={"min_p": 2})


# -- response_format and tools ---------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "sure": {"type": "boolean"}}, "required": ["colour", "count", "sure"]}


def _check_schema(obj):
    assert set(obj) == {"colour", "count", "sure"}, obj
    assert obj["colour"] in ("red", "green", "blue") and 0 <= obj["count"] <= 99 and isinstance(obj["sure"], bool)


@pytest.mark.parametrize("model", [BASE, "alpha"])
def test_response_format_json_schema_and_object(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
    msgs = [{"role": "user", "content": "Pick a colour"}]
    r = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=60, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    _check_schema(json.loads(r.choices[0].message.content))
    sampled = client.chat.completions.create(model=model, messages=msgs, temperature=1.0, seed=3, max_tokens=60,
                                             response_format=fmt, n=2)
    for c in sampled.choices:
        _check_schema(json.loads(c.message.content))
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=msgs, temperature=0, max_tokens=60, response_format=fmt, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    obj = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=60,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=model, messages=msgs, response_format={"type": "json_schema"})

    class Pick(BaseModel):  # the openai client's structured outputs: a strict schema from a pydantic model
        colour: Literal["red", "green", "blue"]
        count: int = Field(ge=0, le=99)  # bounded: a random model would otherwise write digits up to max_tokens
        sure: bool

    parsed = client.chat.completions.parse(model=model, messages=msgs, response_format=Pick, temperature=0,
                                           max_tokens=60).choices[0].message.parsed
    assert isinstance(parsed, Pick)


def test_tools_required_named_auto_and_streamed(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    # one call (parallel_tool_calls=False): a random model would otherwise go on calling until max_tokens
    r = client.chat.completions.create(model=BASE, messages=msgs, tools=[WEATHER, ADD], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=150)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:  # parsed by the openai client into typed tool calls
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Rome") and isinstance(args["celsius"], bool)
        else:
            assert call.function.name == "add" and 0 <= args["a"] <= 9
    named = client.chat.completions.create(model="alpha", messages=msgs, tools=[WEATHER, ADD], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=150)
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["add"] and 0 <= json.loads(calls[0].function.arguments)["a"] <= 9
    auto = client.chat.completions.create(model=BASE, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=20)
    message = auto.choices[0].message  # a random model chats rather than calls; either way the reply parses
    assert message.tool_calls is None or all(c.function.name == "get_weather" for c in message.tool_calls)
    deltas = [c.choices[0] for c in client.chat.completions.create(
        model=BASE, messages=msgs, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=150, stream=True) if c.choices]
    streamed = [tc for d in deltas for tc in d.delta.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert deltas[-1].finish_reason == "tool_calls"
    assert not "".join(d.delta.content or "" for d in deltas)  # the call is not also streamed as text
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model=BASE, messages=msgs, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tool_call_and_tool_result_in_history(server, client):
    url, _ = server
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    r = client.chat.completions.create(model=BASE, messages=msgs, tools=[WEATHER], temperature=0, max_tokens=4)
    assert r.choices[0].message.role == "assistant"
    ids = httpx.post(url + "/tokenize", json={"model": BASE, "messages": msgs}).json()["tokens"]
    text = httpx.post(url + "/detokenize", json={"model": BASE, "tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "celsius": true}}' in text
    assert "<tool_response>\n21 degrees and sunny\n</tool_response>" in text
    bad = [*msgs[:1], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    with pytest.raises(openai.BadRequestError, match="arguments"):
        client.chat.completions.create(model=BASE, messages=bad)


# -- /tokenize, /detokenize ------------------------------------------------------------------------------------------
def test_tokenize_and_detokenize(server, reference):
    url, _ = server
    _, tok = reference
    r = httpx.post(url + "/tokenize", json={"model": BASE, "prompt": "Hello there"}).json()
    assert r["tokens"] == tok("Hello there")["input_ids"] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024
    chat = httpx.post(url + "/tokenize", json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == _chat_ids(tok, "Hi")
    assert httpx.post(url + "/detokenize", json={"model": BASE, "tokens": r["tokens"]}).json() == {
        "prompt": "Hello there"}
    assert httpx.post(url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(url + "/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


# -- runtime LoRA ----------------------------------------------------------------------------------------------------
def test_load_and_unload_lora_adapter_at_run_time(files, server, client, tmp_path):
    ckpt, _, loras = files
    url, app = server
    load = lambda body: httpx.post(url + "/v1/load_lora_adapter", json=body, timeout=120)  # noqa: E731
    unload = lambda body: httpx.post(url + "/v1/unload_lora_adapter", json=body, timeout=120)  # noqa: E731
    r = load({"lora_name": "org/gamma.v1", "lora_path": str(loras / "gamma")})
    assert r.status_code == 200 and "org/gamma.v1" in r.text, r.text
    assert [m.id for m in client.models.list()] == [BASE, "alpha", "org/gamma.v1"]  # a name PEFT could not key
    assert client.models.retrieve("org/gamma.v1").parent == BASE
    m, tok = hybridmoe.load(ckpt, adapter=loras / "gamma", device="cpu", progress=False)
    tok.chat_template = TOOL_TEMPLATE
    want = generate(m.eval(), tok, _chat_ids(tok, "Hi there"), SamplingConfig(temperature=0, max_new_tokens=10)).text
    got = client.chat.completions.create(model="org/gamma.v1", messages=[{"role": "user", "content": "Hi there"}],
                                         temperature=0, max_tokens=10).choices[0].message.content
    assert got == want
    # refused: a name in use, one adapter over --max-loras (2), paths outside --lora-root, with or without symlinks
    assert load({"lora_name": "org/gamma.v1", "lora_path": "gamma"}).status_code == 400
    assert "--max-loras" in load({"lora_name": "delta", "lora_path": "gamma"}).json()["error"]["message"]
    outside = tmp_path / "outside"
    shutil.copytree(loras / "gamma", outside)
    os.symlink(outside, loras / "link")
    assert unload({"lora_name": "org/gamma.v1"}).status_code == 200
    for path in (str(outside), "../alpha", "link", str(loras / "link"), "missing"):
        r = load({"lora_name": "delta", "lora_path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="org/gamma.v1", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert unload({"lora_name": "org/gamma.v1"}).status_code == 404
    # relative to the root, loaded again under another name: the same replies
    assert load({"lora_name": "delta", "lora_path": "gamma"}).status_code == 200
    assert client.chat.completions.create(model="delta", messages=[{"role": "user", "content": "Hi there"}],
                                          temperature=0, max_tokens=10).choices[0].message.content == want
    assert unload({"lora_name": "delta"}).status_code == 200
    assert [m.id for m in client.models.list()] == [BASE, "alpha"]


def test_runtime_adapter_load_with_graph_decode_warms_up_and_running_streams_go_on(files, tmp_path):
    """With graph decode on (on the CPU its decoders run their cut eagerly; on CUDA the same steps capture), loading an
    adapter at run time closes the captured decoders and warms up again on the worker: a lone request's decoder for
    the new adapter exists right after the load, a stream running across the load ends as it would have without it,
    and the new adapter's replies equal the adapter loaded in-process."""
    ckpt, alpha, loras = files
    app = build_app(ckpt, {"alpha": str(alpha)}, device="cpu", model_name=BASE, chat_template=TOOL_TEMPLATE,
                    allow_runtime_lora=True, lora_root=loras, cuda_graphs=True, log_stats_interval=0)
    model = app.state.engine.adapters.model
    story = {"model": BASE, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24,
             "temperature": 0, "extra_body": {"ignore_eos": True}}
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        story_want = c.chat.completions.create(**story).choices[0].message.content  # alone, before any load
        stream = iter(c.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=24, temperature=0,
            stream=True, extra_body={"ignore_eos": True}))
        first = next(stream)
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma"}, timeout=120)
        assert r.status_code == 200, r.text
        lone = {dec.key[0] for dec in model._hybridmoe_decoders.values()}
        assert len(lone) == 3  # the base model, alpha and gamma: each warmed up
        text = "".join(ch.choices[0].delta.content or "" for ch in [first, *stream] if ch.choices)
        assert text == story_want
        got = c.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi there"}],
                                        temperature=0, max_tokens=10).choices[0].message.content
    m, tok = hybridmoe.load(ckpt, adapter=loras / "gamma", device="cpu", progress=False)
    tok.chat_template = TOOL_TEMPLATE
    want = generate(m.eval(), tok, _chat_ids(tok, "Hi there"), SamplingConfig(temperature=0, max_new_tokens=10)).text
    assert got == want


# -- /metrics --------------------------------------------------------------------------------------------------------
def test_metrics_parse_with_the_prometheus_parser(server, client):
    url, _ = server
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    values = {s.name: s.value for f in families.values() for s in f.samples}
    for name in ("hybridmoe:time_to_first_token_seconds", "hybridmoe:inter_token_latency_seconds",
                 "hybridmoe:e2e_request_latency_seconds"):
        assert families[name].type == "histogram" and values[name + "_count"] >= 1
    assert values["hybridmoe:generation_tokens_total"] >= 4 and values["hybridmoe:prompt_tokens_total"] > 0
    assert sum(s.value for s in families["hybridmoe:request_success"].samples if s.name.endswith("_total")) >= 1
    assert values["hybridmoe:num_requests_running"] == 0 and values["hybridmoe:num_requests_waiting"] == 0
    assert values["hybridmoe:host_memory_bytes"] > 2**20 and values["hybridmoe:expert_seconds_total"] > 0


# -- robustness ------------------------------------------------------------------------------------------------------
def _health_ms(http: httpx.Client, url: str) -> float:
    """Round trip of GET /health on an open client (a new httpx client alone costs ~50 ms: its SSL context)."""
    t0 = time.perf_counter()
    assert http.get(url + "/health", timeout=5).status_code == 200
    return (time.perf_counter() - t0) * 1000


def test_request_size_limit_and_health_while_holding_an_oversized_request(server):
    url, _ = server
    big = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * LIMIT}]}).encode()
    r = httpx.post(url + "/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

    sent = threading.Event()

    def trickle():  # a chunked body (no Content-Length) that keeps coming, slowly
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            time.sleep(0.05)
            sent.set()
            yield b"y" * 4096

    with cf.ThreadPoolExecutor(1) as ex, httpx.Client() as http:
        _health_ms(http, url)  # connect
        slow = ex.submit(httpx.post, url + "/v1/chat/completions", content=trickle(), timeout=30)
        sent.wait(10)
        latencies = [_health_ms(http, url) for _ in range(5)]
        r = slow.result()
    assert r.status_code == 413
    assert statistics.median(latencies) < 100, latencies


def test_health_answers_fast_under_load(server):
    url, app = server
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def stream(i):
        async for _ in await aclient.chat.completions.create(
                model=(BASE, "alpha")[i % 2], messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=30,
                temperature=0, stream=True):
            pass

    async def probe():
        out = []
        async with httpx.AsyncClient() as h:
            await h.get(url + "/health")  # connect
            await asyncio.sleep(0.3)
            for _ in range(8):
                t0 = time.perf_counter()
                assert (await h.get(url + "/health")).status_code == 200
                out.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.05)
        return out

    async def run():
        async with aclient:
            *_, latencies = await asyncio.gather(*(stream(i) for i in range(8)), probe())
            return latencies

    latencies = asyncio.run(run())
    assert statistics.median(latencies) < 100, latencies
    assert app.state.engine.stats["max_batch"] > 1


def test_request_timeout(server, client):
    _, app = server
    app.state.config.request_timeout = 0.2
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=900,
                                           temperature=0, extra_body={"min_p": 0.0, "top_k": -1})
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    finally:
        app.state.config.request_timeout = 600.0
    assert app.state.engine.stats["timeouts"] >= 1
    failures = {s.labels["code"]: s.value for f in text_string_to_metric_families(
        httpx.get(server[0] + "/metrics").text) for s in f.samples if s.name == "hybridmoe:request_failure_total"}
    assert failures["timeout"] >= 1
    assert client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2).usage.completion_tokens >= 1


def test_chunked_prefill_interleaves_with_running_streams(server, client, reference):
    """With a 24-token prefill chunk, a long prompt is prefilled in several forwards while another request keeps
    decoding in between; its greedy reply equals its lone reply (chunks see the same keys; fp32 rounding only)."""
    _, app = server
    engine = app.state.engine
    model, tok = reference
    long_prompt = "Once upon a time there was a small village at the foot of a mountain, and " * 3
    want = generate(model, tok, _chat_ids(tok, long_prompt), SamplingConfig(temperature=0, max_new_tokens=8)).text
    old, engine.prefill_chunk_tokens = engine.prefill_chunk_tokens, 24
    before = dict(engine.stats)
    try:
        with cf.ThreadPoolExecutor(2) as ex:
            runner = ex.submit(lambda: list(client.chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=200, temperature=0,
                stream=True)))
            deadline = time.monotonic() + 60
            while engine.running == 0 and time.monotonic() < deadline and not runner.done():
                time.sleep(0.01)
            got = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": long_prompt}],
                                                 temperature=0, max_tokens=8).choices[0].message.content
            runner.result()
    finally:
        engine.prefill_chunk_tokens = old
    assert got == want
    assert engine.stats["prefill_chunks"] - before["prefill_chunks"] >= len(_chat_ids(tok, long_prompt)) // 24
    assert engine.stats["decode_steps_during_prefill"] > before["decode_steps_during_prefill"]


def test_throughput_log_line(server, caplog, monkeypatch):
    """The periodic line like vLLM's: prompt and generation tokens/s over the interval, running and waiting. The
    line's clock is a stand-in that advances 0.05 s per reading (a loaded 2-core machine stretched the real interval
    to 0.36 s once), so the rates are exact."""
    from types import SimpleNamespace

    import hybridmoe.serve.metrics as metrics_module
    from hybridmoe.serve.metrics import log_throughput

    ticks = iter(0.05 * i for i in range(10**6))
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(monotonic=lambda: next(ticks),
                                                                perf_counter=time.perf_counter))
    _, app = server
    metrics = app.state.metrics

    async def run():
        task = asyncio.create_task(log_throughput(metrics, app.state.engine, 0.05))
        await asyncio.sleep(0.01)
        metrics.prefilled(100)
        for _ in range(20):
            metrics.token(0.01, first=False)
        await asyncio.sleep(0.07)
        task.cancel()

    with caplog.at_level("INFO", logger="hybridmoe.serve"):
        asyncio.run(run())
    # This task's lines only (asyncio.run runs it in this thread; the server's own logger runs in the server's thread
    # and may log a line meanwhile). The 100 prompt and 20 generated tokens are counted with no await between them, so
    # they fall in one interval: exactly one line has them; an interval before or after (a slow machine, or the
    # engine still busy with an earlier test's request) logs zeros or nothing.
    lines = [r.getMessage() for r in caplog.records
             if "throughput" in r.getMessage() and r.thread == threading.get_ident()]
    rates = [(float(line.split("Avg prompt throughput: ")[1].split(" ")[0]),
              float(line.split("Avg generation throughput: ")[1].split(" ")[0])) for line in lines]
    busy = [(line, rate) for line, rate in zip(lines, rates) if rate != (0.0, 0.0)]
    assert len(busy) == 1, lines
    line, rate = busy[0]
    assert "Avg prompt throughput:" in line and "Avg generation throughput:" in line and "Waiting:" in line
    assert rate == (100 / 0.05, 20 / 0.05)  # the tokens of one 0.05 s interval


def test_tokenization_runs_off_the_event_loop(server):
    """A 630 kB prompt (within a raised limit) is templated and tokenized on a worker thread: /health keeps
    answering meanwhile, and the request then gets its 400 (it does not fit the context)."""
    url, app = server
    app.state.config.max_request_bytes = 4 * 2**20
    body = {"model": BASE, "messages": [{"role": "user", "content": "The quick brown fox. " * 30_000}]}
    try:
        with cf.ThreadPoolExecutor(1) as ex, httpx.Client() as http:
            _health_ms(http, url)  # connect
            big = ex.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=120)
            latencies = []
            while not big.done():
                latencies.append(_health_ms(http, url))
                time.sleep(0.02)
            r = big.result()
    finally:
        app.state.config.max_request_bytes = LIMIT
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(latencies) >= 3, latencies  # the request took a while: tokenizing 630 kB
    assert statistics.median(latencies) < 100, latencies


def test_graceful_drain_finishes_then_cancels(files):
    """Engine.drain (what Ctrl-C / SIGTERM start, see server.draining_server): new requests get 503; running ones
    go on and finish within the grace period; past it, what still runs ends with a "shutting down" error event."""
    app = build_app(files[0], device="cpu", model_name=BASE, log_stats_interval=0)
    engine = app.state.engine
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def story(n):
            return iter(c.chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=n, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))

        long, short = story(900), story(6)
        next(long), next(short)
        engine.drain(60)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
        assert list(short)[-1].usage.completion_tokens == 6  # finished within the grace period
        engine.drain(0)  # the grace period is over
        with pytest.raises(openai.APIError, match="shutting down"):
            list(long)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_api_features(files):
    """On the GPU host: the sampling extras, logprobs, grammar masks (plain torch ops on CUDA logits), n choices,
    chunked prefill and the metrics' GPU gauges with the model on cuda (experts on the CPU)."""
    ckpt, alpha, _ = files
    app = build_app(ckpt, {"alpha": str(alpha)}, device="cuda", dtype="float32", model_name=BASE,
                    chat_template=TOOL_TEMPLATE, prefill_chunk_tokens=16, log_stats_interval=0)
    with serve_in_thread(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "Pick a colour, please, and tell me why you like it"}]
        for model in (BASE, "alpha"):
            r = c.chat.completions.create(model=model, messages=msgs, temperature=0.8, seed=1, n=2, max_tokens=60,
                                          response_format={"type": "json_schema",
                                                           "json_schema": {"name": "pick", "schema": SCHEMA}},
                                          logprobs=True, top_logprobs=2, presence_penalty=0.5,
                                          extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
            for choice in r.choices:
                _check_schema(json.loads(choice.message.content))
                assert len(choice.logprobs.content) >= 1
            calls = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, ADD], temperature=0,
                                              tool_choice="required", parallel_tool_calls=False,
                                              max_tokens=150).choices[0].message.tool_calls
            assert calls and calls[0].function.name in ("get_weather", "add")
        comp = c.completions.create(model=BASE, prompt="Hello there", max_tokens=8, temperature=0, logprobs=2)
        assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens
        assert app.state.engine.stats["prefill_chunks"] > app.state.engine.stats["prefill_batches"]
        values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                  for s in f.samples}
        assert values["hybridmoe:gpu_memory_allocated_bytes"] > 0
