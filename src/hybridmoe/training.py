"""LoRA SFT recipe: setup -> train -> save -> report, as one explicit loop (no HF Trainer).

The LoRA lives on two devices: PEFT Linear LoRA on the compute device, routed-expert LoRA on the CPU inside the
experts. One fused AdamW holds both (torch groups its updates by device; on the CPU the fused kernel is ~6x faster
than foreach, benchmarks/adamw_cpu.py), one clip bounds their joint norm.
A step whose loss or gradient norm is non-finite is skipped with no parameter change, counted, logged with the
components whose gradients were non-finite and the places in the routed experts where a NaN/Inf first appeared
(forward output, backward gradient, ...: see :mod:`hybridmoe.experts.watch`), and after `max_consecutive_skipped` in a row training stops with a
diagnosis. The adapter is checked before every write and never written with NaN/Inf.

Under torchrun (several ranks, see :mod:`hybridmoe.distributed`) the same loop runs on every rank: each step's
global batch is the one a single process with ``gradient_accumulation_steps × N`` would take, rank R computing its
share; gradients are summed over ranks, so every rank takes the same optimizer step, and every decision (skip a
non-finite step, stop on Ctrl-C) is agreed by all-reduce. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import distributed
from .adapters import apply_lora, base_model_of, load_adapter, save_adapter
from .components import count_by_component
from .config import TrainConfig, load_config
from .cpu_optim import PlainStep, overlapped_step
from .data import IGNORE_INDEX, batches, collate
from .errors import ConfigError, GPUOutOfMemoryError, NonFiniteError
from .evaluate import eval_loss
from .experts import HybridExperts
from .experts.cpu_experts import PROJECTIONS
from .experts.streaming import model_streamer
from .experts.watch import NonFiniteWatch
from .grad_clip import clip_grad_norm_deferred
from .io import fs_errors, recover_interrupted
from .loading import load_model, load_tokenizer
from .loss import causal_lm_loss
from .memory import card_usage, estimate_memory, format_oom
from .reporting import Reporter, plot_loss
from .train_data import build_datasets
from .train_state import (
    LOG_NAME,
    checkpoint_problem,
    latest_checkpoint,
    load_train_state,
    prune_checkpoints,
    save_checkpoint,
    saved_config,
)

log = logging.getLogger("hybridmoe")

# The log of the run in progress. trainer_log.jsonl is the history of the adapter beside it: it is published with
# the final adapter (and kept in each checkpoint-N up to step N), so a failed or killed run never replaces it.
RUNNING_LOG = "trainer_log.running.jsonl"


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    skipped_steps: int
    final_loss: float
    seconds: float
    peak_gpu_bytes: int
    peak_host_bytes: int
    losses: list[float] = field(default_factory=list)


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken (skipped ones included: their data is consumed)
    epoch: int = 0
    batch_in_epoch: int = 0  # next micro-batch index within the epoch
    skipped: int = 0
    consecutive_skipped: int = 0


def named_trainable(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every trainable LoRA tensor on both devices; expert names follow PEFT's layout roots."""
    out = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, m in base_model_of(model).named_modules():
        if isinstance(m, HybridExperts):
            for proj in PROJECTIONS:  # fixed order: the optimizer state of a resumed run must line up
                if proj in m.lora:
                    lo = m.lora[proj]
                    out += [(f"{name}.{proj}.lora_A", lo.A), (f"{name}.{proj}.lora_B", lo.B)]
    return out


