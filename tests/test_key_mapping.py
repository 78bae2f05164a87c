"""checkpoint.KeyMapper on conversion tables beyond the per-expert stacking: whole-tensor concatenations, regex-escaped
expert patterns, and renames applied to keys that are already in the v5 layout (adapters, v5 saves)."""

from __future__ import annotations

from hybridmoe.checkpoint import ConcatPart, ExpertSlice, KeyMapper


def test_kimi_linear_conv_parts_concatenate_into_conv1d():
    # transformers builds `conv1d.weight` from q/k/v_conv1d along dim 0; the loader reported it missing before.
    m = KeyMapper("kimi_linear")
    got = [m.concat_part(m.rename(f"model.layers.0.self_attn.{p}_conv1d.weight")) for p in "qkv"]
    assert got == [ConcatPart("model.layers.0.self_attn.conv1d.weight", i, 3, 0) for i in range(3)]
    assert m.concat_part("model.layers.0.self_attn.conv1d.weight") is None  # the v5 name loads as is


def test_regex_escaped_expert_patterns_map_per_expert_tensors():
    # Kimi-Linear's table writes r"\.experts.*.w1.weight"; hub Mixtral-style names must still stack into the fused
    # gate_up_proj (w1 = gate rows, w3 = up rows) and down_proj.
    m = KeyMapper("kimi_linear")
    mod = "model.layers.1.mlp.experts"
    assert m.expert_slice(m.rename("model.layers.1.block_sparse_moe.experts.3.w1.weight")) == ExpertSlice(
        mod, "gate_up_proj", 3, 0, 2)
    assert m.expert_slice(m.rename("model.layers.1.block_sparse_moe.experts.3.w3.weight")) == ExpertSlice(
        mod, "gate_up_proj", 3, 1, 2)
    assert m.expert_slice(m.rename("model.layers.1.block_sparse_moe.experts.5.w2.weight")) == ExpertSlice(
        mod, "down_proj", 5, 0, 1)


def test_renames_leave_v5_names_alone():
    # Laguna renames `mlp.shared_expert.` -> `mlp.shared_experts.`; read as a regex its last dot also matched the
    # `s` of an already renamed key, giving `shared_experts..down_proj` (an adapter of ours could not be reloaded).
    m = KeyMapper("laguna")
    v5 = "model.layers.1.mlp.shared_experts.down_proj.lora_A.weight"
    assert m.rename(v5) == v5
    assert m.rename("model.layers.1.mlp.shared_expert.down_proj.weight") == "model.layers.1.mlp.shared_experts.down_proj.weight"
    mix = KeyMapper("mixtral")
    assert mix.rename("model.layers.0.block_sparse_moe.gate.weight") == "model.layers.0.mlp.gate.weight"
    assert mix.rename("model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"
