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
