"""Data as LLaMA-Factory reads it: dataset_info.json names, columns/tags, tool calls, templates, the tokenize cache."""

from __future__ import annotations

import json
import logging

import pytest

from hybridmoe import tokenize_cache
from hybridmoe.data import IGNORE_INDEX, TokenizeOptions, tokenize_conversation
from hybridmoe.dataset_info import load_datasets, resolve, split_names
from hybridmoe.errors import ConfigError, DataError
from hybridmoe.templates import FORMATS, TEMPLATES, apply_template, check_template_name, detect_family
from hybridmoe.testing import build_tokenizer
from hybridmoe.train_data import split_eval

from .test_lf_compat import ALPACA, DATASET_INFO, GLAIVE, IDENTITY, write_lf_data


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def bare_tok():
    t = build_tokenizer()
    t.chat_template = None
    return t


def _dir(tmp_path, info=None, files=None):
    data = tmp_path / "data"
    write_lf_data(tmp_path)
    if info is not None:
        (data / "dataset_info.json").write_text(json.dumps({**DATASET_INFO, **info}))
    for name, records in (files or {}).items():
        (data / name).write_text(json.dumps(records))
    return data


# -- resolving `dataset` ------------------------------------------------------------------------------------------------


def test_names_with_spaces_resolve_through_dataset_info(tmp_path):
    data = _dir(tmp_path)
    assert split_names(" identity , alpaca_en_demo,") == ["identity", "alpaca_en_demo"]
    convs = load_datasets("identity, alpaca_en_demo", data)
    assert len(convs) == len(IDENTITY) + len(ALPACA)  # concatenated in order
    assert convs[0][0] == {"role": "user", "content": "hi"}
    assert convs[3][0] == {"role": "user", "content": "Sum up the numbers.\n3, 2, 5"}  # prompt + "\n" + query


def test_file_paths_comma_joined(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps(ALPACA))
    b.write_text("\n".join(json.dumps(r) for r in IDENTITY))
    assert len(load_datasets(f"{a}, {b}", tmp_path / "nowhere")) == 4


def test_unknown_name_suggests_the_closest(tmp_path):
    with pytest.raises(DataError, match="dataset 'identty' is neither in .*dataset_info.json nor a file; did you mean "
                                        "'identity'"):
        resolve("identty", _dir(tmp_path))


