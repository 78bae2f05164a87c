"""hybridmoe.grad_clip.clip_grad_norm against torch.nn.utils.clip_grad_norm_ (norm 2)."""

from __future__ import annotations

import math

import pytest
import torch

from hybridmoe.grad_clip import clip_grad_norm, clip_grad_norm_deferred


def _params(seed: int, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 8, 30), (64, 30, 8), (7,), (3, 5), ()]  # expert-LoRA-like, a bias, a matrix, a scalar
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    ps.append(torch.randn(4, requires_grad=True))  # no gradient: skipped, as torch skips it
    return ps


def _twin(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    qs = [p.detach().clone().requires_grad_() for p in ps]
    for p, q in zip(ps, qs):
        q.grad = None if p.grad is None else p.grad.clone()
    return qs


@pytest.mark.parametrize("max_norm", [0.5, 1e9, float("inf")])
def test_clip_equals_torch(max_norm):
    ps = _params(0)
    qs = _twin(ps)
    ours = clip_grad_norm(ps, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(qs, max_norm, foreach=True)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(ps, qs):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_non_finite_gradient_gives_a_non_finite_norm_and_no_error():
    ps = _params(1)
    ps[0].grad[3, 2, 1] = float("nan")
    assert math.isnan(clip_grad_norm(ps, 1.0).item())
    ps = _params(1)
    ps[2].grad[0] = float("inf")
    assert not math.isfinite(clip_grad_norm(ps, 1.0).item())


def test_no_gradients():
    assert clip_grad_norm([torch.zeros(3, requires_grad=True)], 1.0).item() == 0.0


def test_deferred_scaling_is_the_same_multiplication():
    """Tensors in `defer` keep their gradients unscaled; multiplied later by the returned coefficient (as the
    overlapped optimizer step's worker does) they are bit for bit what the clip gives them."""
    ps = _params(2)
    qs = _twin(ps)
    defer = [q for q in qs if q.grad is not None and q.grad.device.type == "cpu"][1:]
    unscaled = [q.grad.clone() for q in defer]
    total_ref = clip_grad_norm(ps, 0.5)
    total, coef = clip_grad_norm_deferred(qs, 0.5, defer)
    assert torch.equal(total, total_ref) and coef.item() < 1.0
    assert all(torch.equal(q.grad, u) for q, u in zip(defer, unscaled))
    torch._foreach_mul_([q.grad for q in defer], coef.to("cpu"))
    for p, q in zip(ps, qs):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


class _Done:
    def synchronize(self):
        pass


def test_row_norms_taken_early_are_used_only_for_the_same_unchanged_data():
    """A staged gradient's row norms computed ahead (grad_clip.EARLY_ROW_NORMS) give the clip bitwise the norm it
    computes itself; a gradient changed since (accumulated, all-reduced) is reduced again, never from stale norms."""
    from hybridmoe import grad_clip

    g = torch.Generator().manual_seed(5)
    bufs = [torch.randn(8, 4, 96, generator=g), torch.randn(8, 40, 4, generator=g)]
    want = grad_clip._device_norm([b.clone() for b in bufs])
    for b in bufs:
        grad_clip.EARLY_ROW_NORMS.submit(b, _Done())
    assert torch.equal(grad_clip._device_norm(bufs), want)
    assert grad_clip.EARLY_ROW_NORMS.take(bufs[0]) is None  # taken once
    grad_clip.EARLY_ROW_NORMS.submit(bufs[0], _Done())
    grad_clip.EARLY_ROW_NORMS._ahead[bufs[0].data_ptr()][2].result()  # its norms are computed ...
    bufs[0].mul_(2.0)  # ... then the gradient changes (an accumulation, an all-reduce)
    assert grad_clip.EARLY_ROW_NORMS.take(bufs[0]) is None
    assert torch.equal(grad_clip._device_norm([bufs[0], bufs[1]]),
                       grad_clip._device_norm([bufs[0].clone(), bufs[1].clone()]))
    other = bufs[1].view(bufs[1].shape)  # another tensor on the same storage, same version: not the staged one
    grad_clip.EARLY_ROW_NORMS.submit(bufs[1], _Done())
    assert grad_clip.EARLY_ROW_NORMS.take(other) is None
