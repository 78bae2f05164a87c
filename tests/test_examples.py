"""Every shipped YAML validates against the config schema and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridmoe.config import load_config

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    cfg = load_config(path)
    assert cfg.model_name_or_path and cfg.dataset and cfg.output_dir
    assert path.read_text().splitlines()[0] == f"# hybridmoe train examples/{path.name}"


def test_readme_python_example_runs_as_written(tmp_path, capsys):
    """benchmarks/readme_example.py runs the README's Python block with only the paths swapped (the benchmark of the
    user entry points, issue 20): every statement runs, both generate calls produce tokens, the train line trains."""
    import ast
    import importlib.util
    import json

    from .helpers import make_checkpoint, write_dataset

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("readme_example", root / "benchmarks" / "readme_example.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = make_checkpoint("deepseek_v2", tmp_path / "ckpt")
    data = write_dataset(tmp_path / "data.jsonl")
    bench.main(["--model", str(ckpt), "--data", str(data), "--train-steps", "1", "--train-override", "device=cpu",
                "--train-override", "dtype=float32", "--train-override", "expert_dtype=float32"])
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    first = [r for r in recs if r["call"] == "first"]
    assert len(first) == len(ast.parse(bench.readme_block(root / "README.md")).body)
    gens = [r for r in recs if "new_tokens" in r]
    assert len(gens) == 4 and all(r["new_tokens"] > 0 for r in gens)  # model.generate, hybridmoe.generate, twice
    assert next(r for r in first if "hybridmoe.train(" in r["statement"])["train_tok_s"] > 0
