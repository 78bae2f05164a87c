"""The expert-LoRA gradients a streamed backward stages device->host (cpu_experts._stage_grads): added to .grad when
their own backward pass ends, and never by another pass.

On the GPU the copies are asynchronous and an event marks each; here (no GPU) the same bookkeeping runs with plain
copies and an already-complete event, inside real autograd passes."""

from __future__ import annotations

import pytest
import torch

from hybridmoe.experts import cpu_experts
from hybridmoe.experts.cpu_experts import ExpertLoRA, _stage_grads


class _DoneEvent:
    def record(self, *a):
        pass

    def synchronize(self):
        pass


@pytest.fixture(autouse=True)
def cpu_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _DoneEvent)
    cpu_experts._STAGED.by_task.clear()


def _lora(seed: int) -> ExpertLoRA:
    return ExpertLoRA(2, 3, 4, 2, 4.0)  # its staging buffers: plain here, page-locked on a GPU host


def _grads(lo: ExpertLoRA, value: float):
    return torch.full(lo.A.shape, value), torch.full(lo.B.shape, value)


class _Stage(torch.autograd.Function):
    """Identity whose backward stages `value` as each LoRA's gradient (as _ExpertsFn.backward does), then runs
    `then()` (a nested pass, or an error)."""

    @staticmethod
    def forward(ctx, x, los, value, then):
        ctx.los, ctx.value, ctx.then = los, value, then
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        for lo in ctx.los:
            _stage_grads(lo, _grads(lo, ctx.value))
        if ctx.then is not None:
            ctx.then()
        return g, None, None, None


def _backward(los, value, then=None):
    x = torch.ones(2, requires_grad=True)
    _Stage.apply(x, los, value, then).sum().backward()


def test_gradients_land_when_the_pass_ends_and_accumulate_over_passes():
    a, b = _lora(0), _lora(1)
    _backward([a, b], 1.0)
    assert torch.equal(a.A.grad, torch.ones_like(a.A)) and torch.equal(b.B.grad, torch.ones_like(b.B))
    _backward([a, b], 2.0)  # gradient accumulation: added
    assert torch.equal(a.A.grad, torch.full_like(a.A, 3.0))
    assert not cpu_experts._STAGED.by_task


def test_a_pass_that_raised_leaves_nothing_for_the_next():
    a = _lora(0)

    def fail():
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        _backward([a], 5.0, then=fail)
    assert a.A.grad is None  # never added
    _backward([a], 1.0)
    assert torch.equal(a.A.grad, torch.ones_like(a.A))  # not 6: the failed pass's staged 5 is dropped
    assert torch.equal(a.B.grad, torch.ones_like(a.B))


def test_nested_pass_lands_its_own_and_the_enclosing_pass_keeps_its_own():
    """Reentrant checkpointing runs a nested backward inside the enclosing one; the same LoRA staged in both keeps
    both gradients (the enclosing one's is copied out of the shared buffer before the nested pass reuses it)."""
    outer, inner = _lora(0), _lora(1)
    seen = {}

    def nested():
        with torch.enable_grad():  # as reentrant checkpointing runs its recompute and backward
            _backward([inner, outer], 10.0)
        seen["inner_after_nested"] = inner.A.grad.clone()

    _backward([outer], 1.0, then=nested)
    assert torch.equal(seen["inner_after_nested"], torch.full_like(inner.A, 10.0))  # landed at the nested end
    assert torch.equal(outer.A.grad, torch.full_like(outer.A, 11.0))  # 10 from the nested pass + 1 from its own
    assert torch.equal(inner.B.grad, torch.full_like(inner.B, 10.0))


def test_same_lora_twice_in_one_pass_adds_both():
    a = _lora(0)
    x = torch.ones(2, requires_grad=True)
    y = _Stage.apply(_Stage.apply(x, [a], 1.0, None), [a], 2.0, None)
    y.sum().backward()
    assert torch.equal(a.A.grad, torch.full_like(a.A, 3.0))


def test_a_landed_gradient_is_a_staging_buffer_and_two_buffers_serve_every_step():
    """No copy when a pass lands into an empty .grad, nothing freed by zero_grad: the next pass fills the other."""
    a = _lora(0)
    seen = set()
    for _ in range(4):
        _backward([a], 1.0)  # micro-batch 1: .grad becomes a buffer
        first = a.A.grad.data_ptr()
        _backward([a], 2.0)  # micro-batch 2: staged into the other buffer, added
        assert a.A.grad.data_ptr() == first and torch.equal(a.A.grad, torch.full_like(a.A, 3.0))
        seen |= {first}
        a.A.grad = a.B.grad = None  # zero_grad(set_to_none=True)
    assert len(a._stage_bufs[0]) == 2 and len(a._stage_bufs[1]) == 2
    assert seen <= {b.data_ptr() for b in a._stage_bufs[0]}


def test_staged_gradients_have_their_row_norms_taken_early():
    """Each staged gradient's row norms are computed while the pass goes on; the clip then takes them for the landed
    .grad (the same buffer, unchanged), bitwise what it would compute."""
    from hybridmoe import grad_clip

    a = _lora(0)
    _backward([a], 1.5)
    early = grad_clip.EARLY_ROW_NORMS._ahead
    entry = early[a.A.grad.data_ptr()]
    assert entry[0]() is a.A.grad and entry[1] == a.A.grad._version
    want = grad_clip._device_norm([a.A.grad.clone(), a.B.grad.clone()])
    assert torch.equal(grad_clip._device_norm([a.A.grad, a.B.grad]), want)
    assert a.A.grad.data_ptr() not in early  # taken
