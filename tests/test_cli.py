"""CLI contract: user errors are one line on stderr, exit 2, no traceback; --help works for every command."""

from __future__ import annotations

import pytest

from hybridmoe.cli import build_parser

from .helpers import make_checkpoint, one_line_error, write_dataset


@pytest.mark.parametrize("cmd", ["train", "chat", "inspect", "info", "export", "quickstart"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0 and "usage: hybridmoe" in capsys.readouterr().out


def test_train_config_errors(tmp_path, capsys):
    model = make_checkpoint("qwen3_moe", tmp_path / "m")
    data = write_dataset(tmp_path / "d.jsonl", n=4)
    base = f"model_name_or_path: {model}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\n"

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(base + "lora_rank: [8\n")
    one_line_error(capsys, ["train", str(bad_yaml)], "bad.yaml:", "malformed YAML")

    cfg = tmp_path / "ok.yaml"
    cfg.write_text(base + "device: cpu\nmax_steps: 1\nprogress: false\n")
    one_line_error(capsys, ["train", str(cfg), "lora_rnk=4"], "unknown config key 'lora_rnk'", "lora_rank")
    one_line_error(capsys, ["train", str(cfg), "max_steps=ten"], "'max_steps' must be an integer")
    one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "does not exist")
    one_line_error(capsys, ["train", str(cfg), f"dataset={tmp_path / 'missing.jsonl'}"], "missing.jsonl")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    one_line_error(capsys, ["train", str(cfg), f"dataset={broken}"], "broken.jsonl:2")
    one_line_error(capsys, ["train", str(cfg), "cutoff_len=2"], "cutoff_len 2 is too small")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_chat_flag_errors(tmp_path, capsys):
    model = make_checkpoint("qwen3_moe", tmp_path / "m")
    one_line_error(capsys, ["chat", "--model", str(model), "--prompt", "hi", "--top-p", "1.5"], "--top-p")
    one_line_error(capsys, ["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"], "does not exist")
