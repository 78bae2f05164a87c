"""Find routed-expert blocks by structure, not by name, and describe what they compute.

transformers v5 stores a MoE layer's routed experts as one module with two 3-D parameters, the input projection
(``gate_up_proj [E, 2I, H]``, or ``up_proj [E, I, H]`` for non-gated experts) and ``down_proj [E, H, I]``, whose class
is wrapped by ``transformers.integrations.moe.use_experts_implementation``. The wrapper sets on each instance how the
block differs from the plain layout: ``has_gate`` (gated MLP or not), ``has_bias`` (``*_proj_bias [E, out]``),
``is_transposed`` (weights stored ``[E, in, out]``) and ``is_concatenated`` (gate/up rows concatenated or
interleaved); a class may bring its own ``_apply_gate`` (gpt-oss's clamped SwiGLU, DeepSeek-V4's clamped SiLU).
That is the whole test: dense-first layers, shared experts and new architectures need no special case, because a
dense MLP or a shared expert is made of ``nn.Linear`` and never matches.

The block's variants become an :class:`ExpertsSpec` (shapes and layout, for the weights' home and the loader) and an
:class:`~hybridmoe.experts.formula.ExpertMLP` (the math between the two projections); nothing else looks at the
transformers module, which is dropped once it is replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import CheckpointError


@dataclass(frozen=True)
class ExpertsSpec:
    """What a fused experts block looks like: enough to allocate its CPU home, load it and compute it.

    Stored weights are always in the canonical ``[E, out, in]`` layout (a transposed checkpoint is transposed as it
    loads); ``up_rows`` is 2I for gated experts (gate and up rows, concatenated or interleaved as the block has them:
    the gate function knows which) and I otherwise."""

    num_experts: int  # E
    hidden_dim: int  # H
    intermediate_dim: int  # I
    gated: bool = True
    has_bias: bool = False
    transposed: bool = False  # the checkpoint (and transformers) store [E, in, out]
    interleaved: bool = False  # gated: gate/up rows alternate [g0, u0, g1, ...] instead of [g; u]
    up_name: str = "gate_up_proj"  # the input projection's parameter name: "gate_up_proj" or "up_proj"
    # How the MoE block calls it: "top_k" = forward(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) (the
    # ExpertsInterface signature); "dense" = forward(routed_in [E·T, H]) with every expert's rows, unselected ones zero
    # and the routing weight already folded into the input (Llama-4), returning [E·T, H].
    dispatch: str = "top_k"
    # Whether PEFT's ParamWrapper sees the stored parameter as [E, in, out] (it reads the block's `is_transposed`).
    # When that differs from `transposed` (Llama-4 stores [E, in, out] without the flag), PEFT's lora_A/lora_B of
    # the parameter are this projection's B^T/A^T: the same ΔW, transposed roles (see adapters.peft_expert_layout).
    peft_transposed: bool = False

    @property
    def up_rows(self) -> int:
        return 2 * self.intermediate_dim if self.gated else self.intermediate_dim

    def param_name(self, proj: str) -> str:
        """The transformers parameter name of an internal projection slot ("gate_up_proj" is the input projection)."""
        return self.up_name if proj == "gate_up_proj" else proj

    def shape(self, proj: str) -> tuple[int, int, int]:
        """[E, out, in] of a projection slot, as stored here."""
        if proj == "gate_up_proj":
            return (self.num_experts, self.up_rows, self.hidden_dim)
        return (self.num_experts, self.hidden_dim, self.intermediate_dim)


def _is_3d_param(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.dim() == 3


def _up_name(module: nn.Module) -> str | None:
    for name in ("gate_up_proj", "up_proj"):
        if _is_3d_param(module, name):
            return name
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers-v5 fused experts block: a 3-D input projection and ``down_proj``, with the layout flags
    that ``use_experts_implementation`` sets, or (Llama-4) the same parameters under a dense per-expert forward."""
    if _up_name(module) is None or not _is_3d_param(module, "down_proj"):
        return False
    if hasattr(module, "has_gate"):  # dispatched through ExpertsInterface: the flags describe it
        return True
    # Without the flags, only the plain pair (Llama-4's experts): a block with more 3-D weights (Inkling's shared
    # experts: gate_proj, up_proj, down_proj, run on every token) is some other computation, left to transformers.
    return set(module._parameters) == {"gate_up_proj", "down_proj"} and not any(True for _ in module.children()
                                                                               if not _is_activation(_))


def _is_activation(m: nn.Module) -> bool:
    return not any(True for _ in m.parameters())


def experts_spec(name: str, module: nn.Module) -> ExpertsSpec:
    """The shape and layout of a fused experts block; one line naming what does not fit."""
    up_name = _up_name(module)
    gated = bool(getattr(module, "has_gate", up_name == "gate_up_proj"))
    transposed = bool(getattr(module, "is_transposed", False))
    if not hasattr(module, "has_gate"):
        transposed = _looks_transposed(module)
    has_bias = bool(getattr(module, "has_bias", False))
    if gated != (up_name == "gate_up_proj"):
        raise CheckpointError(f"experts block '{name}' ({type(module).__name__}) says has_gate={gated} but its input "
                              f"projection is '{up_name}'; hybridmoe cannot tell which layout it uses")
    up, down = module._parameters[up_name].shape, module.down_proj.shape
    if transposed:  # [E, in, out] -> [E, out, in]
        up, down = (up[0], up[2], up[1]), (down[0], down[2], down[1])
    e, up_rows, h = up
    e2, h2, i = down
    if e > e2 and h == h2:
        raise CheckpointError(
            f"experts block '{name}' ({type(module).__name__}) has {e} experts in {up_name} but {e2} in down_proj: "
            f"{e - e2} of them are identity (\"zero\") experts with no weights, which hybridmoe does not implement"
        )
    if e != e2 or h != h2 or up_rows != (2 * i if gated else i):
        raise CheckpointError(
            f"experts block '{name}' has inconsistent shapes {up_name} {tuple(module._parameters[up_name].shape)} and "
            f"down_proj {tuple(module.down_proj.shape)}"
        )
    if has_bias:
        for p, rows in ((f"{up_name}_bias", up_rows), ("down_proj_bias", h)):
            b = module._parameters.get(p)
            if b is None or tuple(b.shape) != (e, rows):
                raise CheckpointError(f"experts block '{name}' says has_bias but has no {p} of shape [{e}, {rows}]")
    return ExpertsSpec(num_experts=e, hidden_dim=h, intermediate_dim=i, gated=gated, has_bias=has_bias,
                       transposed=transposed, up_name=up_name,
                       interleaved=gated and not getattr(module, "is_concatenated", True),
                       dispatch="top_k" if hasattr(module, "has_gate") else "dense",
                       peft_transposed=bool(getattr(module, "is_transposed", False)))


def _looks_transposed(module: nn.Module) -> bool:
    """For a block without ``use_experts_implementation``'s flags (Llama-4's experts): [E, H, 2I] and [E, I, H] are
    transposed; told apart from [E, 2I, H] and [E, H, I] by which dimension the two projections share."""
    up, down = module._parameters[_up_name(module)].shape, module.down_proj.shape
    return up[1] == down[2] and up[1] != up[2]


def find_fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All fused experts blocks of a model, in module order."""
    return [(name, m) for name, m in model.named_modules() if is_fused_experts(m)]
