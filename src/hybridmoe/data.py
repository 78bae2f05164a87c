"""SFT data: load chat records (OpenAI / ShareGPT / alpaca), tokenize with the chat template, batch.

Every record becomes a :data:`Conversation`, a list of ``{"role": "system"|"user"|"assistant", "content": str}``.
Labels are the input ids on assistant tokens (as marked by the chat template's ``{% generation %}`` blocks, or by
rendering prefixes when the template has none) and -100 everywhere else.

Malformed input raises :class:`~hybridmoe.errors.DataError` with one line that starts with where the problem is:
``file.jsonl:LINE`` (1-based line) for JSON Lines, ``file.json[record N]`` (0-based index into the top-level list)
for JSON, ``file.json:LINE`` for JSON that does not parse.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError

Conversation = list[dict[str, str]]
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
EXTENSIONS = (".json", ".jsonl")


class _RecordError(Exception):
    """A problem inside one record; :func:`load_records` prefixes it with the record's location."""


# ----------------------------------------------------------------------------------------------------------------
# Record normalisation
# ----------------------------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 40) -> str:
    """A one-line, length-limited repr for error messages."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_str(obj: dict, key: str, where: str) -> str:
    """``obj[key]``, which must exist and be a string."""
    if key not in obj:
        raise _RecordError(f"{where}missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _RecordError(f"{where}field '{key}' must be a string, got {type(value).__name__}")
    return value


def _optional_str(obj: dict, key: str, where: str = "") -> str | None:
    """``obj[key]`` if present and not None (then it must be a string), else None."""
    if obj.get(key) is None:
        return None
    return _require_str(obj, key, where)


def _require_list(obj: dict, key: str) -> list:
    """``obj[key]``, which must exist and be a list."""
    if key not in obj:
        raise _RecordError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, list):
        raise _RecordError(f"field '{key}' must be a list, got {type(value).__name__}")
    return value


def _turns(record: dict, list_key: str, role_key: str, content_key: str, roles: dict[str, str]) -> Conversation:
    """The turns of `record[list_key]`, each an object whose `role_key` (mapped through `roles`) and `content_key`
    give one message."""
    messages: Conversation = []
    for i, turn in enumerate(_require_list(record, list_key)):
        where = f"{list_key}[{i}]: "
        if not isinstance(turn, dict):
            raise _RecordError(f"{where}expected an object with '{role_key}' and '{content_key}', "
                               f"got {type(turn).__name__}")
        role = _require_str(turn, role_key, where)
        if role not in roles:
            raise _RecordError(f"{where}unknown role {_short(role)}; expected one of {', '.join(roles)}")
        messages.append({"role": roles[role], "content": _require_str(turn, content_key, where)})
    return messages


def _from_openai(record: dict) -> Conversation:
    """OpenAI ``{"messages": [{"role", "content"}, ...]}``."""
    return _turns(record, "messages", "role", "content", {r: r for r in ROLES})


def _from_sharegpt(record: dict) -> Conversation:
    """ShareGPT ``{"conversations": [{"from", "value"}, ...], "system"?}``."""
    system = _optional_str(record, "system")
    head: Conversation = [{"role": "system", "content": system}] if system is not None else []
    return head + _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)


def _alpaca_history(record: dict) -> Conversation:
    """Alpaca ``"history": [[query, answer], ...]`` as alternating user/assistant messages."""
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise _RecordError(f"field 'history' must be a list of [query, answer] pairs, got {type(history).__name__}")
    messages: Conversation = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _RecordError(f"history[{i}]: expected a [query, answer] pair, got {_short(pair)}")
        for role, text in zip(("user", "assistant"), pair):
            if not isinstance(text, str):
                raise _RecordError(f"history[{i}]: {role} text must be a string, got {type(text).__name__}")
            messages.append({"role": role, "content": text})
    return messages


def _from_alpaca(record: dict) -> Conversation:
    """Alpaca ``{"instruction", "input"?, "output", "system"?, "history"?}``; input is appended to the instruction."""
    instruction = _require_str(record, "instruction", "")
    extra = _optional_str(record, "input")
    output = _require_str(record, "output", "")
    system = _optional_str(record, "system")
    messages: Conversation = [] if system is None else [{"role": "system", "content": system}]
    messages += _alpaca_history(record)
    query = f"{instruction}\n{extra}" if extra else instruction
    messages.append({"role": "user", "content": query})
    messages.append({"role": "assistant", "content": output})
    return messages


def normalize_record(record: Any) -> Conversation:
    """Turn one OpenAI / ShareGPT / alpaca record into a :data:`Conversation` (format auto-detected).

    Raises:
        DataError: without a location prefix; :func:`load_records` adds it.
    """
    try:
        return _normalize(record)
    except _RecordError as e:
        raise DataError(str(e)) from None


def _normalize(record: Any) -> Conversation:
    """:func:`normalize_record`, raising :class:`_RecordError`."""
    if not isinstance(record, dict):
        raise _RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _from_openai(record)
    elif "conversations" in record:
        messages = _from_sharegpt(record)
    elif "instruction" in record or "output" in record:
        messages = _from_alpaca(record)
    else:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise _RecordError(f"unknown record format (keys: {keys}); expected 'messages' (OpenAI), "
                           "'conversations' (ShareGPT) or 'instruction'/'output' (alpaca)")
    if not any(m["role"] == "assistant" for m in messages):
        raise _RecordError("no assistant turn (nothing to train on)")
    return messages


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _check_path(path: Path) -> None:
    """The dataset file must exist and have a supported extension."""
    if path.suffix.lower() not in EXTENSIONS:
        raise DataError(f"{path}: unsupported dataset extension {path.suffix or '(none)'!r}; use .json or .jsonl")
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")


def _read_jsonl(path: Path) -> list[Conversation]:
    """One record per non-blank line."""
    conversations: list[Conversation] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            try:
                conversations.append(_normalize(record))
            except _RecordError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    return conversations


def _read_json(path: Path) -> list[Conversation]:
    """A top-level list of records."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, got {type(data).__name__} "
                        "(use .jsonl for one record per line)")
    conversations: list[Conversation] = []
    for index, record in enumerate(data):
        try:
            conversations.append(_normalize(record))
        except _RecordError as e:
            raise DataError(f"{path}[record {index}]: {e}") from None
    return conversations


