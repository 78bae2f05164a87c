"""Training checkpoints without pickle: adapter + optimizer/RNG tensors in safetensors + JSON for the rest.

A checkpoint directory ``checkpoint-N`` is built in a temp sibling and renamed into place, so a crash or SIGKILL
mid-save leaves the previous checkpoint intact and no half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import save_adapter
from .errors import ConfigError
from .io import atomic_replace_dir

OPTIM_TENSORS = "optimizer.safetensors"
STATE_JSON = "trainer_state.json"


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


def save_checkpoint(path: Path, model, opt, sched, loop_state, cfg, rng: dict[str, torch.Tensor] | None = None) -> Path:
    """rng: the RNG states to save (default: this process's); with several ranks, every rank's (`rng.rank{R}.*`)."""

    def write(tmp: Path) -> None:
        save_adapter(model, tmp, base_model_name=cfg.model_name_or_path)
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
    try:
        state = json.loads((Path(path) / STATE_JSON).read_text())
        tensors = load_file(str(Path(path) / OPTIM_TENSORS))
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint '{path}' is incomplete or corrupt ({e}); resume from an earlier one") from None
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


def _step_of(p: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else -1


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = [p for p in Path(out_dir).glob("checkpoint-*") if _step_of(p) >= 0 and (p / STATE_JSON).is_file()]
    return max(found, key=_step_of) if found else None


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    found = sorted((p for p in Path(out_dir).glob("checkpoint-*") if _step_of(p) >= 0), key=_step_of)
    for p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
