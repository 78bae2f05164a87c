"""Every fault ends in one line and loses nothing.

- Filesystem faults, for real where an unprivileged test can cause them (file-size limit, a full and a read-only
  tmpfs in a user+mount namespace, output_dir that is a file, a folder removed mid-run) and injected at the write
  layer otherwise (permission denied, quota): one `hybridmoe: error:` line naming the path and the errno, exit 2,
  and the adapter, checkpoints and trainer_log.jsonl of the earlier run byte for byte as they were.
- Damaged checkpoints are named before a resume; `resume_from_checkpoint: true` falls back to an intact one.
- The inputs that used to be accepted silently, or wrongly, are refused with one line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridmoe
from hybridmoe import io as io_mod
from hybridmoe import training as train_mod
from hybridmoe.adapters import ADAPTER_WEIGHTS, read_adapter
from hybridmoe.cli import main
from hybridmoe.config import _FIELDS, RANGES, load_config
from hybridmoe.errors import AdapterError, CheckpointError, ConfigError
from hybridmoe.export import EXPORT_MARKER, export_merged
from hybridmoe.inspect import inspect_adapter
from hybridmoe.io import fs_error
from hybridmoe.loading import load_model, load_tokenizer
from hybridmoe.train_state import checkpoint_problem

from .helpers import make_checkpoint, read_log, write_dataset


def _cfg(model, data, out, **kw) -> dict:
    cfg = dict(model_name_or_path=str(model), dataset=str(data), output_dir=str(out), learning_rate=3e-3,
               per_device_train_batch_size=2, logging_steps=1, device="cpu", progress=False, lora_rank=4,
               lora_alpha=8, gradient_checkpointing=False, max_steps=2, save_steps=0)
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, data, out): a finished 3-step run with checkpoint-1 and checkpoint-2 beside its adapter."""
    root = tmp_path_factory.mktemp("faults")
    model, data = make_checkpoint("qwen3_moe", root / "m"), write_dataset(root / "d.jsonl", n=8)
    hybridmoe.train(_cfg(model, data, root / "out", max_steps=3, save_steps=1))
    return model, data, root / "out"


