"""Faults lose nothing: Ctrl-C saves and resumes exactly, crashes and full disks mid-write leave the previous files,
a NaN in the routed experts skips its step and is named, only safetensors are read, no remote code runs unless
asked, and random/corrupt inputs only ever produce our own one-line errors."""

from __future__ import annotations

import errno
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hybridmoe
from hybridmoe import training as train_mod
from hybridmoe.adapters import apply_lora, load_adapter, read_adapter, save_adapter
from hybridmoe.checkpoint import Checkpoint
from hybridmoe.data import load_records
from hybridmoe.errors import AdapterError, CheckpointError, DataError, FileSystemError
from hybridmoe.experts import HybridExperts
from hybridmoe.experts.streaming import enable_streaming
from hybridmoe.io import atomic_replace_dir, atomic_write_dir
from hybridmoe.loading import load_model, load_tokenizer

from .helpers import make_checkpoint, randomize_lora, read_log, write_dataset

SRC = Path(__file__).parents[1] / "src" / "hybridmoe"


def _cfg(model, data, out, **kw):
    cfg = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), learning_rate=3e-3,
               per_device_train_batch_size=2, logging_steps=1, device="cpu", progress=False, lora_rank=4,
               lora_alpha=8, lr_scheduler_type="constant", gradient_checkpointing=False)
    cfg.update(kw)
    return cfg


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path):
    model = make_checkpoint("qwen3_moe", tmp_path / "m")
    data = write_dataset(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "interrupted"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_cfg(model, data, out, max_steps=400)))
    code = f"import sys; from hybridmoe.cli import main; sys.exit(main(['train', {str(cfg_path)!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    log = out / train_mod.RUNNING_LOG  # the run in progress logs here; trainer_log.jsonl comes with the adapter
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    ck = re.search(r"saved (\S+);", err).group(1)
    stopped_at = int(Path(ck).name.split("-")[1])
    assert stopped_at >= 2 and (Path(ck) / "trainer_state.json").is_file()

    # resume to stopped_at + 2 steps, and compare with one uninterrupted run of that length
    hybridmoe.train(_cfg(model, data, out, max_steps=stopped_at + 2, resume_from_checkpoint=ck))
    resumed = [r["loss"] for r in read_log(out)][-2:]
    hybridmoe.train(_cfg(model, data, tmp_path / "straight", max_steps=stopped_at + 2))
    straight = [r["loss"] for r in read_log(tmp_path / "straight")][-2:]
    assert resumed == pytest.approx(straight, rel=1e-5)


def _stream_on_cpu(monkeypatch) -> list:
    """Make the trainer's model run its routed experts on the streamed path (the GPU path's math and weight cache,
    here with host slots) for every batch; returns the streamers, to check they were used."""
    streamers, original = [], train_mod.load_model

    def load_streamed(*args, **kwargs):
        model = original(*args, **kwargs)
        streamers.append(enable_streaming(model, "cpu", min_tokens=1))
        return model

    monkeypatch.setattr(train_mod, "load_model", load_streamed)
    return streamers


def _inject_at_micro_step(monkeypatch, k: int, layer: str, direction: str) -> None:
    """At micro-step k, make `layer`'s routed experts produce NaN for real: forward, one weight of every expert is
    NaN for that step (restored after); backward, a tensor hook turns the gradient arriving at its output to NaN."""
    original, calls = train_mod._micro_step, {"n": 0}

    def step(runner, batch, device, n_items):
        calls["n"] += 1
        if calls["n"] != k:
            return original(runner, batch, device, n_items)
        ex = next(m for n, m in runner.named_modules() if n.endswith(layer) and isinstance(m, HybridExperts))
        if direction == "forward":
            saved = ex.weights.down.clone()
            ex.weights.down[:, 0, 0] = float("nan")  # [E, H, I]: every expert's output feature 0
            handle = None
        else:
            saved = None
            def poison_grad(mod, args, out):
                out.register_hook(lambda grad: torch.full_like(grad, float("nan")))  # replaces dL/d(output)

            handle = ex.register_forward_hook(poison_grad)
        if ex.streamer is not None:
            ex.streamer.invalidate()  # the host weights changed: the streamed slots must not serve the old ones
        try:
            return original(runner, batch, device, n_items)
        finally:
            if saved is not None:
                ex.weights.down.copy_(saved)
                if ex.streamer is not None:
                    ex.streamer.invalidate()
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(train_mod, "_micro_step", step)


@pytest.mark.parametrize("path", ["cpu", "streamed"])
@pytest.mark.parametrize(("direction", "first"), [("forward", "forward output"),
                                                  ("backward", "backward, gradient arriving at the output")])
def test_nan_in_routed_experts_is_skipped_and_named(tmp_path, monkeypatch, caplog, path, direction, first):
    model = make_checkpoint("deepseek_v2", tmp_path / "m", num_hidden_layers=4)  # dense layer 0, MoE layers 1-3
    data = write_dataset(tmp_path / "d.jsonl", n=8)
    streamers = _stream_on_cpu(monkeypatch) if path == "streamed" else []
    layer = "model.layers.2.mlp.experts"
    _inject_at_micro_step(monkeypatch, 3, layer, direction)
    out = tmp_path / "out"
    res = hybridmoe.train(_cfg(model, data, out, max_steps=5))

    assert res.steps == 5 and res.skipped_steps == 1
    skipped = [r for r in read_log(out) if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3]
    where = skipped[0]["nonfinite_at"]
    assert where[0] == f"{layer}: {first}", where  # the layer and pass where it appeared, not only its aftermath
    if direction == "forward":
        assert f"{layer}: forward input" not in where  # its input was finite: the experts produced the NaN
        assert "model.layers.3.mlp.experts: forward input" in where  # and the next layer received it
    else:
        assert not any("forward" in w for w in where)
        assert "model.layers.3.mlp.experts" not in " ".join(where)  # backward reached layer 3 before layer 2
    assert f"first in the routed experts at {layer}: {first}" in caplog.text
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert all(not r.get("skipped") and math.isfinite(r["loss"]) for r in read_log(out) if r["step"] != 3)
    if path == "streamed":
        assert streamers[0].stats.copies + streamers[0].stats.hits > 0


