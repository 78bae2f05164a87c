"""SFT data: record formats, error locations, assistant-only labels, truncation/dropping, collation, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridmoe.data import (
    IGNORE_INDEX,
    SFTDataset,
    batches,
    collate,
    load_records,
    normalize_record,
    tokenize_conversation,
)
from hybridmoe.errors import ConfigError, DataError
from hybridmoe.testing.tokenizer import build_tokenizer

SYSTEM = "You are terse."
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
    {"role": "user", "content": "And  of Italy?"},
    {"role": "assistant", "content": " Rome is the capital. "},
]

OPENAI = {"messages": CONV}
SHAREGPT = {"system": SYSTEM, "conversations": [
    {"from": "human", "value": CONV[1]["content"]},
    {"from": "gpt", "value": CONV[2]["content"]},
    {"from": "user", "value": CONV[3]["content"]},
    {"from": "assistant", "value": CONV[4]["content"]},
]}
ALPACA = {"system": SYSTEM, "history": [[CONV[1]["content"], CONV[2]["content"]]],
          "instruction": "And ", "input": "of Italy?", "output": CONV[4]["content"]}
ALPACA_CONV = CONV[:3] + [{"role": "user", "content": "And \nof Italy?"}, CONV[4]]

# A ChatML template without {% generation %} markers: exercises the prefix-rendering fallback.
PLAIN_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def supervised_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_ids_and_roundtrip(tok, tmp_path):
    assert len(tok) <= 512
    assert (tok.bos_token, tok.bos_token_id) == ("<|begin_of_text|>", 0)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|end_of_text|>", 1, 1)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [2, 3]
    text = "Hello  world,\n  spaced   out — ünïcode! 123"
    assert tok.decode(tok(text)["input_ids"]) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == tok.chat_template
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_tokenizer_custom_texts_and_small_vocab():
    tok = build_tokenizer(["abc abc abd"] * 5, vocab_size=270)
    assert len(tok) <= 270
    assert tok.decode(tok("abd abc")["input_ids"]) == "abd abc"
    with pytest.raises(ValueError):
        build_tokenizer(vocab_size=100)


def test_chat_template_generation_prompt(tok):
    text = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{CONV[1]['content']}<|im_end|>\n"
                    "<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record,expected", [(OPENAI, CONV), (SHAREGPT, CONV), (ALPACA, ALPACA_CONV)],
                         ids=["openai", "sharegpt", "alpaca"])
@pytest.mark.parametrize("ext", [".json", ".jsonl"])
def test_formats(tmp_path, record, expected, ext):
    path = tmp_path / f"data{ext}"
    if ext == ".json":
        write_json(path, [record, record])
    else:
        write_jsonl(path, [json.dumps(record), "", "   ", json.dumps(record)])
    assert load_records(path) == [expected, expected]


def test_mixed_formats_and_minimal_records(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"instruction": "hi", "output": "hello"},
        {"instruction": "hi", "input": "", "output": "hello", "system": None, "history": []},
    ]
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert load_records(write_json(tmp_path / "d.json", records)) == [expected] * 4


def test_sharegpt_system_turn(tmp_path):
    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    assert normalize_record(record)[0] == {"role": "system", "content": "S"}


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

GOOD = json.dumps({"instruction": "q", "output": "a"})
BAD_RECORDS = [
    ({"text": "hello"}, "unknown record format (keys: text)"),
    ([1, 2], "expected a JSON object, got list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0]: missing field 'content'"),
    ({"messages": [{"content": "q"}]}, "messages[0]: missing field 'role'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
     "messages[1]: field 'content' must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text"}]}]},
     "messages[1]: field 'content' must be a string, got list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": []}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages[0]: unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
     "conversations[1]: function_call value is not JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[oops"},
     "field 'tools' is not JSON"),
    ({"messages": "hi"}, "field 'messages' must be a list, got str"),
    ({"messages": ["hi"]}, "messages[0]: expected an object"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "conversations[1]: unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
     "conversations[1]: missing field 'value'"),
    ({"conversations": [{"value": "q"}]}, "conversations[0]: missing field 'from'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
    ({"system": 5, "conversations": [{"from": "gpt", "value": "a"}]}, "field 'system' must be a string, got int"),
    ({"instruction": "q"}, "missing field 'output'"),
    ({"output": "a"}, "missing field 'instruction'"),
    ({"instruction": "q", "output": None}, "field 'output' must be a string, got NoneType"),
    ({"instruction": "q", "input": 7, "output": "a"}, "field 'input' must be a string, got int"),
    ({"instruction": "q", "output": "a", "history": [["x"]]}, "history[0]: expected a [query, answer] pair"),
    ({"instruction": "q", "output": "a", "history": [["x", 1]]}, "history[0]: assistant text must be a string"),
    ({"instruction": "q", "output": "a", "history": "x"}, "field 'history' must be a list"),
]


def _one_line_error(path) -> str:
    with pytest.raises(DataError) as info:
        load_records(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("record,problem", BAD_RECORDS, ids=[p for _, p in BAD_RECORDS])
def test_bad_record_jsonl_names_line(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, json.dumps(record), GOOD])
    message = _one_line_error(path)
    assert message.startswith(f"{path}:4: ")
    assert problem in message


@pytest.mark.parametrize("record,problem", BAD_RECORDS, ids=[p for _, p in BAD_RECORDS])
def test_bad_record_json_names_record(tmp_path, record, problem):
    path = write_json(tmp_path / "d.json", [json.loads(GOOD), json.loads(GOOD), record])
    message = _one_line_error(path)
    assert message.startswith(f"{path}[record 2]: ")
    assert problem in message


def test_invalid_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", '{"instruction": "q", "output": '])
    message = _one_line_error(path)
    assert message.startswith(f"{path}:3: invalid JSON")

    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction": oops}\n]\n')
    message = _one_line_error(path)
    assert message.startswith(f"{path}:3: invalid JSON")


def test_json_not_a_list(tmp_path):
    message = _one_line_error(write_json(tmp_path / "d.json", json.loads(GOOD)))
    assert message.startswith(f"{tmp_path / 'd.json'}: expected a JSON list")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", "[]")])
def test_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert "empty" in _one_line_error(path)


def test_missing_file_and_bad_extension(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert _one_line_error(missing) == f"{missing}: dataset file not found"
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    assert "unsupported dataset extension '.csv'" in _one_line_error(csv)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "\xff\xfe", "output": "a"}\n')
    assert "not UTF-8" in _one_line_error(path)


# ---------------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------------


def test_assistant_only_labels(tok):
    ex = tokenize_conversation(tok, CONV, cutoff_len=10_000)
    assert not ex["truncated"]
    assert len(ex["input_ids"]) == len(ex["labels"])
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(CONV, tokenize=False)
    assert supervised_text(tok, ex) == "Paris, of course.<|im_end|> Rome is the capital. <|im_end|>"
    for token, label in zip(ex["input_ids"], ex["labels"]):
        assert label in (token, IGNORE_INDEX)
    # Each supervised run ends with <|im_end|> (the model learns to stop); the last token ("\n") is not supervised.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    runs_end = [i for i in range(len(ex["labels"]) - 1)
                if ex["labels"][i] != IGNORE_INDEX and ex["labels"][i + 1] == IGNORE_INDEX]
    assert [ex["input_ids"][i] for i in runs_end] == [im_end, im_end]
    assert ex["labels"][-1] == IGNORE_INDEX


def test_prefix_fallback_matches_generation_markers(tok):
    marked = tokenize_conversation(tok, CONV, cutoff_len=10_000)
    plain_tok = build_tokenizer()
    plain_tok.chat_template = PLAIN_CHATML
    out = plain_tok.apply_chat_template(CONV, return_dict=True, return_assistant_tokens_mask=True)
    assert not any(out["assistant_masks"])  # the fallback is really needed
    plain = tokenize_conversation(plain_tok, CONV, cutoff_len=10_000)
    assert plain == marked


def test_tokenizer_without_template(tok):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat_template; pass a chat template"):
        tokenize_conversation(bare, CONV, cutoff_len=64)
    with pytest.raises(DataError, match="pass a chat template"):
        SFTDataset([CONV], bare, cutoff_len=64)


def test_truncation_keeps_beginning(tok):
    full = tokenize_conversation(tok, CONV, cutoff_len=10_000)
    cut = tokenize_conversation(tok, CONV, cutoff_len=30)
    assert cut["truncated"]
    assert cut["input_ids"] == full["input_ids"][:30]
    assert cut["labels"] == full["labels"][:30]
    exact = tokenize_conversation(tok, CONV, cutoff_len=len(full["input_ids"]))
    assert not exact["truncated"]


def test_dataset_summary_truncation_and_dropping(tok):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long_prompt = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 100}]
    ds = SFTDataset([short, long_prompt, long_reply], tok, cutoff_len=40)
    s = ds.summary()
    assert s["examples"] == len(ds) == 2
    assert s["dropped"] == 1  # long_prompt: no assistant token survives the cut
    assert s["truncated"] == 1  # long_reply: kept, cut
    assert s["tokens"] == sum(len(e["input_ids"]) for e in ds.examples)
    assert s["supervised_tokens"] == sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in ds.examples)
    assert len(ds[1]["input_ids"]) == 40
    assert supervised_text(tok, ds[0]) == "yo<|im_end|>"


def test_all_dropped_error(tok):
    with pytest.raises(DataError, match="cutoff_len 5 is too small to keep any assistant token"):
        SFTDataset([CONV, CONV], tok, cutoff_len=5)


def test_bad_cutoff_len(tok):
    with pytest.raises(ConfigError, match="cutoff_len"):
        SFTDataset([CONV], tok, cutoff_len=0)


def test_from_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(OPENAI), json.dumps(ALPACA)])
    ds = SFTDataset.from_file(path, tok, cutoff_len=512)
    assert len(ds) == 2 and ds.summary()["dropped"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Collation and batching
# ---------------------------------------------------------------------------------------------------------------


def test_collate_right_pads():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_deterministic_and_complete():
    data = list(range(10))
    first = batches(data, batch_size=3, seed=7, epoch=0)
    assert first == batches(data, batch_size=3, seed=7, epoch=0)
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == data
    second = batches(data, batch_size=3, seed=7, epoch=1)
    assert second != first and sorted(i for b in second for i in b) == data
    assert batches(data, batch_size=3, seed=8, epoch=0) != first
    # Independent of global RNG state: resuming at (epoch, batch) sees the same batches.
    torch.manual_seed(123)
    assert batches(data, batch_size=3, seed=7, epoch=1) == second
    with pytest.raises(ConfigError):
        batches(data, batch_size=0, seed=0, epoch=0)