def _files(d: Path) -> dict[str, bytes]:
    """Every file under `d` and its bytes (the running log of a failed run aside: it is not the adapter's)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != train_mod.RUNNING_LOG}


def _copy_run(trained, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(trained[2], out)
    return out


def _one_line(err: str) -> str:
    """The stderr of a failed command holds exactly one error line and no traceback; returns it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("hybridmoe: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train_cli(cfg: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    capsys.readouterr()
    code = main(["train", str(path)])
    return code, capsys.readouterr().err


# -- filesystem faults ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", sorted(io_mod._ADVICE), ids=lambda c: errno.errorcode[c])
def test_every_errno_reads_as_one_line_naming_path_and_meaning(code):
    e = fs_error(OSError(code, os.strerror(code), "/some/path"), "cannot write", "/fallback")
    text = str(e)
    assert "\n" not in text and "'/some/path'" in text and os.strerror(code) in text
    assert f"[{errno.errorcode[code]}]" in text
    # safetensors (Rust) reports the same fault as text ending in "(os error N)": understood as well
    from safetensors import SafetensorError

    assert f"[{errno.errorcode[code]}]" in str(fs_error(SafetensorError(f"Error while serializing: IoError(Os {{ "
                                                                          f"code: {code} }}) (os error {code})"),
                                                         "cannot write", "/x"))


def test_file_size_limit_at_the_final_save(trained, tmp_path, capsys):
    """RLIMIT_FSIZE for real (`ulimit -f`; Python ignores SIGXFSZ, so the write fails with EFBIG): the adapter
    (54 KB) does not fit under 40 KB, the log lines do."""
    model, data, _ = trained
    out = _copy_run(trained, tmp_path)
    before = _files(out)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, hard))
    try:
        code, err = _train_cli(_cfg(model, data, out), tmp_path, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    line = _one_line(err)
    assert code == 2 and "File too large [EFBIG]" in line and str(out) in line and "ulimit -f" in line
    assert _files(out) == before  # the earlier adapter, its log and checkpoints: untouched
    assert not list(out.parent.glob(".tmp-*"))


NAMESPACE_SCRIPT = """
set -eu
mount -t tmpfs -o size=2m tmpfs "$D"
cp -a "$SRC" "$D/out"
(cd "$D/out" && find . -type f | sort | xargs sha256sum) > "$LOGS/before.txt"
# fill the disk, then free 16 KiB: room for log lines, not for the adapter (54 KB)
dd if=/dev/zero of="$D/fill" bs=4k 2>/dev/null || true
truncate -s -16k "$D/fill"
"$PY" -c "$RUN"
(cd "$D/out" && find . -type f ! -name trainer_log.running.jsonl | sort | xargs sha256sum) > "$LOGS/after.txt"
"""

# One interpreter for the three commands (each would otherwise pay the imports): train on the full disk, remount
# read-only, train again, export onto it. Each command's stderr goes to its own file.
NAMESPACE_RUN = """
import contextlib, os, subprocess, sys, torch
torch.set_num_threads(1)
from hybridmoe.cli import main
logs, d = os.environ["LOGS"], os.environ["D"]
def run(name, argv):
    with open(f"{logs}/{name}.err", "w") as err, contextlib.redirect_stderr(err):
        rc = main(argv)
    open(f"{logs}/{name}.rc", "w").write(str(rc))
run("enospc", ["train", f"{logs}/cfg.json"])
subprocess.run(["mount", "-o", "remount,ro", d], check=True)
run("erofs", ["train", f"{logs}/cfg.json"])
run("export", ["export", "--model", os.environ["MODEL"], "--adapter", f"{d}/out", "--output", f"{d}/export"])
"""


def test_full_and_read_only_filesystem_for_real(trained, tmp_path):
    """A small tmpfs, filled up and then remounted read-only, in a user+mount namespace (no privileges needed)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("user+mount namespaces are not available here (the injected faults below still run)")
    model, data, src = trained
    logs, mnt = tmp_path / "logs", tmp_path / "mnt"
    logs.mkdir()
    mnt.mkdir()
    (logs / "cfg.json").write_text(json.dumps(_cfg(model, data, mnt / "out")))
    env = {**os.environ, "D": str(mnt), "SRC": str(src), "LOGS": str(logs), "PY": sys.executable,
           "RUN": NAMESPACE_RUN, "MODEL": str(model), "PYTHONPATH": str(Path(hybridmoe.__file__).parents[1])}
    res = subprocess.run(["unshare", "-rm", "sh", "-c", NAMESPACE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    for name, want in [("enospc", "No space left on device [ENOSPC]"), ("erofs", "Read-only file system [EROFS]"),
                       ("export", "Read-only file system [EROFS]")]:
        line = _one_line((logs / f"{name}.err").read_text())
        assert (logs / f"{name}.rc").read_text().strip() == "2", line
        assert want in line and str(mnt) in line, line
    assert (logs / "after.txt").read_text() == (logs / "before.txt").read_text()


class _DeniedTempfile:
    """tempfile as the write layer sees it, failing with `code` (root ignores permission bits, so EACCES and
    EDQUOT are injected where the OS would raise them)."""

    def __init__(self, code: int):
        self.code = code

    def mkdtemp(self, prefix: str = "", dir: str | None = None):
        raise OSError(self.code, os.strerror(self.code), dir)

    mkstemp = mkdtemp


@pytest.mark.parametrize("code", [errno.EACCES, errno.EDQUOT], ids=["permission-denied", "quota"])
def test_injected_write_faults_at_the_final_save(trained, tmp_path, capsys, monkeypatch, code):
    model, data, _ = trained
    out = _copy_run(trained, tmp_path)
    before = _files(out)
    monkeypatch.setattr(io_mod, "tempfile", _DeniedTempfile(code))
    rc, err = _train_cli(_cfg(model, data, out, max_steps=1), tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and f"[{errno.errorcode[code]}]" in line and str(out.parent) in line
    assert _files(out) == before


def test_output_dir_is_a_file(trained, tmp_path, capsys):
    model, data, _ = trained
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    rc, err = _train_cli(_cfg(model, data, blocker), tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and str(blocker) in line and "[EEXIST]" in line
    assert blocker.read_text().startswith("a file")


def test_output_dir_removed_mid_run(trained, tmp_path, capsys, monkeypatch):
    model, data, _ = trained
    out = tmp_path / "vanishing"
    original = train_mod._micro_step

    def step(*args, **kwargs):
        shutil.rmtree(out, ignore_errors=True)  # someone deletes the folder while training runs
        return original(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_micro_step", step)
    rc, err = _train_cli(_cfg(model, data, out), tmp_path, capsys)
    line = _one_line(err)
    assert rc == 2 and "[ENOENT]" in line and str(out) in line


# -- damaged checkpoints -------------------------------------------------------------------------------------------
def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "optimizer-truncated": ("optimizer.safetensors", _truncate),
    "optimizer-empty": ("optimizer.safetensors", lambda f: f.write_bytes(b"")),
    "optimizer-garbage-header": ("optimizer.safetensors", lambda f: f.write_bytes(b"\x10" + b"\0" * 7 + b"{not json}x" * 9)),
    "adapter-truncated": ("adapter_model.safetensors", _truncate),
    "adapter-padded": ("adapter_model.safetensors", lambda f: f.write_bytes(f.read_bytes() + b"\0" * 8)),
    "state-not-json": ("trainer_state.json", lambda f: f.write_text('{"loop": {')),
    "state-wrong-shape": ("trainer_state.json", lambda f: f.write_text('{"loop": [1]}')),
    "adapter-config-missing": ("adapter_config.json", lambda f: f.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_file_is_named(trained, tmp_path, damage):
    name, hurt = DAMAGE[damage]
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(trained[2] / "checkpoint-2", ck)
    assert checkpoint_problem(ck) is None
    hurt(ck / name)
    problem = checkpoint_problem(ck)
    assert problem is not None and problem.startswith(name), problem
    model, data, _ = trained
    with pytest.raises(ConfigError, match=rf"checkpoint '{ck}' is damaged: {name}"):
        hybridmoe.train(_cfg(model, data, tmp_path / "o", resume_from_checkpoint=str(ck)))


def test_resume_true_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, caplog):
    model, data, _ = trained
    out = _copy_run(trained, tmp_path)
    _truncate(out / "checkpoint-2" / "optimizer.safetensors")
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        res = hybridmoe.train(_cfg(model, data, out, max_steps=3, resume_from_checkpoint=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "checkpoint-2 is damaged (optimizer.safetensors" in warnings[0]
    assert "resuming from checkpoint-1" in warnings[0]
    assert res.steps == 3 and len(res.losses) == 2  # steps 2 and 3 trained again
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


# -- accepted silently, or wrong, before -----------------------------------------------------------------------------
def test_chat_template_rule(trained, tmp_path):
    model = trained[0]
    with pytest.raises(ConfigError, match="does not exist.*Jinja markup"):
        load_tokenizer(model, "/nonexistent.jinja")
    with pytest.raises(ConfigError, match="is a directory"):
        load_tokenizer(model, str(tmp_path))
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        load_tokenizer(model, "{% for m in messages %}{{ m.content }}")
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert load_tokenizer(model, inline).chat_template == inline
    f = tmp_path / "t.jinja"
    f.write_text(inline)
    assert load_tokenizer(model, str(f)).chat_template == inline


def _int_adapter(tmp_path: Path, trained) -> Path:
    d = tmp_path / "int_adapter"
    shutil.copytree(trained[2], d, ignore=shutil.ignore_patterns("checkpoint-*"))
    sd = load_file(str(d / ADAPTER_WEIGHTS))
    key = sorted(sd)[0]
    sd[key] = (sd[key] * 1000).to(torch.int32)
    save_file(sd, str(d / ADAPTER_WEIGHTS))
    return d


def test_integer_adapter_tensors_refused_by_chat_inspect_export(trained, tmp_path, capsys):
    model = trained[0]
    bad = _int_adapter(tmp_path, trained)
    with pytest.raises(AdapterError, match="int32; LoRA weights must be floating point"):
        read_adapter(bad)
    with pytest.raises(AdapterError, match="int32; LoRA weights must be floating point"):
        inspect_adapter(bad)
    with pytest.raises(AdapterError, match="int32"):
        export_merged(model, bad, tmp_path / "export", progress=False)
    assert not (tmp_path / "export").exists()
    capsys.readouterr()
    rc = main(["chat", "--model", str(model), "--adapter", str(bad), "--prompt", "hi", "--device", "cpu"])
    assert rc == 2 and "int32" in _one_line(capsys.readouterr().err)


def test_export_refuses_a_folder_that_is_not_a_previous_export(trained, tmp_path):
    model, _, adapter = trained
    other = tmp_path / "other_model"
    shutil.copytree(model, other)  # another model's folder: config.json and model.safetensors
    before = _files(other)
    with pytest.raises(CheckpointError, match="not a previous export.*--overwrite"):
        export_merged(model, adapter, other, progress=False)
    assert _files(other) == before
    export_merged(model, adapter, other, progress=False, overwrite=True)
    assert (other / EXPORT_MARKER).is_file()
    export_merged(model, adapter, other, progress=False)  # now a previous export: replaced without --overwrite


def test_missing_tokenizer_is_named(trained, tmp_path, capsys):
    model, data, _ = trained
    bare = tmp_path / "bare"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "special_tokens*"))
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        load_tokenizer(bare)
    rc, err = _train_cli(_cfg(bare, data, tmp_path / "o"), tmp_path, capsys)
    assert rc == 2 and "has no tokenizer" in _one_line(err)


def test_symlink_loop_model_dir(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    for load in (load_tokenizer, lambda p: load_model(p, device="cpu", progress=False)):
        with pytest.raises(CheckpointError, match="cannot be opened: Too many levels of symbolic links"):
            load(a)


BAD_VALUES = [("warmup_ratio", -5), ("warmup_ratio", 1.5), ("num_train_epochs", float("nan")),
              ("weight_decay", -1), ("learning_rate", float("inf")), ("lora_dropout", 1.0), ("lora_alpha", 0),
              ("seed", -1), ("max_grad_norm", -0.5), ("cutoff_len", 0), ("max_steps", -2), ("save_steps", -1),
              ("warmup_steps", -3), ("stream_slots", 1), ("ddp_timeout", 0), ("seed", 2**64), ("stream_cpu_share", 1.5),
              ("stream_cpu_share", -0.1)]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_numeric_config_ranges(key, value):
    base = dict(model_name_or_path="m", dataset="d.jsonl", output_dir="o")
    with pytest.raises(ConfigError, match=rf"'{key}' must be in "):
        load_config({**base, key: value})


def test_every_numeric_key_has_a_range():
    numeric = {k for k, f in _FIELDS.items() if str(f.type).replace(" ", "").split("|")[0] in ("int", "float")}
    assert numeric == set(RANGES), numeric ^ set(RANGES)


def test_interrupted_save_folders_are_cleaned_and_a_half_replaced_checkpoint_restored(trained, tmp_path):
    """A kill between the two renames of a checkpoint replace leaves it as .tmp-checkpoint-N-old: it is put back."""
    model, data, _ = trained
    out = _copy_run(trained, tmp_path)
    os.replace(out / "checkpoint-2", out / ".tmp-checkpoint-2-old")
    (out / ".tmp-checkpoint-3-abc123").mkdir()
    (tmp_path / ".tmp-out-xyz").mkdir()  # a killed final-adapter save sits beside output_dir
    hybridmoe.train(_cfg(model, data, out, max_steps=3, resume_from_checkpoint=True))
    assert not list(out.glob(".tmp-*")) and not list(tmp_path.glob(".tmp-*"))
    assert checkpoint_problem(out / "checkpoint-2") is None
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]



def test_resume_with_other_lora_settings_is_refused(trained, tmp_path):
    model, data, out = trained
    with pytest.raises(ConfigError, match=r"other LoRA settings \(lora_rank 4 -> 8\)"):
        hybridmoe.train(_cfg(model, data, tmp_path / "o", lora_rank=8, resume_from_checkpoint=str(out / "checkpoint-2")))