def _write_two(tmp: Path, fail_after_first: BaseException | None = None) -> None:
    (tmp / "adapter_model.safetensors").write_text("new weights")
    if fail_after_first is not None:
        raise fail_after_first
    (tmp / "adapter_config.json").write_text("new config")


@pytest.mark.parametrize(("fault", "raised"), [(OSError(errno.ENOSPC, "No space left on device"), FileSystemError),
                                               (KeyboardInterrupt(), KeyboardInterrupt)],
                         ids=["disk-full", "killed-mid-write"])
def test_failed_writes_leave_previous_files(tmp_path, fault, raised):
    out = tmp_path / "adapter"
    atomic_write_dir(out, _write_two)
    before = {p.name: p.read_text() for p in out.iterdir()}
    with pytest.raises(raised):
        atomic_write_dir(out, lambda tmp: _write_two(tmp, fault))
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*"))

    ck = tmp_path / "checkpoint-5"
    atomic_replace_dir(ck, _write_two)
    with pytest.raises(raised):
        atomic_replace_dir(ck, lambda tmp: _write_two(tmp, fault))
    assert sorted(p.name for p in ck.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_only_safetensors_no_pickle():
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text, f
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (f, call)


def test_index_may_not_point_outside_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        Checkpoint(tmp_path)


REMOTE_CODE = """
from pathlib import Path
Path(MARKER).write_text("remote code ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil_moe"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_remote_code_never_runs_unless_asked(tmp_path):
    """A checkpoint that ships Python code (config and tokenizer auto_map) is refused with one line by default."""
    from transformers import AutoConfig

    ck = tmp_path / "evil"
    ck.mkdir()
    marker = tmp_path / "RAN"  # transformers imports a copy of evil.py from its modules cache: an absolute path
    (ck / "evil.py").write_text(f"MARKER = {str(marker)!r}" + REMOTE_CODE)
    (ck / "config.json").write_text(json.dumps({"model_type": "evil_moe", "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (ck / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "evil.EvilTokenizer"]},
                                                          "tokenizer_class": "EvilTokenizer"}))
    save_file({"w": torch.zeros(1)}, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match="custom code.*its code was not run.*trust_remote_code") as e:
        load_model(ck, device="cpu", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="cannot load a tokenizer .*custom code"):
        load_tokenizer(ck)
    assert hybridmoe.config.TrainConfig().trust_remote_code is False
    assert not marker.exists()
    # the control: the same files do run code once trust_remote_code is given, so the refusal above is real
    AutoConfig.from_pretrained(str(ck), trust_remote_code=True)
    assert marker.exists()


def test_adapter_config_paths_are_not_followed(tmp_path):
    """adapter_config.json names other places (base_model_name_or_path, ...); the adapter is read from its own
    directory only: another adapter at the named place, even a corrupt one, changes nothing."""
    model_dir = make_checkpoint("qwen3_moe", tmp_path / "m")
    trained = apply_lora(load_model(model_dir, device="cpu", progress=False), "all", rank=4, alpha=8, seed=1)
    randomize_lora(trained, seed=3)
    save_adapter(trained, tmp_path / "adapter", base_model_name=str(model_dir))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "adapter_config.json").write_text("{not json")
    (elsewhere / "adapter_model.safetensors").write_bytes(b"corrupt")
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(base_model_name_or_path=str(elsewhere), revision="../elsewhere", runtime_config={"path": "../elsewhere"})
    cfg_path.write_text(json.dumps(cfg))

    ids = torch.randint(4, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    loaded = load_adapter(load_model(model_dir, device="cpu", progress=False), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained.eval()(ids).logits)


def test_bin_only_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle would run code")
    with pytest.raises(AdapterError, match="pickle"):
        read_adapter(tmp_path)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", 3]), "content": json_values}), max_size=3)}),
    st.fixed_dictionaries({"conversations": st.lists(st.dictionaries(st.sampled_from(["from", "value"]), json_values),
                                                     max_size=3)}),
    st.fixed_dictionaries({"instruction": json_values, "output": json_values}),
)


@FUZZ
@given(lines=st.lists(st.one_of(records.map(json.dumps), st.text(max_size=30)), min_size=0, max_size=4))
def test_fuzz_dataset_parser(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines))
    try:
        convs = load_records(path)
    except DataError as e:
        assert "\n" not in str(e)
        return
    for conv in convs:
        assert all(isinstance(m["content"], str) for m in conv)


@FUZZ
@given(blob=st.binary(max_size=300), cut=st.integers(min_value=0, max_value=400))
def test_fuzz_adapter_reader(tmp_path, blob, cut):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    real = d / "adapter_model.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 3)}, str(real))
    data = real.read_bytes()
    real.write_bytes(data[:cut] + blob if cut < len(data) else blob)
    try:
        read_adapter(d)
    except AdapterError as e:
        assert "\n" not in str(e)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_fuzz_checkpoint_reader(tmp_path, blob):
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(blob)
    try:
        Checkpoint(d)
    except CheckpointError as e:
        assert "\n" not in str(e)

