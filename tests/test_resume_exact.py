"""Resume is exact: a run killed at a random step (in-process fault, or a real SIGKILL of `hybridmoe train`, also
in the middle of a checkpoint save) and resumed gives bit-identical logged losses and the bit-identical adapter of an
uninterrupted run, with LoRA dropout, gradient accumulation and checkpointing, int8 and streamed experts.

The kill steps are drawn at random from a seed printed in the test id, so a failure can be replayed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hybridmoe
from hybridmoe import training as train_mod
from hybridmoe.experts.streaming import enable_streaming

from .helpers import make_checkpoint, read_log, write_dataset

STEPS = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_checkpoint("qwen3_moe", root / "m"), write_dataset(root / "d.jsonl", n=10)


def _cfg(files, out: Path, **kw) -> dict:
    model, data = files
    cfg = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), learning_rate=3e-3,
               per_device_train_batch_size=2, logging_steps=1, device="cpu", progress=False, lora_rank=4,
               lora_alpha=8, gradient_checkpointing=False, max_steps=STEPS, save_steps=1, save_total_limit=2,
               lora_dropout=0.1)
    cfg.update(kw)
    return cfg


def _same_run(got: Path, want: Path) -> None:
    """Bit-identical logged losses (the whole history: the resumed log starts from the checkpoint's) and adapter."""
    g, w = read_log(got), read_log(want)
    assert [r["step"] for r in g] == [r["step"] for r in w] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in g] == [r["loss"] for r in w]  # exact, not approx
    a, b = load_file(str(got / "adapter_model.safetensors")), load_file(str(want / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((got / "adapter_config.json").read_text()) == json.loads((want / "adapter_config.json").read_text())
    assert not (got / train_mod.RUNNING_LOG).exists() and not list(got.glob(".tmp-*"))


class _Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so nothing on the way up handles it."""


def _kill_at_micro_step(monkeypatch, n: int) -> None:
    original, calls = train_mod._micro_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_micro_step", step)


def _streamed(monkeypatch) -> None:
    """Every batch runs the routed experts on the streamed path (the GPU path's math, here with host slots)."""
    original = train_mod.load_model

    def load(*args, **kwargs):
        model = original(*args, **kwargs)
        enable_streaming(model, "cpu", min_tokens=1)
        return model

    monkeypatch.setattr(train_mod, "load_model", load)


MATRIX = {
    "dropout-accum2-checkpointing": dict(gradient_accumulation_steps=2, gradient_checkpointing=True),
    "dropout-int8-streamed": dict(expert_dtype="int8", streamed=True),
}


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """straight(case) -> output_dir of the uninterrupted run of that case (run once per module)."""
    done: dict[str, Path] = {}

    def run(case: str, monkeypatch) -> Path:
        if case not in done:
            kw = dict(MATRIX[case])
            with monkeypatch.context() as m:
                if kw.pop("streamed", False):
                    _streamed(m)
                out = tmp_path_factory.mktemp(f"straight-{case}")
                hybridmoe.train(_cfg(files, out, save_steps=0, **kw))
            done[case] = out
        return done[case]

    return run


@pytest.mark.parametrize("seed", [11])
@pytest.mark.parametrize("case", list(MATRIX))
def test_killed_at_a_random_step_resumes_exactly(files, straight, tmp_path, monkeypatch, case, seed):
    want = straight(case, monkeypatch)
    kw = dict(MATRIX[case])
    if kw.pop("streamed", False):
        _streamed(monkeypatch)
    accum = kw.get("gradient_accumulation_steps", 1)

    kill_step = random.Random(seed).randint(2, STEPS)  # killed inside this step: checkpoint-(kill_step - 1) exists
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        _kill_at_micro_step(m, (kill_step - 1) * accum + 1)
        with pytest.raises(_Killed):
            hybridmoe.train(_cfg(files, out, **kw))
    assert [r["step"] for r in read_log(out / f"checkpoint-{kill_step - 1}")] == list(range(1, kill_step))
    hybridmoe.train(_cfg(files, out, resume_from_checkpoint=True, **kw))
    _same_run(out, want)


def _cli(cfg_path: Path, patch: str = "") -> list[str]:
    """`hybridmoe train` in a child process, with conftest's thread count (so its sums are bitwise ours)."""
    code = (f"import os, signal, sys, torch; torch.set_num_threads({torch.get_num_threads()}); {patch}"
            f"from hybridmoe.cli import main; sys.exit(main(['train', {str(cfg_path)!r}]))")
    return [sys.executable, "-c", code]


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(hybridmoe.__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}


def test_sigkill_mid_step_and_mid_save_then_resume_exactly(files, straight, tmp_path, monkeypatch):
    """Two real SIGKILLs of `hybridmoe train`: one at a random moment while it trains, one inside a checkpoint save
    (after the optimizer file is written, before the rename). Each resume cleans up the temp folder the killed save
    left, cuts the log back to the checkpoint, and ends bit-identical to the uninterrupted run."""
    case = "dropout-accum2-checkpointing"
    want, kw = straight(case, monkeypatch), MATRIX[case]
    out = tmp_path / "killed"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_cfg(files, out, save_steps=2, **kw)))

    # 1. SIGKILL at a random moment of step 3 or 4 (after checkpoint-2, before the step-4 save can finish)
    proc = subprocess.Popen(_cli(cfg_path), stderr=subprocess.DEVNULL, env=_child_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-2").exists():
        time.sleep(0.01)
    time.sleep(random.Random(5).uniform(0, 0.15))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"

    # 2. resume in a child that SIGKILLs itself inside the next checkpoint save
    patch = ("import hybridmoe.train_state as ts; _save = ts.save_file; "
             "ts.save_file = lambda *a, **k: (_save(*a, **k), os.kill(os.getpid(), signal.SIGKILL)); ")
    cfg_path.write_text(json.dumps(_cfg(files, out, save_steps=2, resume_from_checkpoint=True, **kw)))
    res = subprocess.run(_cli(cfg_path, patch), capture_output=True, text=True, timeout=300, env=_child_env())
    assert res.returncode == -signal.SIGKILL, f"no checkpoint save was left to kill: {res.stderr[-2000:]}"
    left = list(out.glob(".tmp-checkpoint-*"))
    assert left, "the kill inside the save should have left its temp folder"

    # 3. resume again, in this process: temp folder removed at start, log cut back, same result as never killed
    hybridmoe.train(_cfg(files, out, save_steps=2, resume_from_checkpoint=True, **kw))
    assert not any(p.exists() for p in left)
    _same_run(out, want)
