"""Training checkpoints without pickle: adapter + optimizer/RNG tensors in safetensors + JSON for the rest.

A checkpoint directory ``checkpoint-N`` is built in a temp sibling and renamed into place, so a crash or SIGKILL
mid-save leaves the previous checkpoint intact and no half-written one. Before a resume every file of the checkpoint
is checked (:func:`checkpoint_problem`: JSON parses, safetensors headers parse and their sizes add up), so a file
damaged later (a full disk, a bad copy) is named instead of failing deep inside a loader; ``resume_from_checkpoint:
true`` then falls back to the newest intact checkpoint.
It also holds ``trainer_log.jsonl``, the log up to step N: a resumed run continues from that history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from .errors import ConfigError
from .io import atomic_replace_dir

log = logging.getLogger("hybridmoe")

OPTIM_TENSORS = "optimizer.safetensors"
STATE_JSON = "trainer_state.json"
LOG_NAME = "trainer_log.jsonl"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def save_checkpoint(path: Path, model, opt, sched, loop_state, cfg, rng: dict[str, torch.Tensor] | None = None,
                    log_file: Path | None = None) -> Path:
    """rng: the RNG states to save (default: this process's); with several ranks, every rank's (`rng.rank{R}.*`).
    log_file: the run's log so far, kept in the checkpoint as the history of its step."""

    def write(tmp: Path) -> None:
        save_adapter(model, tmp, base_model_name=cfg.model_name_or_path)
        if log_file is not None and Path(log_file).is_file():
            shutil.copyfile(log_file, tmp / LOG_NAME)
        tensors, groups = _optimizer_tensors(opt)
        tensors.update(_rng_tensors() if rng is None else rng)
        save_file(tensors, str(tmp / OPTIM_TENSORS))
        sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        state = {"loop": dataclasses.asdict(loop_state), "optimizer": groups, "scheduler": sched_sd,
                 "config": cfg.to_dict()}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2))

    return atomic_replace_dir(Path(path), write)


def load_train_state(path: Path, opt, sched, state_cls, rank: int | None = None):
    """Restore optimizer moments, scheduler, RNG and the data position from `path` (after the adapter is loaded).

    rank: in a multi-rank run, restore that rank's RNG (`rng.rank{R}.cpu/.cuda`) when the checkpoint has it."""
    problem = checkpoint_problem(Path(path))
    if problem is not None:
        raise ConfigError(f"checkpoint '{path}' is damaged: {problem}; resume from an earlier checkpoint "
                          "(resume_from_checkpoint: true picks the newest intact one)")
    from safetensors import SafetensorError

    state = json.loads((Path(path) / STATE_JSON).read_text())
    try:
        tensors = load_file(str(Path(path) / OPTIM_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint '{path}' is damaged: {OPTIM_TENSORS} cannot be read ({' '.join(str(e).split())}); "
                          "resume from an earlier checkpoint") from None
    try:
        return _restore(path, state, tensors, opt, sched, state_cls, rank)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"checkpoint '{path}' is damaged: {STATE_JSON} or {OPTIM_TENSORS} does not describe this "
                          f"run's optimizer ({type(e).__name__}: {e}); resume from an earlier checkpoint") from None


def _restore(path, state: dict, tensors: dict, opt, sched, state_cls, rank: int | None):
    per_param: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = t
    params = [p for g in opt.param_groups for p in g["params"]]
    if per_param and max(per_param) >= len(params):
        raise ConfigError(f"checkpoint '{path}' was saved for a different set of LoRA targets; resume with the same config")
    opt.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    sched.load_state_dict({**sched.state_dict(), **state["scheduler"]})
    if rank is not None and f"rng.rank{rank}.cpu" in tensors:
        torch.set_rng_state(tensors[f"rng.rank{rank}.cpu"])
        if torch.cuda.is_available() and f"rng.rank{rank}.cuda" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.rank{rank}.cuda"])  # this rank's current device
        return state_cls(**state["loop"])
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state_cls(**state["loop"])


def saved_config(path: Path) -> dict:
    """The training config a checkpoint was saved with ({} when it predates this record or is unreadable)."""
    try:
        cfg = json.loads((Path(path) / STATE_JSON).read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _step_of(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoint-N directories in `out_dir`, oldest first."""
    return sorted((p for p in Path(out_dir).glob("checkpoint-*") if _step_of(p) >= 0 and p.is_dir()), key=_step_of)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged newer ones are named in one warning line."""
    damaged = []
    for p in reversed(checkpoints(out_dir)):
        problem = checkpoint_problem(p)
        if problem is None:
            if damaged:
                log.warning("%s; resuming from %s instead", "; ".join(damaged), p.name)
            return p
        damaged.append(f"{p.name} is damaged ({problem})")
    if damaged:
        raise ConfigError(f"no intact checkpoint in '{out_dir}': {'; '.join(damaged)}; start without "
                          "resume_from_checkpoint")
    return None


def safetensors_problem(f: Path) -> str | None:
    """Why `f` is not a whole safetensors file (missing, truncated, header not JSON, sizes that do not add up), or
    None. Reads only the header: cheap enough to run over every file of a checkpoint before a resume."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f.name} has {size} bytes, fewer than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{f.name} is truncated (its header needs {n} bytes, the file has {size - 8} after the length)"
            header = json.loads(fh.read(n))
        entries = [v for k, v in header.items() if k != "__metadata__"]
        end = max((int(v["data_offsets"][1]) for v in entries), default=0)
    except FileNotFoundError:
        return f"{f.name} is missing"
    except OSError as e:
        return f"{f.name} cannot be read ({os.strerror(e.errno) if e.errno else e})"
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError):
        return f"{f.name} has a header that is not safetensors JSON"
    if 8 + n + end != size:
        return f"{f.name} has {size} bytes but its header describes {8 + n + end} (truncated or overwritten)"
    return None


def _json_problem(f: Path, keys: tuple[str, ...] = ()) -> str | None:
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        return f"{f.name} is missing"
    except OSError as e:
        return f"{f.name} cannot be read ({os.strerror(e.errno) if e.errno else e})"
    except (ValueError, UnicodeDecodeError):
        return f"{f.name} is not valid JSON"
    if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in keys):
        return f"{f.name} lacks {', '.join(keys) or 'a JSON object'}"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """The first damaged file of checkpoint-N and what is wrong with it, or None when all are intact."""
    for problem in (_json_problem(path / STATE_JSON, ("loop", "optimizer", "scheduler")),
                    _json_problem(path / ADAPTER_CONFIG), safetensors_problem(path / ADAPTER_WEIGHTS),
                    safetensors_problem(path / OPTIM_TENSORS)):
        if problem is not None:
            return problem
    return None


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    for p in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
