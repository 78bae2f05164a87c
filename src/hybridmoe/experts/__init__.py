"""Routed experts on the CPU: discovery by structure, CPU home of the weights, exact forward/backward."""

from .cpu_experts import ExpertLoRA, ExpertWeights, HybridExperts
from .discovery import ExpertsSpec, experts_spec, find_fused_experts, is_fused_experts

__all__ = [
    "ExpertLoRA",
    "ExpertWeights",
    "ExpertsSpec",
    "HybridExperts",
    "experts_spec",
    "find_fused_experts",
    "is_fused_experts",
]
