"""Fuzzing (hypothesis) of every reader of user input: the config loader (dicts, key=value overrides, YAML text),
the dataset readers (.json and .jsonl, then tokenization), the adapter reader (config values, tensor names, shapes
and dtypes, checked against a model) and the server's request schema. No input may end in anything but our own
one-line error (a HybridMoEError subclass) or, for the server, a 400 naming the parameter.

Example counts are modest (CI time); `HYPOTHESIS_PROFILE=deep` runs 20x as many (RELIABILITY.md has the counts)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hybridmoe.config import _FIELDS, load_config
from hybridmoe.data import SFTDataset, load_records
from hybridmoe.errors import AdapterError, ConfigError, DataError, HybridMoEError, NonFiniteError
from hybridmoe.experts import HybridExperts

from .helpers import make_checkpoint

SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def fuzz(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _one_line(e: Exception) -> None:
    assert isinstance(e, HybridMoEError) and str(e) and "\n" not in str(e), repr(e)


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)


# -- config --------------------------------------------------------------------------------------------------------
BASE = dict(model_name_or_path="m", dataset="d.jsonl", output_dir="o")
config_keys = st.sampled_from(sorted(_FIELDS)) | st.text(max_size=12)


@fuzz(80)
@given(extra=st.dictionaries(config_keys, json_values, max_size=4), keep_base=st.booleans())
def test_fuzz_config_dict(extra, keep_base):
    try:
        cfg = load_config({**(BASE if keep_base else {}), **extra})
    except ConfigError as e:
        _one_line(e)
        return
    for key in ("learning_rate", "num_train_epochs", "warmup_ratio", "weight_decay", "lora_dropout"):
        assert math.isfinite(getattr(cfg, key)), key  # whatever got through is a usable number


@fuzz(100)
@given(items=st.lists(st.tuples(config_keys, st.text(max_size=12)).map("=".join) | st.text(max_size=16), max_size=3))
def test_fuzz_config_overrides(items):
    try:
        load_config(dict(BASE), items)
    except ConfigError as e:
        _one_line(e)


@fuzz(60)
@given(text=st.text(max_size=120) | st.dictionaries(config_keys, json_values, max_size=4).map(
    lambda d: "\n".join(f"{k}: {json.dumps(v)}" for k, v in d.items())))
def test_fuzz_config_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        _one_line(e)


# -- datasets ------------------------------------------------------------------------------------------------------
texts = st.text(max_size=20)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_values, "content": texts | json_values}),
        max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "user"]) | json_values, "value": texts | json_values}),
        max_size=4)}, optional={"system": texts | json_values}),
    st.fixed_dictionaries({"instruction": texts | json_values, "output": texts | json_values},
                          optional={"input": texts | json_values, "system": texts | json_values,
                                    "history": st.lists(st.lists(texts | json_values, max_size=3), max_size=2)
                                    | json_values}),
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from hybridmoe.loading import load_tokenizer

    return load_tokenizer(make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("fuzz") / "m"))


def _read_and_tokenize(path, tokenizer) -> None:
    try:
        convs = load_records(path)
        ds = SFTDataset(convs, tokenizer, cutoff_len=32)
    except DataError as e:
        _one_line(e)
        return
    for i in range(len(ds)):
        ex = ds[i]
        assert len(ex["input_ids"]) == len(ex["labels"]) <= 32


@fuzz(60)
@given(body=st.lists(records, max_size=4).map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=40),
       raw=st.binary(max_size=12))
def test_fuzz_json_dataset(tmp_path, tokenizer, body, raw):
    path = tmp_path / "data.json"
    path.write_bytes(body.encode() + (raw if raw.startswith(b"\xff") else b""))
    _read_and_tokenize(path, tokenizer)


@fuzz(60)
@given(lines=st.lists(records.map(json.dumps) | st.text(max_size=30), max_size=4), raw=st.binary(max_size=8))
def test_fuzz_jsonl_dataset_and_tokenization(tmp_path, tokenizer, lines, raw):
    path = tmp_path / "data.jsonl"
    path.write_bytes("\n".join(lines).encode() + raw)
    _read_and_tokenize(path, tokenizer)


# -- adapters ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_model(tmp_path_factory):
    """The tiny model's structure on the meta device, as `export` checks an adapter against it."""
    from hybridmoe.export import _meta_model

    ckpt = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("fuzz_adapter") / "m")
    model = _meta_model(ckpt)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    experts = [n for n, m in model.named_modules() if isinstance(m, HybridExperts)]
    return model, linear, experts


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int8, torch.bool]


@st.composite
def adapters(draw, linear: list[str], experts: list[str]):
    """A PEFT-looking adapter: real or made-up module names, right or wrong shapes and dtypes, any config values."""
    tensors = {}
    for _ in range(draw(st.integers(1, 4))):
        mod = draw(st.sampled_from(linear + experts) | st.text(min_size=1, max_size=10))
        part = draw(st.sampled_from([".lora_A.weight", ".lora_B.weight", ".base_layer.lora_A.weight", ".weight",
                                     ".0.gate_proj.lora_A.weight"]))
        shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        value = draw(st.sampled_from([0.0, 1.0, float("nan")]))
        t = torch.full(shape, value).to(dtype)
        tensors[f"base_model.model.{mod}{part}"] = t
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    config.update(draw(st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "rank_pattern",
                                                        "alpha_pattern", "peft_type", "use_dora"]), json_values,
                                       max_size=2)))
    return config, tensors


