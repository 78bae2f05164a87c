"""The expert MLP: the one definition of what a routed expert computes, and the reference every backend is tested on.

For expert e and a row x [in]:

    u  = W_up[e] x (+ b_up[e])          # [2I] gated (gate and up rows) or [I] non-gated
    h  = gate(u)                        # gated: act(g) * u_up, or the block's own _apply_gate; else act(u)
    y  = W_down[e] h (+ b_down[e])      # [H]

and a layer's output is ``out[t] = Σ_k w[t, k] · y_{ids[t, k]}(x[t])`` (:func:`reference_moe`). The variants come
from the transformers block (:mod:`hybridmoe.experts.discovery`): gated or not, biases, the block's ``_apply_gate``
(gpt-oss: interleaved gate/up rows, clamped SwiGLU with ``(up + 1)``; DeepSeek-V4: clamped SiLU). The gate function is
transformers' own, bound to a parameter-free copy of the block's attributes, so a custom gate is computed exactly as
transformers computes it and the transformers module (and its weights) can be dropped.

Backends (the per-expert CPU loop, the grouped GEMMs on the GPU, the compiled CPU kernel, the decode GPU share) take
an :class:`ExpertMLP` for everything between the two projections; only the compiled kernel has its own copy of the
math, for the two gates it implements (:attr:`ExpertMLP.kernel_gate`: SiLU-GLU, and gpt-oss's clamped SwiGLU).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate


def _is_silu(act_fn: nn.Module | None) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


class ExpertMLP:
    """What happens between an expert's two projections, for one experts block."""

    def __init__(self, act_fn: nn.Module, gated: bool = True, gate_fn=None):
        self.act_fn = act_fn
        self.gated = gated
        self.gate_fn = gate_fn  # None: the default gate act(u[:, :I]) * u[:, I:]

    @classmethod
    def from_block(cls, block: nn.Module, gated: bool) -> ExpertMLP:
        """The math of a transformers experts block, kept without the block: its ``_apply_gate`` (if not the default)
        is bound to a namespace holding the block's plain attributes and submodules (``limit``, ``alpha``, ``act_fn``),
        never its parameters."""
        act_fn = getattr(block, "act_fn", None)
        gate = getattr(type(block), "_apply_gate", _default_apply_gate)
        if not gated or gate is _default_apply_gate:
            return cls(act_fn, gated)
        attrs = {k: v for k, v in vars(block).items() if not k.startswith("_")}
        attrs.update(block._modules)  # act_fn and friends
        return cls(act_fn, gated, types.MethodType(gate, types.SimpleNamespace(**attrs)))

    @property
    def is_silu_glu(self) -> bool:
        """The variant the compiled CPU kernel implements: default gate (concatenated rows) with SiLU."""
        return self.gated and self.gate_fn is None and _is_silu(self.act_fn)

    @property
    def kernel_gate(self) -> tuple[int, float, float] | None:
        """(act, alpha, limit) for the compiled CPU kernel's gates (moe_cpu.c ``Layer.act``), None where it has none:
        0 = SiLU-GLU; 1 = gpt-oss's clamped SwiGLU on interleaved rows (its own ``_apply_gate``, recognised by
        identity, with the block's alpha and limit)."""
        if self.is_silu_glu:
            return 0, 0.0, 0.0
        fn = getattr(self.gate_fn, "__func__", None)
        if fn is not None and fn.__qualname__ == "GptOssExperts._apply_gate" and \
                fn.__module__ == "transformers.models.gpt_oss.modeling_gpt_oss":
            ns = self.gate_fn.__self__
            return 1, float(ns.alpha), float(ns.limit)
        return None

    @property
    def name(self) -> str:
        if not self.gated:
            return f"{type(self.act_fn).__name__}"
        return "SiLU-GLU" if self.is_silu_glu else (
            f"{type(self.act_fn).__name__}-GLU" if self.gate_fn is None else "custom gate")

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """u [n, up_rows] -> h [n, I]."""
        if not self.gated:
            return self.act_fn(u)
        if self.gate_fn is not None:
            return self.gate_fn(u)
        g, up = u.chunk(2, dim=-1)  # [n, I] each
        return self.act_fn(g) * up

    def backward(self, u: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
        """dL/du [n, up_rows] from dL/dh [n, I], recomputing the elementwise math from the kept u (no GEMM)."""
        if self.is_silu_glu:  # closed form: the hot case, no autograd graph
            g, up = u.chunk(2, dim=-1)
            s = torch.sigmoid(g)
            a = g * s
            return torch.cat([dh * up * s * (1.0 + g * (1.0 - s)), dh * a], dim=-1)
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(True)
            (du,) = torch.autograd.grad(self(u_), u_, dh)
        return du


def reference_moe(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  mlp: ExpertMLP, b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
                  lora: dict | None = None) -> torch.Tensor:
    """The reference: x [T, in] fp32, ids [T, K], w [T, K], float weights [E, out, in] -> out [T, H] fp32.

    One expert and one token at a time, in fp32, written for clarity (and differentiable: the backends' gradients are
    checked against its autograd); lora maps "gate_up_proj"/"down_proj" to (A [E, r, in], B [E, out, r], scale).
    Every backend is tested against it (tests/test_expert_backends.py)."""
    lora = lora or {}
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(w_down.shape[1], dtype=torch.float32)
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            u = w_up[e].float() @ x[t].float()  # [up_rows]
            if b_up is not None:
                u = u + b_up[e].float()
            if "gate_up_proj" in lora:
                a, b, s = lora["gate_up_proj"]
                u = u + s * (b[e] @ (a[e] @ x[t].float()))
            h = mlp(u[None])[0]  # [I]
            y = w_down[e].float() @ h  # [H]
            if b_down is not None:
                y = y + b_down[e].float()
            if "down_proj" in lora:
                a, b, s = lora["down_proj"]
                y = y + s * (b[e] @ (a[e] @ h))
            acc = acc + w[t, k].float() * y
        rows.append(acc)
    return torch.stack(rows)  # [T, H]
