"""The AdamW step of the routed experts' LoRA (fp32 masters in host RAM), run while the next step's forward runs.

The trainer's one AdamW holds both the LoRA on the GPU (attention, dense MLPs, shared experts) and the experts' LoRA in
host RAM. ``optimizer.step()`` updates the host part on the CPU while the GPU waits for the next forward: V2-Lite's
110.8M values take ~33 ms with the fused kernel, 3-6% of a training step (S10-a/b traces: the GPU idle across
``_fused_adamw_``). :class:`OverlappedStep` takes the step apart:

  1. the GPU part exactly as ``optimizer.step()`` does it (the host masters' gradients hidden for the call, so it
     skips them): its kernels are queued, nothing waits;
  2. the host part on one worker thread, one expert layer at a time in forward order. Each layer's masters are
     marked pending (``ExpertLoRA.update``, an event) until their update is done; the next forward starts at once
     and a layer's experts wait only for their own update (``HybridExperts.forward``), which is long done by then:
     the worker needs ~1.3 ms a V2-Lite layer, the forward ~15.

Exact: the same ``torch._fused_adamw_`` kernel over the same tensors, hyperparameters and state as
``AdamW(fused=True).step()`` (elementwise per tensor, so grouping by layer changes nothing; tests/test_cpu_optim.py
compares bit for bit), and state created as torch creates it, so checkpoints and resumes are unchanged.
Only for ``torch.optim.AdamW(fused=True)`` without amsgrad/maximize; anything else steps as before.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .experts.cpu_experts import ExpertLoRA

__all__ = ["OverlappedStep", "PlainStep", "overlapped_step"]


class OverlappedStep:
    """``step()``: ``optimizer.step()`` with the host masters of `layers` (each a list of one expert layer's
    ExpertLoRA, in forward order) updated on a worker thread; ``finish()``: wait for that update (raising its
    error)."""

    def __init__(self, optimizer: torch.optim.AdamW, layers: Sequence[Sequence[ExpertLoRA]]):
        self.optimizer = optimizer
        self.layers = [list(los) for los in layers if los]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridmoe-adamw")
        self._job: Future | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The host masters this step updates on its worker (their gradients may be left unscaled by the clip:
        :func:`hybridmoe.grad_clip.clip_grad_norm_deferred`, then ``step(grad_scale=coef)``)."""
        return [t for los in self.layers for lo in los for t in lo.parameters()]

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """grad_scale: the clip coefficient the host masters' gradients have not been multiplied by yet (the worker
        does it, with the clip's own ``_foreach_mul_``, before their update)."""
        self.finish()  # the previous step's host part (its error, if any, surfaces here)
        # looked up at every step: load_state_dict (a resume) replaces the group dicts the scheduler then updates
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        work = []  # per layer: (its LoRA, [(param, grad, group)])
        for los in self.layers:
            items = [(t, t.grad, group_of[id(t)]) for lo in los for t in lo.parameters()
                     if t.grad is not None and id(t) in group_of]
            if items:
                work.append((los, items))
        hidden = [(t, g) for _, items in work for t, g, _ in items]
        for t, _ in hidden:
            t.grad = None
        try:
            self.optimizer.step()  # everything else: GPU kernels queued, any host tensor outside `layers`
        finally:
            for t, g in hidden:
                t.grad = g
        if not work:
            return
        jobs = []
        for los, items in work:
            jobs.append((los, [_adamw_args(self.optimizer, t, g, group) for t, g, group in items]))
            for lo in los:
                lo.update = threading.Event()
        scale = None if grad_scale is None else grad_scale.detach().to("cpu")  # (a sync if on the GPU: the clip's own)
        self._job = self._pool.submit(_run, jobs, scale)

    def finish(self) -> None:
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        self.finish()
        self._pool.shutdown(wait=True)


class PlainStep:
    """The optimizer's own step behind :class:`OverlappedStep`'s interface, where that does not apply: nothing is
    deferred (every gradient is clipped in place, so ``grad_scale`` has been applied already) and nothing runs
    after ``step()`` returns."""

    tensors: tuple[torch.Tensor, ...] = ()

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        self.optimizer.step()

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def overlapped_step(optimizer: torch.optim.Optimizer, layers: Sequence[Sequence[ExpertLoRA]],
                    device: torch.device) -> OverlappedStep | None:
    """An :class:`OverlappedStep` where it helps and is exact: a CUDA model (on the CPU the forward would compete
    for the same cores), a fused AdamW without amsgrad/maximize, expert LoRA to update. None otherwise."""
    if device.type != "cuda" or not isinstance(optimizer, torch.optim.AdamW) or not any(layers):
        return None
    for g in optimizer.param_groups:
        if not g.get("fused") or g.get("amsgrad") or g.get("maximize") or g.get("differentiable"):
            return None
    return OverlappedStep(optimizer, layers)


def _adamw_args(opt: torch.optim.AdamW, p: torch.Tensor, grad: torch.Tensor, group: dict) -> tuple:
    """(param, grad, exp_avg, exp_avg_sq, step, hyperparameters) for one host tensor, its state created as
    ``AdamW._init_group`` creates it for a fused step (step: a float32 scalar tensor on the param's device)."""
    state = opt.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    lr = group["lr"]
    hyper = {"lr": lr.item() if torch.is_tensor(lr) else lr, "beta1": float(group["betas"][0]),
             "beta2": float(group["betas"][1]), "weight_decay": group["weight_decay"], "eps": group["eps"]}
    return p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], hyper


def _run(jobs: list[tuple[list[ExpertLoRA], list[tuple]]], grad_scale: torch.Tensor | None = None) -> None:
    """The worker: each layer's gradients scaled by the clip coefficient (if given), its tensors updated as torch's
    fused AdamW step updates them, then the layer released. Every layer is released even if one fails (the failure
    is raised by ``finish``)."""
    try:
        with torch.no_grad():
            for los, args in jobs:
                if grad_scale is not None:
                    torch._foreach_mul_([a[1] for a in args], grad_scale)
                for p, grad, exp_avg, exp_avg_sq, step, hyper in args:
                    torch._foreach_add_([step], 1)
                    torch._fused_adamw_([p], [grad], [exp_avg], [exp_avg_sq], [], [step], amsgrad=False,
                                        maximize=False, grad_scale=None, found_inf=None, **hyper)
                for lo in los:
                    lo.update.set()
    finally:
        for los, _ in jobs:
            for lo in los:
                if lo.update is not None:
                    lo.update.set()
