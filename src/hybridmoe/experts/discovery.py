"""Find routed-expert blocks by structure, not by name.

transformers v5 stores a MoE layer's routed experts as one module with two 3-D parameters,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, whose class is wrapped by
``transformers.integrations.moe.use_experts_implementation`` (which sets ``has_gate``, ``has_bias``,
``is_transposed`` and ``is_concatenated`` on each instance). That is the whole test: dense-first layers, shared
experts and new architectures need no special case, because a dense MLP or a shared expert is made of ``nn.Linear``
and never matches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.integrations.moe import _default_apply_gate

from ..errors import CheckpointError

# Architectures whose forward and gradients are tested against transformers in CI (tests/test_equivalence.py).
TESTED_ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


@dataclass(frozen=True)
class ExpertsSpec:
    """What a fused experts module looks like: enough to allocate its CPU home and compute it."""

    num_experts: int  # E
    hidden_dim: int  # H
    intermediate_dim: int  # I


def _is_3d_param(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.dim() == 3


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers-v5 fused experts block (3-D gate_up_proj and down_proj, ExpertsInterface-dispatched)."""
    return (
        _is_3d_param(module, "gate_up_proj")
        and _is_3d_param(module, "down_proj")
        and hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
    )


def experts_spec(name: str, module: nn.Module) -> ExpertsSpec:
    """Validate that a fused experts block is one we compute exactly, and return its shape.

    Each refusal names the property: a layout we do not implement would silently give wrong numbers.
    """
    reasons = []
    if not module.has_gate:
        reasons.append("no gate (up_proj only)")
    if getattr(module, "has_bias", False):
        reasons.append("expert biases")
    if module.is_transposed:
        reasons.append("transposed [E, in, out] weights")
    if not getattr(module, "is_concatenated", True):
        reasons.append("interleaved gate/up layout")
    if type(module)._apply_gate is not _default_apply_gate:
        reasons.append(f"a custom gate function ({type(module).__name__}._apply_gate)")
    if reasons:
        raise CheckpointError(
            f"experts block '{name}' ({type(module).__name__}) uses {', '.join(reasons)}, which hybridmoe does not "
            f"implement; supported architectures: {', '.join(TESTED_ARCHITECTURES)}"
        )
    e, two_i, h = module.gate_up_proj.shape
    e2, h2, i = module.down_proj.shape
    if e != e2 or h != h2 or two_i != 2 * i:
        raise CheckpointError(
            f"experts block '{name}' has inconsistent shapes gate_up_proj {tuple(module.gate_up_proj.shape)} and "
            f"down_proj {tuple(module.down_proj.shape)}"
        )
    return ExpertsSpec(num_experts=e, hidden_dim=h, intermediate_dim=i)


def find_fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All fused experts blocks of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
