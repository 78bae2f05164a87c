"""Bad inputs a careless or hostile user would try, through the CLI, counted: how many end in exactly one
`hybridmoe: error:` line with a non-zero exit and no traceback. RELIABILITY.md records the result; a later probe
compares with it.

    PYTHONPATH=src python benchmarks/reliability_probe.py [--keep DIR]

Runs on the CPU with a tiny model (about a minute on 2 cores). Prints one line per failed case and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests.helpers


def _setup(root: Path) -> dict[str, Path]:
    from tests.helpers import make_checkpoint, write_dataset

    import hybridmoe

    p = {"model": make_checkpoint("qwen3_moe", root / "model"), "data": write_dataset(root / "data.jsonl", n=8)}
    p["run"] = root / "run"
    hybridmoe.train(dict(model_name_or_path=str(p["model"]), dataset=str(p["data"]), output_dir=str(p["run"]),
                         max_steps=2, save_steps=1, logging_steps=1, device="cpu", progress=False, lora_rank=4,
                         lora_alpha=8, gradient_checkpointing=False, per_device_train_batch_size=2))
    p["adapter"] = p["run"]
    p["file"] = root / "a_file"
    p["file"].write_text("x")
    p["dir"] = root / "a_dir"
    p["dir"].mkdir()
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    p["loop"] = root / "loop_a"
    p["bare_model"] = root / "bare_model"
    shutil.copytree(p["model"], p["bare_model"], ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    p["no_config"] = root / "no_config"
    shutil.copytree(p["model"], p["no_config"], ignore=shutil.ignore_patterns("config.json"))
    p["other_model"] = root / "other_model"
    shutil.copytree(p["model"], p["other_model"])
    for name, edit in {"int_adapter": lambda sd, k: sd.__setitem__(k, sd[k].to(torch.int32)),
                       "nan_adapter": lambda sd, k: sd.__setitem__(k, sd[k] * float("nan")),
                       "shape_adapter": lambda sd, k: sd.__setitem__(k, torch.cat([sd[k], sd[k]], -1))}.items():
        d = root / name
        shutil.copytree(p["adapter"], d, ignore=shutil.ignore_patterns("checkpoint-*"))
        sd = load_file(str(d / "adapter_model.safetensors"))
        key = sorted(k for k in sd if "q_proj.lora_A" in k)[0]
        edit(sd, key)
        save_file(sd, str(d / "adapter_model.safetensors"))
        p[name] = d
    p["trunc_adapter"] = root / "trunc_adapter"
    shutil.copytree(p["adapter"], p["trunc_adapter"], ignore=shutil.ignore_patterns("checkpoint-*"))
    w = p["trunc_adapter"] / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    p["badjson_adapter"] = root / "badjson_adapter"
    shutil.copytree(p["adapter"], p["badjson_adapter"], ignore=shutil.ignore_patterns("checkpoint-*"))
    (p["badjson_adapter"] / "adapter_config.json").write_text("{")
    p["bin_adapter"] = root / "bin_adapter"
    p["bin_adapter"].mkdir()
    (p["bin_adapter"] / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (p["bin_adapter"] / "adapter_model.bin").write_bytes(b"pickle")
    p["bad_ckpt"] = root / "bad_ckpt" / "checkpoint-1"
    shutil.copytree(p["run"] / "checkpoint-1", p["bad_ckpt"])
    (p["bad_ckpt"] / "optimizer.safetensors").write_bytes(b"")
    for name, text in {"ds_badline": '{"messages": [}\n', "ds_empty": "", "ds_noassistant":
                       '{"messages": [{"role": "user", "content": "hi"}]}\n', "ds_badrole":
                       '{"messages": [{"role": "robot", "content": "hi"}]}\n', "ds_object": '{"a": 1}'}.items():
        f = root / f"{name}.jsonl"
        f.write_text(text)
        p[name] = f
    p["ds_latin1"] = root / "ds_latin1.jsonl"
    p["ds_latin1"].write_bytes(b'{"messages": "\xff\xfe"}\n')
    p["ds_txt"] = root / "data.txt"
    p["ds_txt"].write_text("hello")
    p["jinja_bad"] = root / "bad.jinja"
    p["jinja_bad"].write_text("{% for m in messages %}")
    return p


def _train(p: dict, root: Path, name: str, **kw) -> list[str]:
    cfg = dict(model_name_or_path=str(p["model"]), dataset=str(p["data"]), output_dir=str(root / f"out_{name}"),
               max_steps=1, device="cpu", progress=False, gradient_checkpointing=False, lora_rank=4, lora_alpha=8)
    cfg.update({k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()})
    path = root / f"cfg_{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))  # NaN and inf as YAML writes them: .nan, .inf
    return ["train", str(path)]


def cases(p: dict, root: Path) -> dict[str, list[str]]:
    m, a = str(p["model"]), str(p["adapter"])
    raw = {"missing.yaml": "", "malformed.yaml": "a: [1,", "list.yaml": "- 1\n- 2", "intkey.yaml": "0: null"}
    for name, text in raw.items():
        if text:
            (root / name).write_text(text)
    train = {f"train {k}={v}": dict(kv) for k, v, kv in [
        ("learning_rat", 1, {"learning_rat": 1}), ("warmup_ratio", -5, {"warmup_ratio": -5}),
        ("num_train_epochs", "nan", {"num_train_epochs": float("nan"), "max_steps": -1}),
        ("weight_decay", -1, {"weight_decay": -1}), ("learning_rate", "inf", {"learning_rate": float("inf")}),
        ("lora_dropout", 1, {"lora_dropout": 1.0}), ("lora_rank", 0, {"lora_rank": 0}),
        ("lora_rank", "eight", {"lora_rank": "eight"}), ("lora_target", "nonsense", {"lora_target": "nonsense"}),
        ("lr_scheduler_type", "cosin", {"lr_scheduler_type": "cosin"}), ("seed", -1, {"seed": -1}),
        ("max_grad_norm", -1, {"max_grad_norm": -1}), ("cutoff_len", 0, {"cutoff_len": 0}),
        ("stream_slots", 1, {"stream_slots": 1}), ("device", "tpu", {"device": "tpu"}),
        ("dtype", "fp8", {"dtype": "fp8"}), ("expert_dtype", "int3", {"expert_dtype": "int3"}),
        ("model", "missing", {"model_name_or_path": root / "nope"}), ("model", "file", {"model_name_or_path": p["file"]}),
        ("model", "symlink-loop", {"model_name_or_path": p["loop"]}),
        ("model", "no-tokenizer", {"model_name_or_path": p["bare_model"]}),
        ("model", "no-config", {"model_name_or_path": p["no_config"]}),
        ("dataset", "missing", {"dataset": root / "nope.jsonl"}), ("dataset", ".txt", {"dataset": p["ds_txt"]}),
        ("dataset", "bad-json-line", {"dataset": p["ds_badline"]}), ("dataset", "empty", {"dataset": p["ds_empty"]}),
        ("dataset", "no-assistant", {"dataset": p["ds_noassistant"]}), ("dataset", "bad-role", {"dataset": p["ds_badrole"]}),
        ("dataset", "not-utf8", {"dataset": p["ds_latin1"]}), ("dataset", "unknown-format", {"dataset": p["ds_object"]}),
        ("output_dir", "file", {"output_dir": p["file"]}),
        ("resume", "missing", {"resume_from_checkpoint": root / "nope"}),
        ("resume", "damaged", {"resume_from_checkpoint": p["bad_ckpt"]}),
        ("resume", "other-rank", {"resume_from_checkpoint": p["run"] / "checkpoint-1", "lora_rank": 8}),
        ("resume", "true-no-checkpoint", {"resume_from_checkpoint": True}),
        ("chat_template", "missing", {"chat_template": "/nonexistent.jinja"}),
    ]}
    out = {k: _train(p, root, str(i), **kv) for i, (k, kv) in enumerate(train.items())}
    out.update({f"train config {k}": ["train", str(root / k)] for k in raw})
    out["train override not key=value"] = _train(p, root, "ov") + ["max_steps"]
    chat = ["chat", "--model", m, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"]
    out.update({
        "chat --chat-template missing": chat + ["--chat-template", "/nonexistent.jinja"],
        "chat --chat-template directory": chat + ["--chat-template", str(p["dir"])],
        "chat --chat-template invalid": chat + ["--chat-template", str(p["jinja_bad"])],
        "chat --adapter missing": chat + ["--adapter", str(root / "nope")],
        "chat --adapter int32": chat + ["--adapter", str(p["int_adapter"])],
        "chat --adapter NaN": chat + ["--adapter", str(p["nan_adapter"])],
        "chat --adapter other shape": chat + ["--adapter", str(p["shape_adapter"])],
        "chat --adapter truncated": chat + ["--adapter", str(p["trunc_adapter"])],
        "chat --adapter config not JSON": chat + ["--adapter", str(p["badjson_adapter"])],
        "chat --adapter .bin only": chat + ["--adapter", str(p["bin_adapter"])],
        "chat --model symlink loop": ["chat", "--model", str(p["loop"]), "--prompt", "hi"],
        "chat --model without tokenizer": ["chat", "--model", str(p["bare_model"]), "--prompt", "hi", "--device", "cpu"],
        "chat --top-p 0": chat + ["--top-p", "0"],
        "chat --temperature -1": chat + ["--temperature", "-1"],
        "inspect missing": ["inspect", str(root / "nope")],
        "inspect int32": ["inspect", str(p["int_adapter"])],
        "inspect truncated": ["inspect", str(p["trunc_adapter"])],
        "inspect a file": ["inspect", str(p["file"])],
        "export onto another model": ["export", "--model", m, "--adapter", a, "--output", str(p["other_model"])],
        "export onto a file": ["export", "--model", m, "--adapter", a, "--output", str(p["file"])],
        "export inside the model": ["export", "--model", m, "--adapter", a, "--output", str(p["model"] / "x")],
        "export NaN adapter": ["export", "--model", m, "--adapter", str(p["nan_adapter"]), "--output", str(root / "e1")],
        "export int32 adapter": ["export", "--model", m, "--adapter", str(p["int_adapter"]), "--output", str(root / "e2")],
        "export other-shape adapter": ["export", "--model", m, "--adapter", str(p["shape_adapter"]), "--output",
                                       str(root / "e3")],
        "info missing model": ["info", "--model", str(root / "nope")],
        "info symlink loop": ["info", "--model", str(p["loop"])],
        "info int32 adapter": ["info", "--model", m, "--adapter", str(p["int_adapter"]), "--device", "cpu"],
    })
    return out


def run_case(argv: list[str]) -> tuple[bool, str]:
    """(handled, why not): one error line, non-zero exit, no traceback."""
    from hybridmoe.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse rejects a flag: its usage line + exit 2
            code = e.code
        except BaseException:  # noqa: BLE001 - that is what the probe counts
            return False, "traceback: " + traceback.format_exc().strip().splitlines()[-1]
    text = err.getvalue()
    lines = [ln for ln in text.splitlines() if ln.startswith(("hybridmoe: error:", "hybridmoe: error"))]
    if code == 0:
        return False, "accepted (exit 0)"
    if "Traceback" in text:
        return False, "traceback in stderr"
    if len(lines) != 1:
        return False, f"{len(lines)} error lines: {text.strip()[-300:]}"
    return True, lines[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's line")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.keep or tempfile.mkdtemp(prefix="hybridmoe_probe_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        p = _setup(root)
        all_cases = cases(p, root)
        bad = {}
        for name, argv in all_cases.items():
            ok, why = run_case(argv)
            if not ok:
                bad[name] = why
            if args.verbose or not ok:
                print(f"{'ok  ' if ok else 'FAIL'} {name}: {why}", file=sys.stderr)
        print(json.dumps({"probe": "bad_inputs", "tried": len(all_cases), "handled": len(all_cases) - len(bad),
                          "unhandled": bad}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
