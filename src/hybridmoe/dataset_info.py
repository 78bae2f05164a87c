"""`dataset:` as LLaMA-Factory reads it: a comma list of names from ``dataset_dir/dataset_info.json``, or of files.

Each name is looked up in ``dataset_info.json`` (default ``dataset_dir: data``); its entry says where the records
are (``file_name``: a .json/.jsonl file or a folder of them, relative to dataset_dir) and how to read them:

- ``formatting``: ``alpaca`` (default), ``sharegpt`` or ``openai``;
- ``columns``: which record field holds what (alpaca: prompt, query, response, history, system, tools; sharegpt /
  openai: messages, system, tools);
- ``tags`` (sharegpt / openai): the turn's role and content keys and the role values (user_tag, assistant_tag,
  observation_tag, function_tag, system_tag);
- ``num_samples``: that many records, drawn with the seed (with repetition when more than the file has).

An item that is not a name there but an existing path (or ends in .json/.jsonl) is read as a file, its format
detected per record (see :mod:`hybridmoe.data`). Entries on a hub (``hf_hub_url``, ``ms_hub_url``, ``om_hub_url``,
``script_url``, ``cloud_file_name``) are refused with one line: hybridmoe does not download.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import EXTENSIONS, Conversation, RecordError, _normalize, _optional_str, _tools, _turns, load_records
from .errors import DataError
from .mixing import check_probs, interleave

log = logging.getLogger("hybridmoe")

DATA_CONFIG = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
FORMATTINGS = ("alpaca", "sharegpt", "openai")


@dataclass
class DatasetSource:
    name: str  # as written in `dataset:`
    files: list[Path]
    entry: dict | None  # its dataset_info.json entry; None: a file named directly (format detected per record)


def split_names(spec: str | list | None) -> list[str]:
    """``"identity, alpaca_en_demo"`` -> ``["identity", "alpaca_en_demo"]`` (spaces allowed, empty items dropped)."""
    if not spec:
        return []
    items = spec if isinstance(spec, list) else str(spec).split(",")
    return [str(s).strip() for s in items if str(s).strip()]


def find_dataset_dir(dataset_dir: str, config_dir: str | None) -> Path:
    """dataset_dir as LLaMA-Factory resolves it (from the working directory), else beside the YAML that names it."""
    path = Path(dataset_dir).expanduser()
    if path.is_absolute() or path.is_dir() or config_dir is None:
        return path
    beside = Path(config_dir) / path
    return beside if beside.is_dir() else path


def read_dataset_info(dataset_dir: Path) -> dict[str, Any] | None:
    """The parsed dataset_info.json of dataset_dir, or None when there is none."""
    path = dataset_dir / DATA_CONFIG
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: expected an object of dataset names, got {type(info).__name__}")
    return info


def resolve(spec: str, dataset_dir: Path) -> list[DatasetSource]:
    """The sources of a `dataset:` / `eval_dataset:` value, in order."""
    info = read_dataset_info(dataset_dir)
    sources = []
    for name in split_names(spec):
        if info is not None and name in info:
            sources.append(_from_entry(name, info[name], dataset_dir))
            continue
        path = Path(name).expanduser()
        if not path.exists() and (dataset_dir / name).exists():
            path = dataset_dir / name
        if path.exists() or path.suffix.lower() in EXTENSIONS or "/" in name:
            sources.append(DatasetSource(name, _files(path, name), None))
            continue
        raise DataError(_unknown_name(name, info, dataset_dir))
    if not sources:
        raise DataError("config key 'dataset' names no dataset")
    return sources


def _unknown_name(name: str, info: dict | None, dataset_dir: Path) -> str:
    if info is None:
        return (f"dataset '{name}' is not a file, and {dataset_dir / DATA_CONFIG} does not exist to name it; give "
                "a .json/.jsonl path, or set dataset_dir to the folder holding dataset_info.json")
    close = difflib.get_close_matches(name, list(info), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"dataset '{name}' is neither in {dataset_dir / DATA_CONFIG} nor a file; {hint}add an entry "
            '{"' + name + '": {"file_name": "FILE.json"}} or give a path')


def _from_entry(name: str, entry: Any, dataset_dir: Path) -> DatasetSource:
    where = f"{dataset_dir / DATA_CONFIG} entry '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    hub = [k for k in HUB_KEYS if k in entry]
    if hub and "file_name" not in entry:
        url = entry[hub[0]]
        fetch = (f"`huggingface-cli download --repo-type dataset {url} --local-dir {dataset_dir / name}`"
                 if hub[0] == "hf_hub_url" else f"download {url}")
        raise DataError(f"{where} points at a hub ({hub[0]}: {url}), which hybridmoe cannot fetch (it works "
                        f"offline); {fetch}, then give the entry \"file_name\": \"{name}\" (a file or folder in "
                        f"{dataset_dir})")
    if "file_name" not in entry:
        raise DataError(f"{where} has no \"file_name\"; name the .json/.jsonl file (or folder) in {dataset_dir}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting '{formatting}' is not one of {', '.join(FORMATTINGS)}")
    if entry.get("ranking"):
        raise DataError(f"{where} is a preference (ranking) dataset for DPO/reward modelling; hybridmoe trains "
                        "SFT: name a dataset of conversations")
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key, {}), dict):
            raise DataError(f"{where}: \"{key}\" must be an object")
    return DatasetSource(name, _files(dataset_dir / entry["file_name"], name), entry)


def _files(path: Path, name: str) -> list[Path]:
    """A file, or every .json/.jsonl file of a folder (LLaMA-Factory loads a folder's files together)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{path}: dataset folder '{name}' has no .json/.jsonl file")
        return files
    return [path]


# ---------------------------------------------------------------------------------------------------------------------
# Records through an entry's columns and tags
# ---------------------------------------------------------------------------------------------------------------------


def _column(record: dict, column: str | None) -> Any:
    return record.get(column) if column else None


def _alpaca(record: Any, columns: dict) -> Conversation:
    """Alpaca: prompt (+ "\\n" + query) is the user turn, response the reply; history/system/tools when mapped
    (LLaMA-Factory reads them only through `columns`)."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    prompt, query = columns.get("prompt", "instruction"), columns.get("query", "input")
    response = columns.get("response", "output")
    for col in (prompt, response):
        if col not in record:
            raise RecordError(f"missing column '{col}'")
    parts = []
    for col in (prompt, query):
        value = _column(record, col)
        if value is not None and not isinstance(value, str):
            raise RecordError(f"column '{col}' must be a string, got {type(value).__name__}")
        if value:
            parts.append(value)
    canonical = {"instruction": "\n".join(parts), "output": record[response],
                 "system": _column(record, columns.get("system")), "history": _column(record, columns.get("history")),
                 "tools": _column(record, columns.get("tools"))}
    return _normalize(canonical)


def _chat(record: Any, columns: dict, tags: dict, openai: bool) -> Conversation:
    """ShareGPT / OpenAI: the turns under `columns.messages`, roles mapped through `tags`."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    defaults = (("messages", "role", "content", "user", "assistant", "tool") if openai else
                ("conversations", "from", "value", "human", "gpt", "observation"))
    messages_col = columns.get("messages", defaults[0])
    roles = {tags.get("user_tag", defaults[3]): "user", tags.get("assistant_tag", defaults[4]): "assistant",
             tags.get("observation_tag", defaults[5]): "tool", tags.get("function_tag", "function_call"): "function_call",
             tags.get("system_tag", "system"): "system"}
    messages = _turns(record, messages_col, tags.get("role_tag", defaults[1]), tags.get("content_tag", defaults[2]),
                      roles)
    system = _optional_str(record, columns["system"]) if columns.get("system") else None
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant turn (nothing to train on)")
    messages.tools = _tools({"tools": _column(record, columns.get("tools"))})
    return messages