def load_records(path: str | Path) -> list[Conversation]:
    """Read a ``.json`` (list of records) or ``.jsonl`` (one record per line) dataset into conversations.

    Raises:
        DataError: missing file, unsupported extension, invalid JSON, a malformed record, or no records at all.
    """
    path = Path(path)
    _check_path(path)
    try:
        conversations = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_json(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not conversations:
        raise DataError(f"{path}: the dataset is empty (no records)")
    return conversations


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------


def _check_chat_template(tokenizer) -> None:
    """Training needs the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat_template; pass a chat template (set tokenizer.chat_template or "
                        "add chat_template.jinja to the tokenizer directory)")


def _render(tokenizer, messages: Conversation, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_char_spans(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character span of each assistant turn, found by rendering prefixes.

    The span of turn i is what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with a generation prompt,
    minus trailing whitespace (the separator after the end-of-turn token is not generated).
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError("cannot find the assistant tokens: the chat template has no {% generation %} markers "
                            "and renders a conversation's prefixes inconsistently; pass a chat template with "
                            "{% generation %}...{% endgeneration %} around assistant content")
        end = len(before) + len(upto[len(before):].rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def _mask_from_prefixes(tokenizer, messages: Conversation) -> tuple[list[int], list[int]]:
    """Input ids and assistant mask for templates without generation markers (prefix rendering + offsets)."""
    text, spans = _assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _mask_from_template(tokenizer, messages: Conversation) -> tuple[list[int], list[int]]:
    """Input ids and assistant mask from the template's ``{% generation %}`` markers (all zero without them)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


def tokenize_conversation(tokenizer, messages: Conversation, cutoff_len: int) -> dict[str, Any]:
    """Tokenize one conversation with the chat template; labels are -100 except on assistant tokens.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``, cut to the first `cutoff_len` tokens.
    """
    _check_chat_template(tokenizer)
    input_ids, mask = _mask_from_template(tokenizer, messages)
    if not any(mask) and any(m["role"] == "assistant" for m in messages):
        input_ids, mask = _mask_from_prefixes(tokenizer, messages)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, mask)]
    truncated = len(input_ids) > cutoff_len
    return {"input_ids": input_ids[:cutoff_len], "labels": labels[:cutoff_len], "truncated": truncated}


