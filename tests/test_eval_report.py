"""Evaluation (eval loss during training, `hybridmoe eval`) and observability (loss plots, TensorBoard, wandb)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import hybridmoe
from hybridmoe import reporting
from hybridmoe.cli import main
from hybridmoe.data import SFTDataset, load_records
from hybridmoe.evaluate import eval_loss
from hybridmoe.loading import load_model, load_tokenizer
from hybridmoe.reporting import parse_report_to, smooth

from .helpers import read_log, write_dataset

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _cfg(model, data, out, **kw):
    cfg = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), max_steps=4, learning_rate=3e-3,
               per_device_train_batch_size=2, logging_steps=1, device="cpu", dtype="float32", progress=False,
               lora_rank=4, lora_alpha=8, gradient_checkpointing=False)
    cfg.update(kw)
    return cfg


def test_eval_loss_matches_transformers(ckpt_dir, tmp_path):
    """Token-mean CE over the whole eval set (batched, padded) = transformers' per-example mean losses, weighted by
    their supervised tokens; fp32, rtol 1e-5."""
    path = ckpt_dir("qwen3_moe")
    tok = load_tokenizer(path)
    ds = SFTDataset(load_records(write_dataset(tmp_path / "d.jsonl", n=5)), tok, cutoff_len=64)
    got = eval_loss(load_model(path, device="cpu", dtype="float32", progress=False), ds, 2, torch.device("cpu"),
                    tok.pad_token_id)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total = tokens = 0.0
    with torch.no_grad():
        for ex in ds:
            n = sum(label != -100 for label in ex["labels"][1:])
            out = ref(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            total, tokens = total + float(out.loss) * n, tokens + n
    assert got["eval_tokens"] == tokens and got["eval_examples"] == 5
    assert got["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


@pytest.mark.skipif(not (HAS_TB and HAS_MPL), reason="needs tensorboard and matplotlib")
def test_val_size_eval_tensorboard_and_plots(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "out"
    data = write_dataset(tmp_path / "d.jsonl", n=12)
    hybridmoe.train(_cfg(ckpt_dir("deepseek_v2"), data, out, val_size=0.25, eval_steps=2, per_device_eval_batch_size=2,
                         plot_loss=True, report_to="tensorboard"))
    log = read_log(out)
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_examples"] == 3 for r in evals)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # training on the same task lowers the held-out loss
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    for png in ("training_loss.png", "training_eval_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/loss", "eval/perplexity"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert acc.Scalars("eval/loss")[1].value == pytest.approx(evals[1]["eval_loss"], rel=1e-6)

    # `hybridmoe eval` on the same held-out kind of data, with the trained adapter: one line + JSON
    capsys.readouterr()
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", str(ckpt_dir("deepseek_v2")), "--adapter", str(out), "--dataset", str(data),
                 "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--output", str(result)]) == 0
    line = capsys.readouterr().out.strip()
    res = json.loads(result.read_text())
    assert line.startswith(f"eval_loss {res['eval_loss']:.4f}  perplexity {res['eval_perplexity']:.3f}")
    assert res["eval_examples"] == 12 and res["adapter"] == str(out)
    assert res["eval_perplexity"] == pytest.approx(math.exp(res["eval_loss"]))


def test_missing_tracker_is_one_line_and_none_writes_nothing(tmp_path, caplog, monkeypatch):
    real = reporting._installed
    monkeypatch.setattr(reporting, "_installed", lambda m: m not in ("wandb", "tensorboard") and real(m))
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        rep = reporting.Reporter(tmp_path / "trainer_log.jsonl", "wandb,tensorboard", tmp_path / "runs", {})
        rep.log({"step": 1, "loss": 2.0})
        rep.close()
    assert [r.getMessage() for r in caplog.records] == [
        "report_to wandb: wandb is not installed (pip install wandb); nothing is sent to wandb",
        "report_to tensorboard: the tensorboard package is not installed (pip install 'hybridmoe[tensorboard]'); no "
        "event files are written"]
    rep = reporting.Reporter(tmp_path / "none.jsonl", "none", tmp_path / "runs", {})
    rep.log({"step": 1, "loss": 2.0})
    rep.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.jsonl", "trainer_log.jsonl"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_report_to_wandb_offline(ckpt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    hybridmoe.train(_cfg(ckpt_dir("qwen3_moe"), write_dataset(tmp_path / "d.jsonl", n=4), out, max_steps=2,
                         report_to="wandb"))
    (run,) = (out / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb")) and (run / "files").is_dir()


def test_report_to_parsing_and_smoothing(caplog):
    assert parse_report_to(None) == [] and parse_report_to("none") == []
    assert parse_report_to(["tensorboard", "wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        assert parse_report_to("swanlab, tensorboard") == ["tensorboard"]
    assert "swanlab" in caplog.records[0].getMessage()
    s = smooth([1.0, 0.0, 0.0, 0.0])
    assert s[0] == 1.0 and all(a > b for a, b in zip(s, s[1:])) and s[-1] > 0