def converter(entry: dict | None):
    """record -> Conversation for a dataset_info entry (None: detect the format per record)."""
    if entry is None:
        return _normalize
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    formatting = entry.get("formatting", "alpaca")
    if formatting == "alpaca":
        return functools.partial(_alpaca, columns=columns)
    return functools.partial(_chat, columns=columns, tags=tags, openai=formatting == "openai")


def load_source(source: DatasetSource, max_samples: int | None, seed: int) -> list[Conversation]:
    """The conversations of one source: num_samples drawn (dataset_info), then the first max_samples."""
    convert = converter(source.entry)
    records = [c for path in source.files for c in load_records(path, convert)]
    num = (source.entry or {}).get("num_samples")
    if num is not None:
        rng = random.Random(seed)
        order = rng.sample(range(len(records)), len(records))  # every record once, then repeats if num is larger
        order += [rng.randrange(len(records)) for _ in range(max(0, num - len(records)))]
        records = [records[i] for i in order[:num]]
    if max_samples is not None:
        records = records[:max_samples]
    return records


def load_datasets(spec: str, dataset_dir: Path, max_samples: int | None = None, seed: int = 42,
                  mix_strategy: str = "concat", interleave_probs: list[float] | None = None) -> list[Conversation]:
    """All conversations of `spec`: the sources concatenated in order (the training loop shuffles them), or
    interleaved as LLaMA-Factory does (`mix_strategy: interleave_under|over|once`, :mod:`hybridmoe.mixing`)."""
    sources = [load_source(source, max_samples, seed) for source in resolve(spec, dataset_dir)]
    if len(sources) == 1 or mix_strategy == "concat":  # LLaMA-Factory returns a single dataset as it is, too
        return [c for records in sources for c in records]
    if interleave_probs is not None:
        check_probs(interleave_probs, len(sources), f"'{spec}'")
    out = interleave(sources, mix_strategy, interleave_probs, seed)
    log.info("mix_strategy %s: %s records -> %d", mix_strategy, " + ".join(str(len(r)) for r in sources), len(out))
    return out