def expert_lora_layers(model) -> list[list]:
    """Each routed-expert layer's LoRA (ExpertLoRA per projection), in forward order."""
    return [list(m.lora.values()) for m in base_model_of(model).modules() if isinstance(m, HybridExperts) and m.lora]


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _total_steps(cfg: TrainConfig, n_examples: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro_per_step = cfg.gradient_accumulation_steps * world_size
    per_epoch = math.ceil(math.ceil(n_examples / cfg.per_device_train_batch_size) / micro_per_step)
    return max(1, math.ceil(per_epoch * cfg.num_train_epochs))


@functools.lru_cache(maxsize=2)
def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    return batches(range(n), batch_size, seed, epoch)  # one shuffle per epoch, not per micro-batch


def every_steps(value: int | float, total_steps: int) -> int:
    """logging/save/eval_steps as a step count: below 1 a fraction of the total steps, rounded up (transformers'
    TrainerState.compute_steps); 0 stays 0 (save_steps: no checkpoints)."""
    return math.ceil(total_steps * value) if 0 < value < 1 else int(value)


def _epochs_done(dataset, cfg: TrainConfig, state: LoopState) -> int:
    """Epochs whose last micro-batch has been taken (the loop moves to the next epoch only when it needs a batch,
    so a step that ends an epoch leaves batch_in_epoch at the epoch's batch count)."""
    n_batches = math.ceil(len(dataset) / cfg.per_device_train_batch_size)
    return state.epoch + (state.batch_in_epoch >= n_batches)


def _next_batch(dataset, cfg: TrainConfig, state: LoopState) -> list[int]:
    """The micro-batch at the current data position; advances (epoch, batch_in_epoch). Deterministic for resume."""
    epoch_batches = _epoch_batches(len(dataset), cfg.per_device_train_batch_size, cfg.seed, state.epoch)
    if state.batch_in_epoch >= len(epoch_batches):
        state.epoch += 1
        state.batch_in_epoch = 0
        epoch_batches = _epoch_batches(len(dataset), cfg.per_device_train_batch_size, cfg.seed, state.epoch)
    idx = epoch_batches[state.batch_in_epoch]
    state.batch_in_epoch += 1
    return idx


def _global_step_batches(dataset, cfg: TrainConfig, state: LoopState, ctx) -> tuple[list[list[int]], list[list[int]]]:
    """(all micro-batches of this step's global batch, this rank's share). Every rank walks the same shuffled order,
    so the global batch equals a single process's with gradient_accumulation_steps × world_size; rank R takes the
    R-th run of gradient_accumulation_steps micro-batches."""
    g = cfg.gradient_accumulation_steps
    every = [_next_batch(dataset, cfg, state) for _ in range(g * ctx.world_size)]
    return every, every[ctx.rank * g : (ctx.rank + 1) * g]


def _nonfinite_components(named: list[tuple[str, torch.Tensor]]) -> dict[str, int]:
    return count_by_component(n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all())


class _Setup:
    """Everything the loop needs, built in order: model, data, LoRA, optimizer, scheduler, (resume)."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.DistContext):
        self.cfg, self.ctx = cfg, ctx
        out = Path(cfg.output_dir)
        if ctx.is_main:
            _prepare_output_dir(out)
        self.resume = resume = self._resume_dir(out)
        if resume is None:
            _check_overwrite(out, cfg)
        else:
            _check_resume_config(resume, cfg, ctx)
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template, cfg.trust_remote_code)
        data = build_datasets(cfg, self.tokenizer)
        self.dataset, self.eval_dataset = data.train, data.eval
        for name, ds in ((cfg.dataset, self.dataset), (cfg.eval_dataset or "val_size split", self.eval_dataset)):
            if ds is None:
                continue
            s = ds.summary()
            distributed.print_main(ctx, f"[hybridmoe] dataset {name}: {s['examples']} examples, {s['tokens']} "
                                   f"tokens ({s['supervised_tokens']} supervised), {s['truncated']} truncated, "
                                   f"{s['dropped']} dropped")
        # Several ranks on this host: the routed experts are held once per host (see distributed.HostSharedExperts).
        shared = distributed.HostSharedExperts(ctx, cfg.expert_shm_dir) if ctx.local_world_size > 1 else None
        base = load_model(cfg.model_name_or_path, device=ctx.device or cfg.device, dtype=cfg.dtype,
                          expert_dtype=cfg.expert_dtype, trust_remote_code=cfg.trust_remote_code,
                          progress=cfg.progress and ctx.is_main, host_shared=shared,
                          stream_min_tokens=cfg.stream_min_tokens, stream_slots=cfg.stream_slots,
                          stream_cpu_share=cfg.stream_cpu_share,
                          resident_expert_layers=cfg.resident_expert_layers)
        self.device = base.hybridmoe.device
        torch.manual_seed(cfg.seed)  # the same LoRA init on every rank
        if resume is not None:  # the LoRA settings of this config (dropout included), the weights of the checkpoint
            self.model = load_adapter(base, resume, trainable=True, lora_dropout=cfg.lora_dropout)
        else:
            self.model = apply_lora(base, cfg.lora_target, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.seed)
        if cfg.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.named = named_trainable(self.model)
        params = [p for _, p in self.named]
        # What runs forward/backward: the loss as a module, under DDP (over the Linear LoRA) with several ranks.
        self.runner = distributed.wrap_ddp(MicroBatchLoss(self.model), ctx)
        # Expert LoRA: CPU tensors outside the module tree (DDP cannot see them); summed by all_reduce_cpu_grads.
        param_ids = {id(p) for p in self.model.parameters()}
        self.expert_params = [p for p in params if id(p) not in param_ids]
        self.total_steps = _total_steps(cfg, len(self.dataset), ctx.world_size)
        self.logging_every = every_steps(cfg.logging_steps, self.total_steps)
        self.save_every = every_steps(cfg.save_steps, self.total_steps)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.total_steps))
        # On a GPU the expert LoRA's AdamW (host RAM) runs while the next forward does (cpu_optim), where that is
        # exact; else the optimizer's own step
        self.stepper = (overlapped_step(self.optimizer, expert_lora_layers(self.model), self.device)
                        or PlainStep(self.optimizer))
        self.state = LoopState()
        if resume is not None:
            rank = ctx.rank if ctx.enabled else None
            self.state = load_train_state(resume, self.optimizer, self.scheduler, LoopState, rank=rank)
            distributed.print_main(ctx, f"[hybridmoe] resumed from {resume} at step {self.state.step}")
        elif ctx.enabled:
            torch.manual_seed(cfg.seed + ctx.rank)  # LoRA dropout: a different stream per rank
        distributed.check_consistent(params, ctx, "LoRA weights at start")

    def optimizer_step(self, clip_coef: torch.Tensor) -> None:
        """The optimizer step; clip_coef: the coefficient the stepper's gradients still need (see the clip)."""
        self.stepper.step(grad_scale=clip_coef)

    def finish_step(self) -> None:
        """Wait until the last optimizer step has updated every tensor (before anything reads them all)."""
        self.stepper.finish()

    def _resume_dir(self, out: Path) -> Path | None:
        r = self.cfg.resume_from_checkpoint
        if r in (None, False, ""):
            return None
        if r is True or r in ("true", "last", "latest"):
            found = latest_checkpoint(out)
            if found is None:
                raise ConfigError(f"resume_from_checkpoint=true but '{out}' has no checkpoint-N directory")
            return found
        p = Path(r)
        if not (p / "trainer_state.json").is_file():
            raise ConfigError(f"resume_from_checkpoint '{p}' is not a checkpoint directory (no trainer_state.json)")
        problem = checkpoint_problem(p)
        if problem is not None:
            raise ConfigError(f"checkpoint '{p}' is damaged: {problem}; resume from an earlier checkpoint "
                              "(resume_from_checkpoint: true picks the newest intact one)")
        return p


class MicroBatchLoss(torch.nn.Module):
    """The training loss of one micro-batch as a module's forward, so that DDP, which hooks into forward, wraps all
    of it: Σ cross-entropy over supervised tokens / n_items (the supervised tokens of the whole global step)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, n_items: int) -> torch.Tensor:
        return causal_lm_loss(self.model, batch, n_items)  # the LM head in chunks: no [tokens, vocab] logits kept


def _micro_step(runner, batch: dict, device, n_items: int) -> torch.Tensor:
    """Forward + backward of one micro-batch (`runner`: MicroBatchLoss, or DDP around it)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    loss = runner(batch, n_items)
    loss.backward()
    return loss.detach()


def _accumulate(runner, micro: list[dict], device, n_items: int) -> torch.Tensor:
    """All micro-batches of this rank; under DDP the gradient all-reduce runs only with the last one's backward."""
    no_sync = getattr(runner, "no_sync", contextlib.nullcontext)
    loss = 0
    for i, b in enumerate(micro):
        with no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
            loss = loss + _micro_step(runner, b, device, n_items)
    return loss


def _supervised(dataset, idx: list[int]) -> int:
    """Supervised tokens of the examples `idx`, as the loss counts them (the model shifts labels by one)."""
    return sum(sum(label != IGNORE_INDEX for label in dataset[i]["labels"][1:]) for i in idx)


def train(config, overrides=None) -> TrainResult:
    """Run LoRA SFT; `config` is a YAML path, a dict or a TrainConfig; `overrides` key=value strings or a dict.

    Under torchrun every rank calls this; with one process it is the plain single-device loop."""
    cfg = load_config(config, overrides)
    ctx = distributed.init(cfg.device, cfg.ddp_timeout)
    try:
        result = _train(cfg, ctx)
    except RuntimeError as e:  # e.g. DDP's all-reduce inside backward, when another rank died or stalled
        if ctx.enabled and distributed.is_comm_error(e):
            raise distributed.DistributedError(distributed.comm_message(ctx, "a gradient all-reduce", e)) from None
        raise
    # Only on success: after a failure the group may hold a dead peer, and the process is about to exit anyway.
    distributed.shutdown(ctx)
    return result


def _train(cfg: TrainConfig, ctx: distributed.DistContext) -> TrainResult:
    setup = _Setup(cfg, ctx)
    model, runner, opt, sched, st, named = setup.model, setup.runner, setup.optimizer, setup.scheduler, setup.state, setup.named
    params = [p for _, p in named]
    via = distributed.expert_grad_device(ctx, cfg.expert_grad_reduce)
    main = ctx.is_main  # only rank 0 writes files, logs and draws the progress bar
    out = Path(cfg.output_dir)
    log_path = out / RUNNING_LOG  # published as trainer_log.jsonl with the final adapter (and each checkpoint)
    if main:
        _start_log(log_path, setup.resume, st.step)
    reporter = Reporter(log_path, cfg.report_to, Path(cfg.logging_dir or out / "runs"), cfg.to_dict()) if main else None
    evaluator = _Evaluator(setup, reporter)
    pad_id = setup.tokenizer.pad_token_id
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)

    t0 = time.perf_counter()
    window = {"loss": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
    losses: list[float] = []
    last_loss = float("nan")
    epochs_done = _epochs_done(setup.dataset, cfg, st)  # a resumed run counts from its checkpoint
    bar = tqdm(total=setup.total_steps, initial=st.step, desc="Training", unit="step",
               disable=not (cfg.progress and main))
    # Where a NaN/Inf first appears in the routed experts: flags queued on the device, read only for a skipped step.
    # A GPU out-of-memory error becomes one line with an estimate of what fits (_OOMReport).
    with _GracefulStop(announce=main) as stop, NonFiniteWatch.attach(model) as watch, _OOMReport(setup) as oom:
        while st.step < setup.total_steps:
            watch.reset()
            every, mine = _global_step_batches(setup.dataset, cfg, st, ctx)
            micro = [collate([setup.dataset[i] for i in idx], pad_id) for idx in mine]
            # The global batch's supervised tokens, counted by every rank from the same indices: the loss stays
            # token-exact across ranks without a collective.
            n_items = max(1, sum(_supervised(setup.dataset, idx) for idx in every))
            oom.at(st.step + 1, micro)
            loss = _accumulate(runner, micro, setup.device, n_items)
            # DDP has summed the Linear LoRA gradients during the last backward; the expert LoRA is summed here.
            distributed.all_reduce_cpu_grads(setup.expert_params, ctx, via)
            # Joint norm over both devices (grouped by device, then the per-device norms combined, as torch does).
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            # the expert LoRA's gradients are scaled by the overlapped step's worker, if there is one
            defer = setup.stepper.tensors
            gnorm, coef = clip_grad_norm_deferred(params, max_norm, defer)
            loss_v, gnorm_v, stop_now = _agree(loss, gnorm, stop.requested, ctx)
            st.step += 1
            if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
                bad = _nonfinite_components(named)
                where = watch.report()  # syncs on the experts' finiteness flags: only on this rare path
                opt.zero_grad(set_to_none=True)  # skipped: no parameter, moment or schedule change
                st.skipped += 1
                st.consecutive_skipped += 1
                if main:
                    reporter.log({"step": st.step, "loss": loss_v if math.isfinite(loss_v) else None,
                                  "skipped": True, "nonfinite_grad_components": bad,
                                  "nonfinite_at": where, "skipped_steps": st.skipped})
                    log.warning("step %d: non-finite loss/grad (loss=%s, grad_norm=%s, components=%s, first in the "
                                "routed experts at %s); skipped", st.step, loss_v, gnorm_v, bad,
                                where[0] if where else "none (finite there on this rank)")
                if st.consecutive_skipped >= cfg.max_consecutive_skipped:
                    raise NonFiniteError(
                        f"{st.consecutive_skipped} consecutive steps had non-finite loss or gradients (last at step "
                        f"{st.step}; components {bad or 'loss only'}"
                        f"{'; first at ' + where[0] if where else ''}); lower learning_rate, keep max_grad_norm > 0, "
                        "or check the data and dtype (float32 rules out bf16 overflow)"
                    )
                bar.update(1)
                _stop_if_asked(stop_now, bar, out, setup)
                continue
            setup.optimizer_step(coef)
            sched.step()
            opt.zero_grad(set_to_none=True)
            st.consecutive_skipped = 0
            # An epoch ended with this step (logging/eval/save_strategy: epoch). A skipped step defers it to the
            # next step taken, as it defers everything else.
            epoch_ended = _epochs_done(setup.dataset, cfg, st) > epochs_done
            epochs_done = _epochs_done(setup.dataset, cfg, st)
            last_loss = loss_v
            losses.append(loss_v)
            window["loss"] += loss_v
            window["n"] += 1
            window["tokens"] += sum(len(setup.dataset[i]["input_ids"]) for idx in every for i in idx)
            if _log_due(cfg.logging_strategy, st.step, setup.logging_every, epoch_ended, setup.total_steps):
                now = time.perf_counter()
                rec = {"step": st.step, "loss": window["loss"] / max(1, window["n"]),
                       "lr": sched.get_last_lr()[0], "grad_norm": gnorm_v, "epoch": st.epoch,
                       "tokens_per_s": window["tokens"] / max(1e-9, now - window["t"]), "skipped_steps": st.skipped,
                       **_memory(setup.device, ctx)}
                if main:
                    reporter.log(rec)
                evaluator.postfix.update(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                         tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.set_postfix(evaluator.postfix)
                window.update(loss=0.0, n=0, tokens=0, t=now)
            evaluator.maybe(st, bar, final=st.step == setup.total_steps, epoch_ended=epoch_ended)
            bar.update(1)
            if st.step < setup.total_steps and _save_due(cfg.save_strategy, st.step, setup.save_every, epoch_ended):
                _checkpoint(out / f"checkpoint-{st.step}", setup)  # (the last step's result is the adapter itself)
            _stop_if_asked(stop_now, bar, out, setup)
    bar.close()
    setup.stepper.close()  # waits for the last step's update first (finish), then ends its worker

    distributed.check_consistent(params, ctx, "final LoRA weights")
    if main:
        _save_final(out, model, setup.tokenizer, cfg)
        reporter.close()
        if cfg.plot_loss:
            plot_loss(out)
    ctx.barrier("saving the adapter")
    seconds = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated(setup.device) if setup.device.type == "cuda" else 0
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = TrainResult(str(out), st.step, st.skipped, last_loss, seconds, peak_gpu, peak_host, losses)
    distributed.print_main(
        ctx, f"[hybridmoe] done: {st.step} steps ({st.skipped} skipped), final loss {last_loss:.4f}, {seconds:.1f}s, "
        f"peak GPU {peak_gpu / 2**30:.2f} GiB, peak host RSS {peak_host / 2**30:.2f} GiB (rank 0); adapter in {out}")
    return result


def _log_due(strategy: str, step: int, every: int, epoch_ended: bool, total_steps: int) -> bool:
    """logging_strategy: a loss record every `every` steps or at each epoch's end, and after the last step."""
    if strategy == "no":
        return False
    return (step % every == 0 if strategy == "steps" else epoch_ended) or step == total_steps


def _save_due(strategy: str, step: int, every: int, epoch_ended: bool) -> bool:
    """save_strategy: a checkpoint every `every` steps (0: none) or at each epoch's end."""
    if strategy == "steps":
        return every > 0 and step % every == 0
    return strategy == "epoch" and epoch_ended


class _Evaluator:
    """Eval loss on the held-out set every eval_steps (or each epoch), and after the last step; into
    trainer_log.jsonl, the trackers and the progress bar."""

    def __init__(self, setup: _Setup, reporter: Reporter | None):
        cfg = setup.cfg
        self.setup, self.reporter = setup, reporter
        self.postfix: dict[str, str] = {}
        self.strategy = cfg.eval_strategy or "steps"
        if setup.eval_dataset is None or self.strategy == "no" or cfg.do_eval is False:
            self.strategy = "no"
        # default logging_steps, as transformers; a fraction of the total steps is resolved after inheriting it
        self.every = every_steps(cfg.eval_steps or cfg.logging_steps, setup.total_steps)

    def maybe(self, st: LoopState, bar, final: bool, epoch_ended: bool) -> None:
        if self.strategy == "no":
            return
        due = st.step % self.every == 0 if self.strategy == "steps" else epoch_ended
        if not (due or final):
            return
        s, ctx = self.setup, self.setup.ctx
        # the same eval batches on every rank count (each takes every N-th), so all ranks must call this together
        rec = {"step": st.step, **eval_loss(s.model, s.eval_dataset, s.cfg.per_device_eval_batch_size, s.device,
                                            s.tokenizer.pad_token_id, ctx)}
        if self.reporter is not None:
            self.reporter.log(rec)
        self.postfix["eval_loss"] = f"{rec['eval_loss']:.4f}"
        bar.set_postfix(self.postfix)


def _check_overwrite(out: Path, cfg: TrainConfig) -> None:
    """overwrite_output_dir: false keeps an adapter that is already in output_dir."""
    if not cfg.overwrite_output_dir and (out / "adapter_config.json").exists():
        raise ConfigError(f"output_dir '{out}' already holds an adapter and overwrite_output_dir is false; choose "
                          "another output_dir, set overwrite_output_dir: true, or resume_from_checkpoint")


class _OOMReport:
    """Turns torch.cuda.OutOfMemoryError inside the loop into a GPUOutOfMemoryError naming the step and batch.

    Nothing of the failing step has been applied or written by then (writes are atomic and happen after a step),
    so the last checkpoint stays as it was."""

    def __init__(self, setup: _Setup):
        self.setup, self.step, self.micro = setup, 0, []

    def at(self, step: int, micro: list[dict]) -> None:
        self.step, self.micro = step, micro

    def __enter__(self) -> _OOMReport:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, torch.cuda.OutOfMemoryError):
            raise GPUOutOfMemoryError(_oom_line(self.setup, self.micro, self.step)) from None


def _oom_line(setup: _Setup, micro: list[dict], step: int) -> str:
    """The one-line out-of-memory report of a training step: the batch, the card, what fits, what to change."""
    cfg = setup.cfg
    b, length = max((tuple(m["input_ids"].shape) for m in micro), key=lambda s: s[0] * s[1], default=(0, 0))
    est = estimate_memory(setup.model, training=True, gradient_checkpointing=cfg.gradient_checkpointing)
    card, used = card_usage(setup.device)
    advice = "lower per_device_train_batch_size or cutoff_len (raise gradient_accumulation_steps to keep the batch)"
    if not cfg.gradient_checkpointing:
        advice += ", turn gradient_checkpointing on"
    streamer = model_streamer(setup.model)
    if streamer is not None and streamer.num_slots > 2:
        per_slot = est.expert_slots / streamer.num_slots / 2**30
        advice += f", lower stream_slots (now {streamer.num_slots}; each slot is {per_slot:.2f} GiB)"
    if est.expert_slots:
        advice += f", or set stream_min_tokens above {b * length} to run the routed experts on the CPU"
    return format_oom(est, f"at step {step} (batch {b} x {length} tokens)", card, used, advice)


def _agree(loss: torch.Tensor, gnorm: torch.Tensor, stop_requested: bool, ctx) -> tuple[float, float, bool]:
    """The step's one host sync. With several ranks, one all-reduce makes the loss global (each rank's is its share
    of the global-token-normalised loss) and the skip and stop decisions common, so ranks never diverge."""
    loss_v, gnorm_v = float(loss), float(gnorm)
    if not ctx.enabled:
        return loss_v, gnorm_v, stop_requested
    # fp32 like the loss itself: with two ranks the sum is bitwise the single-process accumulation
    agreed = torch.tensor([loss_v, 0.0 if math.isfinite(gnorm_v) else 1.0, float(stop_requested)])
    ctx.all_reduce_sum(agreed, "the step's loss/skip/stop all-reduce")
    loss_v = float(agreed[0])
    if agreed[1] > 0:
        gnorm_v = float("nan")
    return loss_v, gnorm_v, bool(agreed[2] > 0)


def _checkpoint(path: Path, setup: _Setup) -> Path:
    """Save checkpoint-N: rank 0 writes, every rank takes part (RNG states, consistency check) and waits for it."""
    ctx = setup.ctx
    setup.finish_step()
    rng = _rng_states(ctx)
    moments = [t for s in setup.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    distributed.check_consistent([p for _, p in setup.named] + moments, ctx, "LoRA weights and optimizer state")
    if ctx.is_main:
        save_checkpoint(path, setup.model, setup.optimizer, setup.scheduler, setup.state, setup.cfg, rng=rng,
                        log_file=path.parent / RUNNING_LOG)
        prune_checkpoints(path.parent, setup.cfg.save_total_limit)
    ctx.barrier("saving a checkpoint")
    return path


def _rng_states(ctx) -> dict[str, torch.Tensor] | None:
    """Every rank's RNG states (LoRA dropout draws a different stream per rank), for an exact resume."""
    if not ctx.enabled:
        return None  # save_checkpoint takes this process's
    cpu = ctx.all_gather(torch.get_rng_state(), "RNG state gather")
    out = {"rng.cpu": cpu[0].clone()}  # rank 0's under the single-process key: a 1-rank resume still works
    out.update({f"rng.rank{r}.cpu": s for r, s in enumerate(cpu)})
    if ctx.device.type == "cuda":
        cuda = ctx.all_gather(torch.cuda.get_rng_state(ctx.device), "RNG state gather")  # CPU ByteTensors
        out.update({f"rng.rank{r}.cuda": s for r, s in enumerate(cuda)})
    return out


class _GracefulStop:
    """First Ctrl-C (SIGINT): finish the current step, save a checkpoint, stop. A second one aborts at once.

    Stopping only at a step boundary keeps the checkpoint consistent: optimizer, schedule and data position all
    describe the same completed step, so resuming reproduces an uninterrupted run.
    """

    def __init__(self, announce: bool = True):
        self.announce = announce  # with several ranks every rank gets the signal; one message is enough

    def __enter__(self) -> _GracefulStop:
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\n[hybridmoe] stopping after this step to save a checkpoint (Ctrl-C again to abort without "
                  "saving)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _stop_if_asked(stop_now: bool, bar, out: Path, setup: _Setup) -> None:
    if not stop_now:
        return
    bar.close()
    st = setup.state
    ck = _checkpoint(out / f"checkpoint-{st.step}", setup)
    distributed.print_main(setup.ctx, f"[hybridmoe] interrupted at step {st.step}: saved {ck}; continue with "
                           f"resume_from_checkpoint={ck}")
    raise KeyboardInterrupt


def _memory(device: torch.device, ctx) -> dict[str, float]:
    """Peak GPU memory so far and current host memory, for the log: a time-limited run still reports its footprint.

    host_private_gib: memory no other process shares (with several ranks: summed over rank 0's host), the measure in
    which a per-rank copy of the experts would show; host_shared_experts_gib: the host-shared experts, counted once.
    Reading /proc/self/smaps walks the page tables: milliseconds per GiB mapped, paid on logging steps only.
    """
    out = {"host_rss_gib": round(_rss_bytes() / 2**30, 3)}
    if ctx.enabled:
        out.update(distributed.host_memory(ctx))  # a collective: every rank logs on the same steps
    else:
        out["host_private_gib"] = round(distributed.process_memory()["private"] / 2**30, 4)
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["gpu_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)  # now: a leak shows as growth here
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: fall back to the peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Settings a resumed run must share with its checkpoint: the LoRA's shape (else the weights and optimizer state do
# not fit), and those that change the numbers (else the run is not the one the checkpoint continues; allowed, with a
# warning). max_steps, save_steps/save_strategy, logging and placement may change freely.
_RESUME_MUST_MATCH = ("lora_rank", "lora_alpha", "lora_target")
_RESUME_SHOULD_MATCH = ("lora_dropout", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_ratio",
                        "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len",
                        "seed", "dataset", "expert_dtype", "max_grad_norm", "mix_strategy", "interleave_probs")


def _check_resume_config(resume: Path, cfg: TrainConfig, ctx) -> None:
    saved = saved_config(resume)
    changed = [k for k in _RESUME_MUST_MATCH + _RESUME_SHOULD_MATCH if k in saved and saved[k] != getattr(cfg, k)]
    diff = ", ".join(f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
    if any(k in _RESUME_MUST_MATCH for k in changed):
        raise ConfigError(f"checkpoint '{resume}' was trained with other LoRA settings ({diff}); resume with the "
                          "checkpoint's lora_rank, lora_alpha and lora_target")
    if changed and ctx.is_main:
        log.warning("resuming %s with changed settings (%s): the run will differ from an uninterrupted one",
                    resume, diff)


def _prepare_output_dir(out: Path) -> None:
    """Create output_dir, and clean up after a killed run: temp folders of interrupted saves are removed (a
    checkpoint renamed aside mid-replace is put back)."""
    with fs_errors("cannot create output_dir", out):
        out.mkdir(parents=True, exist_ok=True)
        found = recover_interrupted(out) + recover_interrupted(out.parent, out.name)
    if found:
        log.info("cleaned up %d temp folder(s) of interrupted saves in %s", len(found), out)


def _start_log(path: Path, resume: Path | None, step: int) -> None:
    """The running log starts empty, or, on resume, as the history up to the resumed step: the checkpoint's own
    copy when it has one, else this run's running log cut at that step (the killed attempt's later lines go)."""
    with fs_errors("cannot write the training log", path):
        if resume is None:
            path.unlink(missing_ok=True)
            return
        kept = resume / LOG_NAME
        lines = kept.read_text().splitlines() if kept.is_file() else (
            path.read_text().splitlines() if path.is_file() else [])
        lines = [line for line in lines if _step_of_line(line) <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _step_of_line(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run: dropped


def _save_final(out: Path, model, tokenizer, cfg: TrainConfig) -> None:
    running = out / RUNNING_LOG

    def extra(tmp: Path) -> None:  # tokenizer files may be binary (sentencepiece): saved as they are
        tokenizer.save_pretrained(str(tmp))
        (tmp / "hybridmoe_train.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # published with the adapter whose history it is (empty rather than an older run's beside this adapter)
        if running.is_file():
            shutil.copyfile(running, tmp / LOG_NAME)
        else:
            (tmp / LOG_NAME).write_text("")

    save_adapter(model, out, base_model_name=cfg.model_name_or_path, write_extra=extra)
    running.unlink(missing_ok=True)


__all__ = ["TrainResult", "expert_lora_layers", "named_trainable", "train"]
