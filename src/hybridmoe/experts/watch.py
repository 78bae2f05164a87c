"""Where a non-finite value first appeared in the routed experts, found without a host sync per layer.

The trainer reads the loss and gradient norm once per step (its one host sync). When they are non-finite it skips
the step; to say *where* the NaN/Inf came from, every ``_ExpertsFn`` call records a finiteness flag of its input and
output in forward, and of the gradient arriving at its output and the one it returns for the hidden states in
backward. Each flag is a 0-dim bool tensor on the device the checked tensor lives on (the GPU on the streamed path),
computed by a reduction queued behind the compute: nothing waits for it. The flags are read (synchronising once)
only after the step is already known to be non-finite.

Cost per check: one elementwise pass and one reduction over a [T, H] activation, small next to the expert GEMMs;
memory: one 0-dim tensor per check, dropped at the next step's :meth:`NonFiniteWatch.reset`.
"""

from __future__ import annotations

import torch
from torch import nn

# What each check looks at, in the order a micro-step meets them.
FORWARD_INPUT = "forward input"
FORWARD_OUTPUT = "forward output"
BACKWARD_OUTPUT_GRAD = "backward, gradient arriving at the output"
BACKWARD_INPUT_GRAD = "backward, gradient w.r.t. the hidden states"


class NonFiniteWatch:
    """Per-step record of non-finite values in the routed experts, in the order they were computed."""

    def __init__(self, names: dict[int, str]):
        self._names = names  # id(HybridExperts) -> its module name
        self._events: list[tuple[int, str, torch.Tensor]] = []  # (module id, what, 0-dim bool: non-finite)

    @classmethod
    def attach(cls, model: nn.Module) -> NonFiniteWatch:
        """Watch every HybridExperts of `model` (a PEFT wrapper or the base model); names as in the base model."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PeftModel
        # Every module that notes into a watch (HybridExperts) has a `watch` attribute: found without importing it.
        found = [(n, m) for n, m in base.named_modules() if hasattr(m, "watch") and hasattr(m, "lora")]
        watch = cls({id(m): n for n, m in found})
        for _, m in found:
            m.watch = watch
        watch._modules = [m for _, m in found]
        return watch

    def detach(self) -> None:
        for m in self._modules:
            if m.watch is self:
                m.watch = None
        self.reset()

    def __enter__(self) -> NonFiniteWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def record(self, module: nn.Module, what: str, t: torch.Tensor) -> None:
        """Queue the check `t` has a NaN/Inf; no host sync (the flag stays on t's device)."""
        self._events.append((id(module), what, ~torch.isfinite(t).all()))

    def reset(self) -> None:
        self._events.clear()

    def report(self, limit: int = 8) -> list[str]:
        """'NAME: WHAT' for each place a non-finite value was seen, first occurrences in order (at most `limit`).

        Reads the flags: one host sync, to be paid only when the step is already known to be non-finite."""
        if not self._events:
            return []
        flags = torch.stack([f.cpu() for _, _, f in self._events]).tolist()  # one copy per device-side flag
        out: list[str] = []
        for (mid, what, _), bad in zip(self._events, flags):
            label = f"{self._names.get(mid, '?')}: {what}"
            if bad and label not in out:
                out.append(label)
                if len(out) == limit:
                    break
        return out


def note(module: nn.Module, what: str, t: torch.Tensor) -> None:
    """Called by the experts' autograd function: record `t`'s finiteness if a watch is attached."""
    watch = getattr(module, "watch", None)
    if watch is not None:
        watch.record(module, what, t)
