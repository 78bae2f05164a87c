"""`hybridmoe quickstart --fast` end to end, through the CLI: builds, fine-tunes, learns, and caches its base model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hybridmoe import cli
from hybridmoe.quickstart import BASE_MARKER, asset_path, read_conversations

ACCURACY = re.compile(r"exact-match accuracy on (\d+) training questions: before (\d+)/\1 \(\d+%\), "
                      r"after (\d+)/\1 \(\d+%\)")
PRETRAIN_MARKER = "Pre-training base"


def run_cli(capsys, output: Path) -> tuple[int, str, str]:
    """`hybridmoe quickstart --fast --output OUTPUT`; returns (exit code, stdout, stderr)."""
    code = cli.main(["quickstart", "--fast", "--output", str(output)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def base_files(output: Path) -> dict[str, int]:
    """name -> mtime (ns) of every file of the cached base model."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((output / "base").iterdir())}


def check_learned(out: str) -> None:
    """The summary shows ~0 correct before fine-tuning and >= 90% after."""
    match = ACCURACY.search(out)
    assert match, out
    total, before, after = (int(g) for g in match.groups())
    assert total >= 5
    assert before <= total // 5, out
    assert after >= 0.9 * total, out


def test_assets_are_valid() -> None:
    """The shipped datasets are OpenAI `messages` records with distinct questions and answers."""
    for name in ("identity.jsonl", "dialogues.jsonl"):
        pairs = read_conversations(asset_path(name))
        assert len(pairs) >= 20
        questions = [p[0]["content"] for p in pairs]
        assert len(set(questions)) == len(questions)
        assert all([m["role"] for m in p] == ["user", "assistant"] for p in pairs)
    identity = read_conversations(asset_path("identity.jsonl"))
    generic = read_conversations(asset_path("dialogues.jsonl"))
    answers = {p[1]["content"] for p in identity}
    assert len(answers) == len(identity)
    assert not answers & {p[1]["content"] for p in generic}  # pre-training never sees the identity answers
    corpus = asset_path("corpus.txt").read_text(encoding="utf-8")
    assert len(corpus.splitlines()) >= 200 and len(corpus.encode()) < 100_000
    assert not any(answer in corpus for answer in answers)


def test_quickstart_fast_learns_and_caches(tmp_path: Path, capsys) -> None:
    output = tmp_path / "qs"
    code, out, err = run_cli(capsys, output)
    assert code == 0, err[-2000:]
    check_learned(out)
    assert PRETRAIN_MARKER in err
    assert "OK: all" in out
    assert f"hybridmoe chat --model {output.resolve() / 'base'} --adapter {output.resolve() / 'adapter'}" in out
    assert (output / "base" / BASE_MARKER).is_file()
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((output / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    built = base_files(output)
    assert "model.safetensors" in built

    code, out, err = run_cli(capsys, output)
    assert code == 0, err[-2000:]
    check_learned(out)
    assert PRETRAIN_MARKER not in err
    assert "reusing the cached base model" in err
    assert base_files(output) == built  # not rebuilt: the same files, untouched
