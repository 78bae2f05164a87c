"""The training and eval datasets of a config: resolve names, read records, hold out the eval split, tokenize.

`dataset` / `eval_dataset` resolve through dataset_info.json (:mod:`hybridmoe.dataset_info`); `template` is
reconciled with the tokenizer (:mod:`hybridmoe.templates`); tokenization runs in worker processes and is cached by
content hash (:mod:`hybridmoe.tokenize_cache`). `val_size` holds out a seeded random part of the training records
(a fraction below 1, a count from 1 up), as LLaMA-Factory does; with `eval_dataset` set, that is the eval set instead.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from .config import TrainConfig
from .data import Conversation, SFTDataset, TokenizeOptions
from .dataset_info import find_dataset_dir, load_datasets
from .errors import ConfigError, DataError
from .templates import apply_template
from .tokenize_cache import tokenize_cached

log = logging.getLogger("hybridmoe")


@dataclass
class Datasets:
    train: SFTDataset
    eval: SFTDataset | None


def tokenize_options(cfg: TrainConfig, tokenizer) -> TokenizeOptions:
    """The config's tokenize options; reconciles `template` with the tokenizer (may give it a chat template)."""
    kwargs = apply_template(tokenizer, cfg.template)
    if cfg.enable_thinking is not None:
        kwargs["enable_thinking"] = cfg.enable_thinking
    return TokenizeOptions(cfg.cutoff_len, kwargs, cfg.default_system, cfg.train_on_prompt, cfg.mask_history)


def split_eval(conversations: list[Conversation], val_size: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random val_size part (fraction < 1, else a count) held out."""
    n = len(conversations)
    n_eval = int(val_size) if val_size >= 1 else max(1, round(val_size * n))
    if n_eval >= n:
        raise ConfigError(f"val_size {val_size} holds out {n_eval} of {n} records, leaving none to train on; lower "
                          "val_size")
    order = random.Random(seed).sample(range(n), n)
    held = set(order[:n_eval])
    return [c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in order[:n_eval]]


def _check_tools(conversations: list[Conversation], tokenizer, name: str) -> None:
    """Tool-calling records need a chat template that renders tools; otherwise the calls would vanish silently."""
    has_tools = any(getattr(c, "tools", None) or any("tool_calls" in m for m in c) for c in conversations)
    if has_tools and "tool" not in str(tokenizer.chat_template):
        raise DataError(f"dataset '{name}' has tool calls, but the tokenizer's chat template does not render tools; "
                        "use a checkpoint whose template does (Qwen3, DeepSeek-V3, ...) or set chat_template")


def tokenized(conversations: list[Conversation], tokenizer, options: TokenizeOptions, cfg: TrainConfig,
              name: str) -> SFTDataset:
    if not getattr(tokenizer, "chat_template", None):
        SFTDataset([], tokenizer, options)  # raises the one-line "no chat_template" error
    _check_tools(conversations, tokenizer, name)
    examples = tokenize_cached(conversations, tokenizer, options, cfg.preprocessing_num_workers,
                               overwrite=cfg.overwrite_cache)
    return SFTDataset(conversations, tokenizer, options, tokenized=examples)


def build_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    dataset_dir = find_dataset_dir(cfg.dataset_dir, cfg.extra.get("config_dir"))
    options = tokenize_options(cfg, tokenizer)
    probs = cfg.interleave_probabilities()
    train = load_datasets(cfg.dataset, dataset_dir, cfg.max_samples, cfg.seed, cfg.mix_strategy, probs)
    held: list[Conversation] = []
    if cfg.eval_dataset:
        if cfg.val_size:
            log.warning("val_size %s is not used: eval_dataset '%s' is the eval set", cfg.val_size, cfg.eval_dataset)
        held = load_datasets(cfg.eval_dataset, dataset_dir, cfg.max_samples, cfg.seed, cfg.mix_strategy,
                             probs)
    elif cfg.val_size > 0:
        train, held = split_eval(train, cfg.val_size, cfg.seed)
    if not held and (cfg.do_eval or cfg.eval_strategy in ("steps", "epoch")):
        key = "do_eval: true" if cfg.do_eval else f"eval_strategy: {cfg.eval_strategy}"
        raise ConfigError(f"{key} needs an eval set: set val_size (e.g. 0.1) or eval_dataset")
    train_set = tokenized(train, tokenizer, options, cfg, cfg.dataset)
    eval_set = tokenized(held, tokenizer, options, cfg, cfg.eval_dataset or "val_size split") if held else None
    return Datasets(train_set, eval_set)