def _tokenize_record(tokenizer, messages: Conversation, cutoff_len: int, index: int) -> dict[str, Any]:
    """:func:`tokenize_conversation`, turning a chat-template failure into a DataError naming the record."""
    from jinja2 import TemplateError

    try:
        return tokenize_conversation(tokenizer, messages, cutoff_len)
    except TemplateError as e:
        message = str(e).replace("\n", " ")
        raise DataError(f"record {index}: the chat template rejected this conversation: {message}") from None


# ----------------------------------------------------------------------------------------------------------------
# Dataset, batching, collation
# ----------------------------------------------------------------------------------------------------------------


class SFTDataset:
    """Tokenized SFT examples (``input_ids``/``labels`` lists); examples with no supervised token are dropped.

    Raises:
        DataError: when every example is dropped (cutoff_len too small), or from tokenization.
        ConfigError: when cutoff_len is not a positive integer.
    """

    def __init__(self, conversations: Sequence[Conversation], tokenizer, cutoff_len: int):
        if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
            raise ConfigError(f"cutoff_len must be a positive integer, got {cutoff_len!r}")
        _check_chat_template(tokenizer)
        self.cutoff_len = cutoff_len
        self.examples: list[dict[str, list[int]]] = []
        self.truncated = 0
        self.dropped = 0
        for index, messages in enumerate(conversations):
            self._add(_tokenize_record(tokenizer, messages, cutoff_len, index))
        if conversations and not self.examples:
            raise DataError(f"cutoff_len {cutoff_len} is too small to keep any assistant token: all "
                            f"{len(conversations)} examples were dropped; raise cutoff_len")

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, cutoff_len: int) -> SFTDataset:
        """Load and tokenize a dataset file (see :func:`load_records`)."""
        return cls(load_records(path), tokenizer, cutoff_len)

    def _add(self, example: dict[str, Any]) -> None:
        """Keep `example` unless truncation left it without supervised tokens."""
        if all(label == IGNORE_INDEX for label in example["labels"]):
            self.dropped += 1
            return
        self.truncated += int(example["truncated"])
        self.examples.append({"input_ids": example["input_ids"], "labels": example["labels"]})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]

    def summary(self) -> dict[str, int]:
        """Counts over kept examples (``truncated`` counts kept ones that were cut), plus ``dropped``."""
        return {
            "examples": len(self.examples),
            "tokens": sum(len(e["input_ids"]) for e in self.examples),
            "supervised_tokens": sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in self.examples),
            "truncated": self.truncated,
            "dropped": self.dropped,
        }


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: ``input_ids`` (pad_id), ``attention_mask``, ``labels`` (-100)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(dataset: Sequence[Any], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches for one epoch, a pure function of (len(dataset), batch_size, seed, epoch).

    The permutation comes from a ``torch.Generator`` seeded with ``seed + epoch``, so training resumed at
    (epoch, batch) sees exactly the batches it would have seen. The last batch may be smaller.
    """
    if batch_size < 1:
        raise ConfigError(f"per_device_train_batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
