"""Where training metrics go: trainer_log.jsonl always; TensorBoard and wandb on request; loss plots at the end.

- `report_to`: ``none`` (default), ``tensorboard``, ``wandb``, ``all`` (those of the two that are installed), as a
  comma list or a YAML list, like transformers. TensorBoard event files go to `logging_dir` (default
  ``output_dir/runs``) through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package); wandb logs under
  ``output_dir/wandb`` in the mode its own settings pick (``WANDB_MODE=offline`` to stay local). A requested tracker
  that is not installed gets one warning line, and training goes on.
- `plot_loss: true` writes ``training_loss.png`` (and ``training_eval_loss.png`` when there was an eval) from
  trainer_log.jsonl, with matplotlib, as LLaMA-Factory does: the logged values and an exponential moving average.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import fs_errors

log = logging.getLogger("hybridmoe")

TRACKERS = ("tensorboard", "wandb")
UNSUPPORTED = ("swanlab", "mlflow", "trackio", "comet_ml", "clearml", "neptune", "dvclive", "codecarbon",
               "azure_ml", "dagshub", "flyte")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def parse_report_to(value: str | list | None) -> list[str]:
    """The trackers to use, in order; 'none'/None -> []. Unknown names are an error, known but unsupported ones
    (swanlab, mlflow, ...) warn and are dropped."""
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    out: list[str] = []
    for name in (str(i).strip() for i in items):
        if name in ("", "none"):
            continue
        if name == "all":
            out += [t for t in TRACKERS if _installed(t)]
        elif name in TRACKERS:
            out.append(name)
        elif name in UNSUPPORTED:
            log.warning("report_to '%s' is not supported here (only tensorboard and wandb); its logs are skipped",
                        name)
        else:
            raise ConfigError(f"report_to '{name}' is not one of none, tensorboard, wandb, all")
    return list(dict.fromkeys(out))


class Reporter:
    """Fans each log record out to trainer_log.jsonl and the requested trackers (rank 0 only)."""

    def __init__(self, log_path: Path, report_to: str, logging_dir: Path, run_config: dict[str, Any]):
        self.log_path = log_path
        self.tb = None
        self.wandb = None
        for name in parse_report_to(report_to):
            if name == "tensorboard":
                self.tb = self._tensorboard(logging_dir)
            elif name == "wandb":
                self.wandb = self._wandb(log_path.parent, run_config)

    @staticmethod
    def _tensorboard(logging_dir: Path):
        if not _installed("tensorboard"):
            log.warning("report_to tensorboard: the tensorboard package is not installed (pip install "
                        "'hybridmoe[tensorboard]'); no event files are written")
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(logging_dir))

    @staticmethod
    def _wandb(output_dir: Path, run_config: dict[str, Any]):
        if not _installed("wandb"):
            log.warning("report_to wandb: wandb is not installed (pip install wandb); nothing is sent to wandb")
            return None
        import wandb

        return wandb.init(dir=str(output_dir), config=run_config, project=os.environ.get("WANDB_PROJECT", "hybridmoe"))

    def log(self, rec: dict[str, Any]) -> None:
        # a full disk or a vanished output_dir: one line naming the file (io.fs_errors), not a traceback
        with fs_errors("cannot append to the training log", self.log_path), open(self.log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        step = rec["step"]
        scalars = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                # transformers' layout: train/loss, eval/loss, ... so dashboards from LLaMA-Factory runs line up
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
                            for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# -- loss plots ---------------------------------------------------------------------------------------------------------


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average whose weight grows with the number of points (LLaMA-Factory's curve shape)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def read_log(log_path: Path) -> list[dict]:
    if not log_path.is_file():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def plot_loss(output_dir: Path) -> list[Path]:
    """training_loss.png (+ training_eval_loss.png) from output_dir/trainer_log.jsonl; the files written."""
    if not _installed("matplotlib"):
        log.warning("plot_loss: matplotlib is not installed (pip install 'hybridmoe[plot]'); no loss plot written")
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_log(Path(output_dir) / "trainer_log.jsonl")
    written = []
    for key, name in (("loss", "training_loss.png"), ("eval_loss", "training_eval_loss.png")):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not r.get("skipped")]
        if not points:
            continue
        steps, values = [s for s, _ in points], [v for _, v in points]
        fig = plt.figure()
        plt.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        plt.plot(steps, smooth(values), color="#1f77b4", label="smoothed")
        plt.title(f"{key} of {Path(output_dir).name}")
        plt.xlabel("step")
        plt.ylabel(key)
        plt.legend()
        path = Path(output_dir) / name
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written
