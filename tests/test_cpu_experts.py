"""HybridExperts alone against an eager autograd reference (per-expert loop with LoRA, autograd), from a single
decode token (a few experts) to batches where every expert has several tokens.

Tolerances: fp32 ‖Δ‖/‖ref‖ ≤ 1e-5 for outputs and every gradient; bf16 weights ≤ 1e-2 against the fp32 reference
computed from the same (rounded) weights.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridmoe.experts import ExpertsSpec, HybridExperts

E, H, I = 6, 20, 12  # noqa: E741 - experts, hidden, intermediate


def _module(dtype=torch.float32, seed=0) -> HybridExperts:
    g = torch.Generator().manual_seed(seed)
    m = HybridExperts(ExpertsSpec(E, H, I), nn.SiLU(), dtype)
    m.weights.gate_up.copy_(torch.randn(E, 2 * I, H, generator=g) * 0.3)
    m.weights.down.copy_(torch.randn(E, H, I, generator=g) * 0.3)
    for proj, r in (("gate_up_proj", 3), ("down_proj", 2)):
        lo = m.add_lora(proj, rank=r, alpha=2.0 * r)
        lo.A.copy_(torch.randn(lo.A.shape, generator=g) * 0.3)
        lo.B.copy_(torch.randn(lo.B.shape, generator=g) * 0.3)
        lo.requires_grad_(True)
    return m


def _reference(m: HybridExperts, x, ids, w):
    """The transformers eager loop, with LoRA added per expert, differentiated by autograd."""
    gu_w, d_w = m.weights.gate_up.float(), m.weights.down.float()
    lg, ld = m.lora["gate_up_proj"], m.lora["down_proj"]
    out = torch.zeros_like(x)
    for e in range(E):
        tok, kpos = torch.where(ids == e)
        if len(tok) == 0:
            continue
        xe = x[tok]
        gu = xe @ gu_w[e].T + lg.scale * (xe @ lg.A[e].T) @ lg.B[e].T
        g, u = gu.chunk(2, dim=-1)
        h = torch.nn.functional.silu(g) * u
        y = h @ d_w[e].T + ld.scale * (h @ ld.A[e].T) @ ld.B[e].T
        out = out.index_add(0, tok, y * w[tok, kpos, None])
    return out


def _inputs(t, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return x, ids, w


def _grads(fn, m, x, ids, w, g_out):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    for t in m.lora_tensors():
        t.grad = None
    out = fn(x, ids, w)
    out.backward(g_out)
    return [out.detach(), x.grad, w.grad] + [t.grad.clone() for t in m.lora_tensors()]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("t", [1, 2, 40], ids=["decode-1-token", "few-experts", "all-experts"])
def test_forward_and_gradients_match_eager_reference(t):
    m = _module()
    x, ids, w = _inputs(t)
    g_out = torch.randn(t, H, generator=torch.Generator().manual_seed(2))
    ours = _grads(m, m, x, ids, w, g_out)
    ref = _grads(lambda *a: _reference(m, *a), m, x, ids, w, g_out)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert _rel(a, b) <= 1e-5, i


def test_bf16_weights_within_tolerance():
    m = _module(torch.bfloat16)
    x, ids, w = _inputs(40)
    with torch.no_grad():
        assert _rel(m(x, ids, w), _reference(m, x, ids, w)) <= 1e-2


def test_no_parameters_or_buffers_to_move():
    """Expert weights and LoRA are invisible to model.to(), state_dict() and PEFT: one copy, in CPU RAM."""
    m = _module()
    assert list(m.parameters()) == [] and list(m.buffers()) == [] and m.state_dict() == {}
    m.to("meta")  # would move or empty any registered tensor
    assert m.weights.gate_up.device.type == "cpu" and m.weights.gate_up.numel() == E * 2 * I * H
