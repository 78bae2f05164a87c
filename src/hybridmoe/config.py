"""The training config: one typed dataclass, validated up front, keys named as in LLaMA-Factory.

Errors name the key and what would fix it; an unknown key names the closest valid one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .lf_compat import classify

log = logging.getLogger("hybridmoe")


@dataclass
class TrainConfig:
    # -- what to train on -----------------------------------------------------------------------------------------
    model_name_or_path: str = ""  # checkpoint directory (config.json + *.safetensors + tokenizer)
    # comma list of dataset_info.json names or .json/.jsonl paths (OpenAI `messages`, ShareGPT `conversations`
    # or alpaca records); see dataset_info.py
    dataset: str = ""
    output_dir: str = ""  # the adapter, trainer_log.jsonl and checkpoint-N/ go here
    cutoff_len: int = 1024  # tokens per example; longer ones are truncated (beginning kept)
    chat_template: str | None = None  # a Jinja template (file or string) for tokenizers that lack one
    # -- LoRA ------------------------------------------------------------------------------------------------------
    lora_rank: int = 8
    lora_alpha: float | None = None  # default 2 x lora_rank, as LLaMA-Factory
    lora_dropout: float = 0.0  # applies to the Linear LoRA on the compute device; routed-expert LoRA has none
    lora_target: str = "all"  # "all" or a comma list of Linear names; "experts" = routed experts
    # -- optimisation ----------------------------------------------------------------------------------------------
    learning_rate: float = 1e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1  # >0 overrides num_train_epochs
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # clip over LoRA on both devices together; 0 disables clipping
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # >0 overrides warmup_ratio
    gradient_checkpointing: bool = True
    seed: int = 42
    # -- bookkeeping -----------------------------------------------------------------------------------------------
    # logging/save/eval_steps: a step count, or below 1 a fraction of the total steps (rounded up), as transformers
    logging_steps: int | float = 10
    logging_strategy: str = "steps"  # steps | epoch (a record at each epoch's end) | no (no loss records)
    save_steps: int | float = 0  # 0: only the final adapter
    save_strategy: str = "steps"  # steps (every save_steps) | epoch (a checkpoint at each epoch's end) | no
    save_total_limit: int = 2  # checkpoint-N directories kept
    resume_from_checkpoint: str | bool | None = None  # a checkpoint-N dir, or true for the latest in output_dir
    max_consecutive_skipped: int = 5  # stop with a diagnosis after this many non-finite steps in a row
    # -- placement -------------------------------------------------------------------------------------------------
    device: str | None = None  # cuda | cpu (default: cuda when available)
    dtype: str | None = None  # bfloat16 | float32 for the compute-device weights
    # bfloat16 | float32 for the CPU expert weights (default: dtype; MXFP4 checkpoints stay MXFP4, FP8 ones become
    # int8); int8: quantized per output row at load, half the host RAM; int4: group-wise, a quarter; the LoRA trains
    # on top of the quantized base weights (QLoRA-style)
    expert_dtype: str | None = None
    # Batches of >= this many tokens run the routed experts on the GPU, their weights streamed from CPU RAM layer by
    # layer (default on CUDA: 64; 0 = always on the CPU). GPU memory: + two layers of expert weights.
    stream_min_tokens: int | None = None
    # Layers of expert weights the GPU keeps while streaming (>= 2). A step copies 2·(MoE layers - stream_slots)
    # layers; each slot costs one layer of expert weights in GPU memory (1.03 GiB for DeepSeek-V2-Lite in bf16).
    stream_slots: int = 2
    # Share of each layer's routed experts computed on the CPU in a streamed inference forward (evaluation; not the
    # training steps, which need one backend's activations), while the others stream to the GPU: the last
    # round(E · share) experts. Default: by expert format (experts.backends.DEFAULT_PREFILL_CPU_SHARE; 0 for now).
    stream_cpu_share: float | None = None
    # The first N MoE layers keep their routed experts on the GPU for the whole run (copied once at load) and compute
    # them there for every batch, decode and training included: N layers of expert weights of GPU memory, N layers
    # fewer read from host RAM per token and copied per step. 0 = none.
    resident_expert_layers: int = 0
    progress: bool = True
    # -- several ranks (torchrun / --nproc; ignored by a single process) ----------------------------------------------
    ddp_timeout: int = 1800  # seconds any collective may wait for the other ranks before the job stops with an error
    expert_shm_dir: str = "/dev/shm"  # tmpfs holding the routed experts once per host, shared by the host's ranks
    expert_grad_reduce: str = "auto"  # auto: via the GPU (NCCL) when training on cuda, else gloo; gloo: always gloo
    # -- data, as LLaMA-Factory reads it (dataset_info.py, templates.py, tokenize_cache.py) -------------------------
    dataset_dir: str = "data"  # where dataset_info.json resolves `dataset` / `eval_dataset` names
    eval_dataset: str | None = None  # comma list like `dataset`; evaluated during training (see eval_steps)
    max_samples: int | None = None  # first N records of each dataset
    # several datasets: concat (then shuffled by the loop), or interleaved as LLaMA-Factory does (mixing.py):
    # interleave_under (stop when one runs out), interleave_over (until every one has given all its records,
    # restarting those that ran out), interleave_once (every record once)
    mix_strategy: str = "concat"
    interleave_probs: str | None = None  # "0.5,0.3,0.2": draw each next record's dataset with these (seeded)
    # a LLaMA-Factory template name (qwen3, llama3, deepseek, ...): checked against the tokenizer's own chat template
    # (which wins; a mismatch warns); supplies a chat template when the tokenizer has none
    template: str | None = None
    default_system: str | None = None  # system prompt for records without one
    enable_thinking: bool | None = None  # passed to the chat template (Qwen3); qwen3_nothink sets false
    train_on_prompt: bool = False  # supervise the prompt tokens too
    mask_history: bool = False  # supervise only the last assistant turn of each conversation
    preprocessing_num_workers: int | None = None  # tokenizer processes (large datasets only; capped at the cores)
    overwrite_cache: bool = False  # re-tokenize even when the content-hash cache has this dataset
    # -- evaluation ------------------------------------------------------------------------------------------------
    val_size: float = 0.0  # < 1: fraction of the training records held out for eval; >= 1: that many records
    eval_strategy: str | None = None  # steps | epoch | no (default: steps when there is an eval set)
    eval_steps: int | float | None = None  # default: logging_steps
    per_device_eval_batch_size: int = 1
    do_eval: bool | None = None  # false: no eval even with an eval set
    # -- observability ---------------------------------------------------------------------------------------------
    plot_loss: bool = False  # training_loss.png (+ training_eval_loss.png) in output_dir, needs matplotlib
    report_to: str | list | None = None  # none | tensorboard | wandb | all (a comma list or YAML list)
    logging_dir: str | None = None  # tensorboard event files (default: output_dir/runs)
    disable_tqdm: bool = False  # same as progress: false
    # -- optimizer (transformers' names) ---------------------------------------------------------------------------
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # -- accepted for LLaMA-Factory YAMLs; checked, otherwise without effect -----------------------------------------
    stage: str = "sft"
    do_train: bool = True
    finetuning_type: str = "lora"
    bf16: bool | None = None  # true -> dtype bfloat16
    overwrite_output_dir: bool = True  # false: refuse to train into an output_dir that holds an adapter
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> TrainConfig:
        for key in ("model_name_or_path", "dataset", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"config key '{key}' is required")
        for key, interval in RANGES.items():
            _check_range(key, getattr(self, key), interval)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_scheduler_type '{self.lr_scheduler_type}' is not one of cosine, linear, constant")
        if self.stage != "sft" or self.finetuning_type != "lora":
            raise ConfigError(f"hybridmoe trains stage=sft with finetuning_type=lora, got {self.stage}/{self.finetuning_type}")
        if self.bf16 and self.dtype is None:
            self.dtype = "bfloat16"
        if self.expert_grad_reduce not in ("auto", "gloo"):
            raise ConfigError(f"expert_grad_reduce '{self.expert_grad_reduce}' is not one of auto, gloo")
        self._validate_llamafactory_keys()
        return self

    def _validate_llamafactory_keys(self) -> None:
        """The keys LLaMA-Factory users bring: LoRA alpha, data mixing, templates, evaluation, reporting."""
        from .templates import check_template_name

        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank

        if self.template is not None:
            check_template_name(self.template)
        if self.mix_strategy not in ("concat", "interleave_under", "interleave_over", "interleave_once"):
            raise ConfigError(f"mix_strategy '{self.mix_strategy}' is not one of concat, interleave_under, "
                              "interleave_over, interleave_once")
        if self.interleave_probs is not None:
            self._validate_interleave_probs()
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ConfigError(f"val_size {self.val_size}: use a fraction < 1 or a whole number of records")
        if self.eval_strategy not in (None, "no", "steps", "epoch"):
            raise ConfigError(f"eval_strategy '{self.eval_strategy}' is not one of no, steps, epoch")
        if self.logging_strategy not in ("no", "steps", "epoch"):
            raise ConfigError(f"logging_strategy '{self.logging_strategy}' is not one of no, steps, epoch")
        if self.save_strategy == "best":
            raise ConfigError("save_strategy 'best' saves on a best metric (metric_for_best_model), which hybridmoe "
                              "does not track; use save_strategy: steps or epoch and pick a checkpoint by the eval "
                              "loss in trainer_log.jsonl")
        if self.save_strategy not in ("no", "steps", "epoch"):
            raise ConfigError(f"save_strategy '{self.save_strategy}' is not one of no, steps, epoch")
        for key in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, key)
            if value is not None and value >= 1:
                if value != int(value):
                    raise ConfigError(f"config key '{key}' is {value}: give a whole number of steps, or a fraction "
                                      "below 1 of the total steps")
                setattr(self, key, int(value))
        if self.disable_tqdm:
            self.progress = False
        from .reporting import parse_report_to

        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"

    def _validate_interleave_probs(self) -> None:
        """As LLaMA-Factory: only for interleaving; one probability per dataset of `dataset` and `eval_dataset`."""
        from .dataset_info import split_names
        from .mixing import check_probs

        if self.mix_strategy == "concat":
            raise ConfigError("interleave_probs is only used with mix_strategy interleave_under, interleave_over or "
                              "interleave_once; set one of them, or remove interleave_probs")
        probs = self.interleave_probabilities()
        for key in ("dataset", "eval_dataset"):
            names = split_names(getattr(self, key))
            if names:
                check_probs(probs, len(names), key)

    def interleave_probabilities(self) -> list[float] | None:
        if self.interleave_probs is None:
            return None
        items = [x.strip() for x in str(self.interleave_probs).split(",") if x.strip()]
        try:
            return [float(x) for x in items]
        except ValueError:
            raise ConfigError(f"interleave_probs '{self.interleave_probs}' is not a comma list of numbers "
                              "(e.g. 0.7,0.3)") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "extra"}

# The valid range of every numeric key, in interval notation ("[" includes the bound, "(" excludes it). A value
# must also be finite (NaN compares false with everything, so it would slip through a plain comparison).
RANGES: dict[str, str] = {
    "cutoff_len": "[1, inf)",
    "lora_rank": "[1, inf)",
    "lora_alpha": "(0, inf)",
    "lora_dropout": "[0, 1)",
    "learning_rate": "(0, inf)",
    "num_train_epochs": "[0, inf)",  # 0 only with max_steps > 0
    "max_steps": "[-1, inf)",  # <= 0: num_train_epochs decides
    "per_device_train_batch_size": "[1, inf)",
    "gradient_accumulation_steps": "[1, inf)",
    "max_grad_norm": "[0, inf)",  # 0: no clipping
    "weight_decay": "[0, inf)",
    "warmup_ratio": "[0, 1]",
    "warmup_steps": "[0, inf)",
    "seed": "[0, 18446744073709551615]",  # torch.manual_seed takes 64-bit seeds
    "logging_steps": "(0, inf)",  # below 1: a fraction of the total steps
    "save_steps": "[0, inf)",  # 0: only the final adapter
    "save_total_limit": "[1, inf)",
    "max_consecutive_skipped": "[1, inf)",
    "stream_min_tokens": "[0, inf)",  # 0 keeps the experts on the CPU
    "stream_slots": "[2, inf)",  # one layer computing, one arriving
    "stream_cpu_share": "[0, 1]",  # a fraction of each layer's experts
    "resident_expert_layers": "[0, inf)",
    "ddp_timeout": "[1, inf)",  # seconds
    # LLaMA-Factory's keys (lf_compat.py)
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_epsilon": "(0, inf)",
    "max_samples": "[1, inf)",  # per dataset; unset: all
    "preprocessing_num_workers": "[1, inf)",
    "val_size": "[0, inf)",  # a fraction < 1, or a whole number of records (checked below)
    "eval_steps": "(0, inf)",
    "per_device_eval_batch_size": "[1, inf)",
}


def _bound(text: str) -> float | int:
    return int(text) if text.lstrip("-").isdigit() else float(text)  # exact for 64-bit integers


def _check_range(key: str, value, interval: str) -> None:
    if value is None:  # an optional key left unset
        return
    lo, hi = (_bound(x.strip()) for x in interval[1:-1].split(","))
    finite = isinstance(value, int) or math.isfinite(value)  # (an int may be too large for a float)
    ok = finite and (lo <= value if interval[0] == "[" else lo < value) and (
        value <= hi if interval[-1] == "]" else value < hi)
    if not ok:
        raise ConfigError(f"config key '{key}' must be in {interval}, got {value}")


def _coerce(key: str, value: Any, field_type: str) -> Any:
    """Check/convert one value against its annotation; strings from `key=value` overrides are parsed as YAML."""
    t = field_type.replace(" ", "")
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if t.startswith("bool") and not isinstance(value, bool) and "str" not in t:
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if t.startswith("int|float"):  # a step count or a fraction of the total steps (checked in validate)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if t.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; LLaMA-Factory's configs take it
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if key == "interleave_probs" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `interleave_probs: 1.0` for a single dataset
    if t.startswith("str") and not isinstance(value, (str, bool)):
        if isinstance(value, (list, tuple)) and key in ("lora_target", "report_to", "dataset", "eval_dataset",
                                                        "interleave_probs"):
            return ",".join(map(str, value))
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def load_config(source: str | os.PathLike | dict | TrainConfig, overrides: dict | list[str] | None = None) -> TrainConfig:
    if isinstance(source, TrainConfig):
        data = source.to_dict()
        extra = dict(source.extra)
    elif isinstance(source, dict):
        data = dict(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            problem = " ".join(str(getattr(e, "problem", None) or e).split())  # yaml's messages span lines
            raise ConfigError(f"{where}: malformed YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the YAML must be a mapping of config keys, got {type(data).__name__}")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data.update(overrides or {})
    # LLaMA-Factory's keys: implemented ones become fields; the others warn once each (lf_compat.py)
    for key in data:
        if not isinstance(key, str):  # YAML allows `0: x` or `null: x` as keys
            raise ConfigError(f"config key {key!r} is not a name; config keys are strings such as 'learning_rate'")
    raw, warnings = classify(data, _FIELDS)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank parses the config; rank 0 tells
        for line in warnings:
            log.warning(line)
    kwargs = {key: _coerce(key, value, str(_FIELDS[key].type)) for key, value in raw.items()}
    cfg = TrainConfig(**kwargs)
    if isinstance(source, TrainConfig):
        cfg.extra.update(extra)
    elif not isinstance(source, dict):
        cfg.extra["config_dir"] = str(Path(source).resolve().parent)  # relative dataset_dir may sit beside it
    return cfg.validate()
