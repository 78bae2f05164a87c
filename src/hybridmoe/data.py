"""SFT data: load chat records (OpenAI / ShareGPT / alpaca), tokenize with the chat template, batch.

Every record becomes a :data:`Conversation`, a list of ``{"role": "system"|"user"|"assistant", "content": str}``.
Labels are the input ids on assistant tokens (as marked by the chat template's ``{% generation %}`` blocks, or by
rendering prefixes when the template has none) and -100 everywhere else.

Malformed input raises :class:`~hybridmoe.errors.DataError` with one line that starts with where the problem is:
``file.jsonl:LINE`` (1-based line) for JSON Lines, ``file.json[record N]`` (0-based index into the top-level list)
for JSON, ``file.json:LINE`` for JSON that does not parse.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError


class Conversation(list):
    """A list of ``{"role", "content"}`` messages (``role`` system/user/assistant/tool; an assistant message may
    carry OpenAI ``tool_calls`` instead of content) and the JSON schemas of the `tools` the conversation may call
    (None without tools); both go to the chat template."""

    tools: list[dict] | None = None


IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT roles, LLaMA-Factory's tool roles included: `function_call` is an assistant turn whose value is a JSON
# call (or list of calls), `observation` the tool's answer.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "function_call", "observation": "tool"}
EXTENSIONS = (".json", ".jsonl")


class _RecordError(Exception):
    """A problem inside one record; :func:`load_records` prefixes it with the record's location."""


RecordError = _RecordError  # for converters passed to load_records


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
    messages = Conversation()
    for i, turn in enumerate(_require_list(record, list_key)):
        where = f"{list_key}[{i}]: "
        if not isinstance(turn, dict):
            raise _RecordError(f"{where}expected an object with '{role_key}' and '{content_key}', "
                               f"got {type(turn).__name__}")
        role = _require_str(turn, role_key, where)
        if role not in roles:
            raise _RecordError(f"{where}unknown role {_short(role)}; expected one of {', '.join(roles)}")
        role = roles[role]
        if role == "function_call":
            calls = _parse_calls(_require_str(turn, content_key, where), where)
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif role == "assistant" and turn.get("tool_calls") is not None:  # OpenAI: the calls replace the content
            content = turn.get(content_key) or ""
            if not isinstance(content, str):
                raise _RecordError(f"{where}field '{content_key}' must be a string, got {type(content).__name__}")
            calls = [_openai_call(c, f"{where}tool_calls[{k}]: ") for k, c in enumerate(_require_list(turn, "tool_calls"))]
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        else:
            messages.append({"role": role, "content": _require_str(turn, content_key, where)})
    return messages


def _call(name: Any, arguments: Any, where: str) -> dict:
    """One tool call in the OpenAI message layout the chat templates read."""
    if not isinstance(name, str):
        raise _RecordError(f"{where}a tool call needs a string 'name', got {_short(name)}")
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string; templates print objects
        with contextlib.suppress(json.JSONDecodeError):  # not JSON: passed on as the text it is
            arguments = json.loads(arguments)
    return {"type": "function", "function": {"name": name, "arguments": arguments if arguments is not None else {}}}


def _parse_calls(value: str, where: str) -> list[dict]:
    """A ShareGPT `function_call` value: ``{"name", "arguments"}`` as JSON, or a JSON list of them."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise _RecordError(f"{where}function_call value is not JSON ({e.msg}); expected "
                           '{"name": ..., "arguments": {...}}') from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) for c in calls):
        raise _RecordError(f"{where}function_call value must be a JSON object with 'name' and 'arguments' (or a list)")
    return [_call(c.get("name"), c.get("arguments"), where) for c in calls]


def _openai_call(call: Any, where: str) -> dict:
    """An OpenAI ``{"type": "function", "function": {"name", "arguments"}}`` entry (or a bare ``{"name", ...}``)."""
    if not isinstance(call, dict):
        raise _RecordError(f"{where}expected an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise _RecordError(f"{where}field 'function' must be an object")
    return _call(fn.get("name"), fn.get("arguments"), where)


def _tools(record: dict) -> list[dict] | None:
    """The `tools` field: function schemas as a JSON string (LLaMA-Factory) or a list; None when absent/empty."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise _RecordError(f"field 'tools' is not JSON ({e.msg})") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _RecordError("field 'tools' must be a list of function schemas")
    # transformers takes {"type": "function", "function": schema}; LLaMA-Factory's data holds bare schemas
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in tools]


def _from_openai(record: dict) -> Conversation:
    """OpenAI ``{"messages": [{"role", "content"}, ...]}``."""
    return _turns(record, "messages", "role", "content", {r: r for r in ROLES})


def _from_sharegpt(record: dict) -> Conversation:
    """ShareGPT ``{"conversations": [{"from", "value"}, ...], "system"?}``."""
    system = _optional_str(record, "system")
    messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


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
    messages = Conversation([] if not system else [{"role": "system", "content": system}])
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
    messages.tools = _tools(record)
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


def _read_jsonl(path: Path, convert: Callable[[Any], Conversation]) -> list[Conversation]:
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
                conversations.append(convert(record))
            except _RecordError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
    return conversations


def _read_json(path: Path, convert: Callable[[Any], Conversation]) -> list[Conversation]:
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
            conversations.append(convert(record))
        except _RecordError as e:
            raise DataError(f"{path}[record {index}]: {e}") from None
    return conversations