def test_fuzz_adapter_against_the_model(tmp_path, meta_model):
    from hybridmoe.export import _read_deltas

    model, linear, experts = meta_model

    @fuzz(60)
    @given(adapter=adapters(linear, experts))
    def check(adapter):
        config, tensors = adapter
        d = tmp_path / "a"
        d.mkdir(exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        try:
            _read_deltas(d, model)
        except (AdapterError, NonFiniteError) as e:
            _one_line(e)

    check()


# -- the server's request schema -----------------------------------------------------------------------------------
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values,
     "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text") | json_values, "text": texts}),
                                 max_size=2) | json_values}), max_size=3)
request_keys = st.sampled_from(["temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                                "stream", "stream_options", "n", "presence_penalty", "frequency_penalty",
                                "logprobs", "user", "tools"])


@fuzz(100)
@given(body=st.fixed_dictionaries({"model": texts | json_values, "messages": messages | json_values})
       .flatmap(lambda b: st.dictionaries(request_keys, json_values, max_size=3).map(lambda x: {**b, **x}))
       | json_values)
def test_fuzz_chat_request(body):
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from hybridmoe.serve.errors import validation_error
    from hybridmoe.serve.schemas import ChatCompletionRequest

    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        # as FastAPI hands it to the app: the body's errors, located under "body"
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        api = validation_error(RequestValidationError(errors))
        assert api.status == 400 and api.message and "\n" not in api.message, api.message
        return
    assert all(isinstance(m.as_template_message()["content"], str) for m in req.messages)
    assert req.max_new_tokens is None or req.max_new_tokens >= 1


@pytest.fixture(scope="module")
def real_adapters(meta_model, tmp_path_factory):
    """Two valid adapters of the fuzzed model to mutate: hybridmoe's own (fused expert layout) and one in the
    per-expert layout (PEFT on transformers v4, KTransformers)."""
    from hybridmoe.adapters import adapter_config_dict, adapter_state_dict, apply_lora
    from hybridmoe.loading import load_model

    from .helpers import randomize_lora

    ckpt = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("fuzz_real") / "m")
    model = apply_lora(load_model(ckpt, device="cpu", progress=False), "all", rank=2, alpha=4, seed=0)
    randomize_lora(model, seed=1)
    fused = (adapter_config_dict(model), adapter_state_dict(model))
    cfg = model.config
    shapes = {"gate_proj": (cfg.hidden_size, cfg.moe_intermediate_size), "up_proj": (cfg.hidden_size, cfg.moe_intermediate_size),
              "down_proj": (cfg.moe_intermediate_size, cfg.hidden_size)}
    per = {f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}.lora_{ab}.weight":
           torch.ones((2, i) if ab == "A" else (o, 2))
           for layer in range(cfg.num_hidden_layers) for e in range(cfg.num_experts)
           for proj, (i, o) in shapes.items() for ab in "AB"}
    return [fused, ({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, per)]


_MUTATE = {"drop": lambda t: None, "int": lambda t: t.to(torch.int32), "bool": lambda t: t.bool(),
           "half": lambda t: t.half(), "nan": lambda t: t * float("nan"), "transpose": lambda t: t.mT.contiguous(),
           "flat": lambda t: t.reshape(-1), "rows": lambda t: t[:1].clone(),
           "scalar": lambda t: t.reshape(-1)[:1].reshape(()).clone(), "wider": lambda t: torch.cat([t, t], -1)}


def _mutate(t: torch.Tensor, how: str) -> torch.Tensor | None:
    try:
        return _MUTATE[how](t)
    except (RuntimeError, IndexError):  # not applicable to this tensor's shape (the test's own limit)
        return t


MUTATIONS = ["drop", "int", "bool", "half", "nan", "transpose", "flat", "rows", "scalar", "wider", "rename"]


def test_fuzz_mutated_real_adapters(tmp_path, meta_model, real_adapters):
    from hybridmoe.export import _read_deltas

    model = meta_model[0]

    @fuzz(60)
    @given(which=st.integers(0, 1), edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(MUTATIONS)),
                                                    min_size=1, max_size=3),
           config=st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "alpha_pattern"]), json_values,
                                  max_size=1))
    def check(which, edits, config):
        cfg, sd = real_adapters[which]
        sd, keys = dict(sd), sorted(sd)
        for i, how in edits:
            key = keys[i % len(keys)]
            if key not in sd:
                continue
            if how == "rename":
                sd[key.replace("layers.", "layers.9", 1)] = sd.pop(key)
            else:
                t = _mutate(sd.pop(key), how)
                if t is not None:
                    sd[key] = t
        if not sd:
            return
        d = tmp_path / "a"
        d.mkdir(exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
        try:
            _read_deltas(d, model)
        except (AdapterError, NonFiniteError) as e:
            _one_line(e)

    check()