def test_hub_entry_is_one_line_naming_the_local_alternative(tmp_path):
    with pytest.raises(DataError) as info:
        resolve("alpaca_en", _dir(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg and "hf_hub_url: llamafactory/alpaca_en" in msg and "cannot fetch" in msg
    assert "huggingface-cli download --repo-type dataset llamafactory/alpaca_en" in msg and '"file_name"' in msg


def test_ranking_entry_is_refused(tmp_path):
    data = _dir(tmp_path, {"dpo": {"file_name": "identity.json", "ranking": True}})
    with pytest.raises(DataError, match="preference \\(ranking\\) dataset"):
        resolve("dpo", data)


def test_folder_file_name_reads_every_file(tmp_path):
    data = _dir(tmp_path, {"both": {"file_name": "parts"}})
    (data / "parts").mkdir()
    (data / "parts" / "1.json").write_text(json.dumps(IDENTITY))
    (data / "parts" / "2.json").write_text(json.dumps(ALPACA))
    assert len(load_datasets("both", data)) == 4


def test_columns_and_tags_mappings(tmp_path):
    alpaca = [{"question": "Q", "context": "C", "answer": "A", "sys": "S", "prior": [["q0", "a0"]]}]
    chat = [{"msgs": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A"}]}]
    data = _dir(tmp_path, {
        "mapped_alpaca": {"file_name": "ma.json", "columns": {"prompt": "question", "query": "context",
                                                               "response": "answer", "system": "sys",
                                                               "history": "prior"}},
        "mapped_chat": {"file_name": "mc.json", "formatting": "sharegpt", "columns": {"messages": "msgs"},
                        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}},
    }, {"ma.json": alpaca, "mc.json": chat})
    (a,) = load_datasets("mapped_alpaca", data)
    assert list(a) == [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                       {"role": "assistant", "content": "a0"}, {"role": "user", "content": "Q\nC"},
                       {"role": "assistant", "content": "A"}]
    (c,) = load_datasets("mapped_chat", data)
    assert [m["role"] for m in c] == ["system", "user", "assistant"]
    # a mapped column that the record lacks is named
    (data / "ma.json").write_text(json.dumps([{"question": "Q"}]))
    with pytest.raises(DataError, match=r"ma.json\[record 0\]: missing column 'answer'"):
        load_datasets("mapped_alpaca", data)


def test_max_samples_per_dataset_and_num_samples(tmp_path):
    data = _dir(tmp_path, {"five": {"file_name": "identity.json", "num_samples": 5}})
    assert len(load_datasets("identity, alpaca_en_demo", data, max_samples=1)) == 2
    five = load_datasets("five", data, seed=3)
    assert len(five) == 5 and {m[0]["content"] for m in five} == {"hi", "Who are you?"}  # all once, then repeats
    assert five == load_datasets("five", data, seed=3)


# -- mix_strategy: interleave_* (LLaMA-Factory hands these to datasets.interleave_datasets) -----------------------------


def _sources(tmp_path, lengths):
    """Alpaca files a.json, b.json, ... with records 'a0', 'a1', ...; their dataset_info.json."""
    data = tmp_path / "mix"
    data.mkdir()
    names = [chr(ord("a") + i) for i in range(len(lengths))]
    for name, n in zip(names, lengths):
        (data / f"{name}.json").write_text(json.dumps([{"instruction": f"{name}{k}", "output": "ok"}
                                                        for k in range(n)]))
    (data / "dataset_info.json").write_text(json.dumps({n: {"file_name": f"{n}.json"} for n in names}))
    return data, names


@pytest.mark.parametrize("probs", [None, [0.2, 0.5, 0.3], [0.0, 0.6, 0.4]])
@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over", "interleave_once"])
def test_interleave_is_datasets_interleave_datasets_record_for_record(tmp_path, strategy, probs):
    """The records and their order equal datasets.interleave_datasets' with LLaMA-Factory's stopping_strategy,
    probabilities and seed (datasets is not a dependency: the reference is only here)."""
    datasets = pytest.importorskip("datasets")
    if probs and probs[0] == 0 and strategy != "interleave_under":
        pytest.skip("probability 0 cannot exhaust a dataset: refused (test_interleave_probs_checked)")
    data, names = _sources(tmp_path, [3, 17, 8])
    stopping = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
                "interleave_once": "all_exhausted_without_replacement"}[strategy]
    for seed in (42, 7):
        got = [c[0]["content"] for c in load_datasets(", ".join(names), data, seed=seed, mix_strategy=strategy,
                                                       interleave_probs=probs)]
        parts = [datasets.Dataset.from_json(str(data / f"{n}.json")) for n in names]
        ref = datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy=stopping)
        assert got == ref["instruction"], (seed, got)
    if strategy == "interleave_once":
        assert sorted(got) == sorted(f"{n}{k}" for n, m in zip(names, [3, 17, 8]) for k in range(m))


@pytest.mark.parametrize("strategy", ["interleave_under", "interleave_over", "interleave_once"])
def test_interleave_order_over_many_draws(strategy):
    """Thousands of draws (several of numpy's blocks), a rare source: the same (source, index) order as datasets."""
    datasets = pytest.importorskip("datasets")
    from hybridmoe.mixing import STOPPING, interleave_order

    lengths, probs = [40, 1500, 25], [0.02, 0.9, 0.08]
    parts = [datasets.Dataset.from_dict({"s": [s] * n, "i": list(range(n))}) for s, n in enumerate(lengths)]
    ref = datasets.interleave_datasets(parts, probabilities=probs, seed=3, stopping_strategy=STOPPING[strategy])
    assert interleave_order(lengths, strategy, probs, seed=3) == list(zip(ref["s"], ref["i"]))


def test_interleave_seed_max_samples_and_a_single_dataset(tmp_path):
    data, names = _sources(tmp_path, [30, 30])
    spec = "a, b"
    one = load_datasets(spec, data, seed=1, mix_strategy="interleave_over", interleave_probs=[0.5, 0.5])
    assert one == load_datasets(spec, data, seed=1, mix_strategy="interleave_over", interleave_probs=[0.5, 0.5])
    assert one != load_datasets(spec, data, seed=2, mix_strategy="interleave_over", interleave_probs=[0.5, 0.5])
    # max_samples cuts each dataset first, as LLaMA-Factory's loader does before merging
    under = load_datasets(spec, data, max_samples=4, mix_strategy="interleave_under")
    assert [c[0]["content"] for c in under] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    assert load_datasets("a", data, mix_strategy="interleave_under") == load_datasets("a", data)


@pytest.mark.parametrize("cfg,match", [
    ({"interleave_probs": "0.5,0.5"}, "interleave_probs is only used with mix_strategy interleave_under"),
    ({"mix_strategy": "interleave_over", "interleave_probs": "0.5,0.3,0.2"}, "has 3 values but dataset names 2"),
    ({"mix_strategy": "interleave_over", "interleave_probs": "0.5,0.6"}, "sum to 1.1, not 1"),
    ({"mix_strategy": "interleave_over", "interleave_probs": "0.5,x"}, "not a comma list of numbers"),
    ({"mix_strategy": "interleave_under", "interleave_probs": "1.5,-0.5"}, "negative"),
    ({"mix_strategy": "interleave_under", "interleave_probs": [0.5, 0.5], "eval_dataset": "c, d"}, None),
    ({"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5", "eval_dataset": "c,d,e"},
     "but eval_dataset names 3"),
    ({"mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5", "eval_dataset": "c"},  # LF checks it too
     "but eval_dataset names 1"),
])
def test_interleave_probs_checked(cfg, match):
    from hybridmoe.config import load_config

    base = {"model_name_or_path": "m", "dataset": "a, b", "output_dir": "o"}
    if match is None:
        assert load_config({**base, **cfg}).interleave_probabilities() == [0.5, 0.5]
        one = {**base, "dataset": "a", "mix_strategy": "interleave_over", "interleave_probs": 1.0}
        assert load_config(one).interleave_probabilities() == [1.0]
        return
    with pytest.raises(ConfigError, match=match):
        load_config({**base, **cfg})


def test_interleave_refuses_what_datasets_cannot_do(tmp_path):
    data, names = _sources(tmp_path, [3, 5])
    with pytest.raises(ConfigError, match="dataset #1 has interleave_probs 0"):
        load_datasets("a, b", data, mix_strategy="interleave_over", interleave_probs=[0.0, 1.0])
    from hybridmoe.mixing import interleave_order

    with pytest.raises(ConfigError, match="dataset #2 of the list has no records"):
        interleave_order([3, 0], "interleave_under")


def test_val_size_split():
    convs = [[{"role": "user", "content": str(i)}] for i in range(10)]
    train, held = split_eval(convs, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8 and sorted(map(str, train + held)) == sorted(map(str, convs))
    assert split_eval(convs, 3, seed=1)[1] == split_eval(convs, 3, seed=1)[1] and len(split_eval(convs, 3, 1)[1]) == 3
    with pytest.raises(ConfigError, match="leaving none to train on"):
        split_eval(convs, 10, seed=1)


# -- tool calling -------------------------------------------------------------------------------------------------------


def test_glaive_records_become_openai_tool_messages(tmp_path):
    first, second = load_datasets("glaive_toolcall_en_demo", _dir(tmp_path))
    assert [m["role"] for m in first] == ["user", "assistant", "tool", "assistant"]
    assert first[1]["tool_calls"] == [{"type": "function", "function": {"name": "calculate_age",
                                                                        "arguments": {"birthdate": "1990-05-15"}}}]
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "calculate_age"
    assert second.tools[0]["function"]["name"] == "generate_random_name"


def test_tool_conversation_renders_with_the_qwen_format(tmp_path, bare_tok):
    (conv, _) = load_datasets("glaive_toolcall_en_demo", _dir(tmp_path))
    apply_template(bare_tok, "qwen3")
    ex = tokenize_conversation(bare_tok, conv, TokenizeOptions(4096))
    text = bare_tok.decode(ex["input_ids"])
    tool = json.dumps(conv.tools[0]["function"])
    expected = (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
        "provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": ' + tool + "}\n</tools>\n\nFor each function call, return a json object "
        "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        f"<|im_start|>user\n{GLAIVE[0]['conversations'][0]['value']}<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"age": 31}\n</tool_response><|im_end|>\n'
        f"<|im_start|>assistant\n{GLAIVE[0]['conversations'][3]['value']}<|im_end|>\n"
    )
    assert text == expected
    supervised = bare_tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert supervised == ('<tool_call>\n{"name": "calculate_age", "arguments": {"birthdate": "1990-05-15"}}\n'
                          f"</tool_call><|im_end|>{GLAIVE[0]['conversations'][3]['value']}<|im_end|>")


def test_tool_data_needs_a_template_that_renders_tools(tmp_path, tok):
    from hybridmoe.config import TrainConfig
    from hybridmoe.train_data import build_datasets

    _dir(tmp_path)
    cfg = TrainConfig(model_name_or_path="m", dataset="glaive_toolcall_en_demo", output_dir="o",
                      dataset_dir=str(tmp_path / "data")).validate()
    with pytest.raises(DataError, match="has tool calls, but the tokenizer's chat template does not render tools"):
        build_datasets(cfg, tok)


# -- templates ----------------------------------------------------------------------------------------------------------


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        check_template_name("llama2")
    for name in ("deepseek", "deepseek3", "qwen", "qwen3", "qwen3_nothink", "mistral", "llama3", "glm4", "gpt_oss"):
        assert name in str(info.value)


def test_template_disagreeing_with_the_tokenizer_warns_naming_both(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        apply_template(tok, "qwen3")
        assert not caplog.records  # ChatML: agrees
        apply_template(tok, "llama3")
    (rec,) = caplog.records
    assert "template 'llama3' (Llama 3" in rec.getMessage() and "renders ChatML" in rec.getMessage()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_bundled_templates_render_and_are_recognised(name):
    t = build_tokenizer()
    t.chat_template = None
    apply_template(t, name)
    assert detect_family(t) == TEMPLATES[name].family
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi friend"}]
    ex = tokenize_conversation(t, conv, TokenizeOptions(512))
    supervised = t.decode([x for x in ex["labels"] if x != IGNORE_INDEX])
    # labels: the reply and its end mark (a BPE token may carry the space before it)
    assert supervised.lstrip().startswith("Hi friend") and "Hello" not in supervised


def test_template_switches_reach_the_chat_template():
    t = build_tokenizer()
    t.chat_template = ("{%- if enable_thinking is defined and not enable_thinking %}NOTHINK{%- endif %}"
                       "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                       "{%- endfor %}")
    kwargs = apply_template(t, "qwen3_nothink")
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids = tokenize_conversation(t, conv, TokenizeOptions(512, kwargs, train_on_prompt=True))["input_ids"]
    assert t.decode(ids).startswith("NOTHINK") and apply_template(t, "qwen3") == {}


def test_mask_history_train_on_prompt_default_system(tok):
    conv = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "second"}]

    def supervised(**kw):
        ex = tokenize_conversation(tok, conv, TokenizeOptions(512, **kw))
        return tok.decode([x for x in ex["labels"] if x != IGNORE_INDEX]), ex

    assert supervised()[0] == "first<|im_end|>second<|im_end|>"
    assert supervised(mask_history=True)[0] == "second<|im_end|>"
    text, ex = supervised(train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(supervised(default_system="SYS")[1]["input_ids"]).startswith("<|im_start|>system\nSYS")
    assert set(FORMATS) >= {t.family for t in TEMPLATES.values()}


# -- tokenization: workers and the content-hash cache -------------------------------------------------------------------


def _convs(n):
    return [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
            for i in range(n)]


def test_workers_give_the_serial_result(tok, monkeypatch):
    monkeypatch.setattr(tokenize_cache, "MIN_PARALLEL", 1)
    monkeypatch.setattr(tokenize_cache.os, "cpu_count", lambda: 2)
    opts = TokenizeOptions(64)
    convs = _convs(40)
    assert tokenize_cache.tokenize_all(convs, tok, opts, workers=2) == tokenize_cache.tokenize_all(convs, tok, opts)


def test_cache_hit_overwrite_and_key(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDMOE_CACHE", str(tmp_path))
    opts, convs = TokenizeOptions(8), _convs(6)  # cutoff 8: some are truncated, the flag must survive the cache
    first = tokenize_cache.tokenize_cached(convs, tok, opts)
    assert any(e["truncated"] for e in first) and len(list((tmp_path / "tokenized").iterdir())) == 1

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenize_cache, "tokenize_all", boom)
    assert tokenize_cache.tokenize_cached(convs, tok, opts) == first  # a hit: nothing tokenized
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cache.tokenize_cached(convs, tok, opts, overwrite=True)
    with pytest.raises(AssertionError, match="tokenized again"):  # other content, options or template: other key
        tokenize_cache.tokenize_cached(_convs(7), tok, opts)
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cache.tokenize_cached(convs, tok, TokenizeOptions(9))


def test_eval_keys_without_an_eval_set_are_an_error(tmp_path, tok):
    from hybridmoe.config import TrainConfig
    from hybridmoe.train_data import build_datasets

    _dir(tmp_path)
    for key in ({"do_eval": True}, {"eval_strategy": "steps"}):
        cfg = TrainConfig(model_name_or_path="m", dataset="identity", output_dir="o", dataset_dir=str(tmp_path / "data"),
                          **key).validate()
        with pytest.raises(ConfigError, match="needs an eval set: set val_size"):
            build_datasets(cfg, tok)