def load_records(path: str | Path, convert: Callable[[Any], Conversation] | None = None) -> list[Conversation]:
    """Read a ``.json`` (list of records) or ``.jsonl`` (one record per line) dataset into conversations.

    convert: record -> Conversation, raising :class:`RecordError` (default: the format is detected per record);
    :mod:`hybridmoe.dataset_info` passes one that applies a dataset_info.json entry's columns and tags.

    Raises:
        DataError: missing file, unsupported extension, invalid JSON, a malformed record, or no records at all.
    """
    path = Path(path)
    _check_path(path)
    convert = convert or _normalize
    try:
        conversations = _read_jsonl(path, convert) if path.suffix.lower() == ".jsonl" else _read_json(path, convert)
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


@dataclass
class TokenizeOptions:
    """How conversations become ids and labels (LLaMA-Factory's data keys of the same names)."""

    cutoff_len: int
    template_kwargs: dict = field(default_factory=dict)  # extra chat-template arguments, e.g. enable_thinking
    default_system: str | None = None  # inserted where a conversation has no system message
    train_on_prompt: bool = False  # labels on every token, not only the assistant's
    mask_history: bool = False  # labels only on the last assistant turn


def _render(tokenizer, messages: Conversation, add_generation_prompt: bool, **kwargs) -> str:
    """The chat template's text for `messages` (kwargs: tools and template switches)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def _assistant_char_spans(tokenizer, messages: Conversation, **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character span of each assistant turn, found by rendering prefixes.

    The span of turn i is what ``messages[:i+1]`` adds to ``messages[:i]`` rendered with a generation prompt,
    minus trailing whitespace (the separator after the end-of-turn token is not generated).
    """
    text = _render(tokenizer, messages, add_generation_prompt=False, **kwargs)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, **kwargs) if i else ""
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, **kwargs)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError("cannot find the assistant tokens: the chat template has no {% generation %} markers "
                            "and renders a conversation's prefixes inconsistently; pass a chat template with "
                            "{% generation %}...{% endgeneration %} around assistant content")
        end = len(before) + len(upto[len(before):].rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def _mask_from_prefixes(tokenizer, messages: Conversation, **kwargs) -> tuple[list[int], list[int]]:
    """Input ids and assistant mask for templates without generation markers (prefix rendering + offsets)."""
    text, spans = _assistant_char_spans(tokenizer, messages, **kwargs)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(start < span_end and end > span_start for span_start, span_end in spans))
            for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _mask_from_template(tokenizer, messages: Conversation, **kwargs) -> tuple[list[int], list[int]]:
    """Input ids and assistant mask from the template's ``{% generation %}`` markers (all zero without them)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        **kwargs)
    return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]


def _last_run(mask: list[int]) -> list[int]:
    """Only the last contiguous run of ones (the last assistant turn) stays set."""
    out = [0] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


def tokenize_conversation(tokenizer, messages: Conversation, cutoff_len: int | TokenizeOptions) -> dict[str, Any]:
    """Tokenize one conversation with the chat template (and its tools); labels are -100 except on assistant tokens.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``, cut to the first `cutoff_len` tokens.
    """
    opt = cutoff_len if isinstance(cutoff_len, TokenizeOptions) else TokenizeOptions(cutoff_len)
    _check_chat_template(tokenizer)
    kwargs = dict(opt.template_kwargs)
    tools = getattr(messages, "tools", None)
    if tools:
        kwargs["tools"] = tools
    if opt.default_system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": opt.default_system}, *messages]
    input_ids, mask = _mask_from_template(tokenizer, messages, **kwargs)
    if not any(mask) and any(m["role"] == "assistant" for m in messages):
        input_ids, mask = _mask_from_prefixes(tokenizer, messages, **kwargs)
    if opt.mask_history:
        mask = _last_run(mask)
    if opt.train_on_prompt:
        mask = [1] * len(input_ids)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, mask)]
    truncated = len(input_ids) > opt.cutoff_len
    return {"input_ids": input_ids[: opt.cutoff_len], "labels": labels[: opt.cutoff_len], "truncated": truncated}


def _tokenize_record(tokenizer, messages: Conversation, options: int | TokenizeOptions, index: int) -> dict[str, Any]:
    """:func:`tokenize_conversation`, turning a chat-template failure into a DataError naming the record."""
    from jinja2 import TemplateError

    try:
        return tokenize_conversation(tokenizer, messages, options)
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

    def __init__(self, conversations: Sequence[Conversation], tokenizer, cutoff_len: int | TokenizeOptions,
                 tokenized: Sequence[dict[str, Any]] | None = None):
        """tokenized: the examples already tokenized (by :mod:`hybridmoe.tokenize_cache`: worker processes and a
        cache), one per conversation in order; None tokenizes here, in this process."""
        opt = cutoff_len if isinstance(cutoff_len, TokenizeOptions) else None
        cutoff_len = opt.cutoff_len if opt is not None else cutoff_len
        if isinstance(cutoff_len, bool) or not isinstance(cutoff_len, int) or cutoff_len < 1:
            raise ConfigError(f"cutoff_len must be a positive integer, got {cutoff_len!r}")
        _check_chat_template(tokenizer)
        self.cutoff_len = cutoff_len
        self.examples: list[dict[str, list[int]]] = []
        self.truncated = 0
        self.dropped = 0
        if tokenized is None:
            tokenized = (_tokenize_record(tokenizer, m, opt or cutoff_len, i) for i, m in enumerate(conversations))
        for example in tokenized:
            self._add(example)
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
