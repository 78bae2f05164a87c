"""`hybridmoe inspect`: name classification, per-component NaN/Inf counts and stats, exit codes, user errors.

Adapters are written with safetensors' ``save_file`` from hand-made tensors, so every count below is known exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hybridmoe.components import COMPONENTS, component_of
from hybridmoe.errors import AdapterError, HybridMoEError
from hybridmoe.inspect import format_table, inspect_adapter, run_inspect

P = "base_model.model.model.layers"
STAT_KEYS = {"tensors", "params", "nan_tensors", "inf_tensors", "min", "max", "mean_abs", "norm"}


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save ``tensors`` as ``directory/adapter_model.safetensors`` (plus a config, like PEFT) and return the dir."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    return directory


def lora(prefix: str, r: int = 2, d_in: int = 8, d_out: int = 8, value: float | None = None) -> dict:
    """lora_A/lora_B of one Linear; ``value`` (e.g. NaN) fills lora_A[0, 0]."""
    a, b = torch.randn(r, d_in), torch.randn(d_out, r)
    if value is not None:
        a[0, 0] = value
    return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}


def seed_adapter(directory: Path, n_layers: int = 4) -> tuple[Path, list[str]]:
    """The seed's bug 5: NaN in attention, shared experts and the dense layer-0 MLP; routed experts finite.

    DeepSeek-V2-Lite names: layer 0 dense, layers 1.. MoE with fused-expert LoRA (PEFT target_parameters).
    Returns the adapter dir and the names that hold NaN, in the file's (sorted) order.
    """
    torch.manual_seed(0)
    nan = float("nan")
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(n_layers):
        for proj in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            tensors |= lora(f"{P}.{layer}.self_attn.{proj}", value=nan)
        mlp = "mlp" if layer == 0 else "mlp.shared_experts"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tensors |= lora(f"{P}.{layer}.{mlp}.{proj}", value=nan)
        if layer:
            tensors[f"{P}.{layer}.mlp.experts.base_layer.lora_A.weight"] = torch.randn(6 * 2, 8)
            tensors[f"{P}.{layer}.mlp.experts.base_layer.lora_B.weight"] = torch.randn(16, 6 * 2)
            tensors[f"{P}.{layer}.mlp.experts.lora_A.weight"] = torch.randn(6 * 2, 8)
            tensors[f"{P}.{layer}.mlp.experts.lora_B.weight"] = torch.randn(8, 6 * 2)
    bad = sorted(name for name, t in tensors.items() if t.isnan().any())
    return write_adapter(directory, tensors), bad


@pytest.mark.parametrize(("name", "component"), [
    # attention, incl. DeepSeek MLA projections and norms inside attention
    (f"{P}.0.self_attn.q_proj.lora_A.weight", "self_attn"),
    (f"{P}.0.self_attn.kv_a_proj_with_mqa.lora_B.weight", "self_attn"),
    (f"{P}.0.self_attn.q_a_proj.lora_A.weight", "self_attn"),
    (f"{P}.0.self_attn.q_b_proj.lora_A.weight", "self_attn"),
    (f"{P}.0.self_attn.kv_b_proj.lora_A.weight", "self_attn"),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", "self_attn"),
    ("transformer.h.0.attention.query_key_value.weight", "self_attn"),
    ("q_a_proj.lora_A.weight", "self_attn"),
    # dense MLP (DeepSeek layer 0, dense models)
    (f"{P}.0.mlp.gate_proj.lora_A.weight", "dense_mlp"),
    (f"{P}.0.mlp.down_proj.lora_B.weight", "dense_mlp"),
    ("model.layers.3.feed_forward.w1.weight", "dense_mlp"),
    # shared experts: DeepSeek plural, Qwen2-MoE singular
    (f"{P}.1.mlp.shared_experts.gate_proj.lora_A.weight", "shared_experts"),
    (f"{P}.1.mlp.shared_expert.up_proj.lora_B.weight", "shared_experts"),
    # routers: before shared experts (shared_expert_gate) and never confused with gate_proj
    (f"{P}.1.mlp.shared_expert_gate.weight", "router"),
    (f"{P}.1.mlp.shared_expert_gate.lora_A.weight", "router"),
    ("model.layers.1.mlp.gate.weight", "router"),
    (f"{P}.1.mlp.gate.modules_to_save.default.weight", "router"),
    ("model.layers.1.mlp.gate.e_score_correction_bias", "router"),
    ("model.layers.1.block_sparse_moe.gate.weight", "router"),
    ("model.layers.1.mlp.router.weight", "router"),
    # routed experts: PEFT target_parameters on fused experts, per-expert layout, Mixtral v4, fused base params
    (f"{P}.1.mlp.experts.base_layer.lora_A.weight", "routed_experts"),
    (f"{P}.1.mlp.experts.lora_B.weight", "routed_experts"),
    (f"{P}.1.mlp.experts.3.gate_proj.lora_A.weight", "routed_experts"),
    (f"{P}.1.block_sparse_moe.experts.0.w1.lora_A.weight", "routed_experts"),
    ("model.layers.1.mlp.experts.gate_up_proj", "routed_experts"),
    # everything else
    ("base_model.model.model.embed_tokens.lora_embedding_A", "other"),
    ("base_model.model.lm_head.lora_A.weight", "other"),
    ("model.layers.0.post_attention_layernorm.weight", "other"),
    ("model.layers.0.input_layernorm.weight", "other"),
    ("model.norm.weight", "other"),
])
def test_component_of(name: str, component: str) -> None:
    assert component_of(name) == component


def test_components_order() -> None:
    assert COMPONENTS == ("self_attn", "dense_mlp", "shared_experts", "routed_experts", "router", "other")


def test_seed_situation_counts_per_component(tmp_path: Path) -> None:
    adapter, bad = seed_adapter(tmp_path / "adapter")
    report = inspect_adapter(adapter)
    assert set(report) == {"components", "nonfinite", "ok"}
    assert tuple(report["components"]) == COMPONENTS
    counts = {c: (row["tensors"], row["nan_tensors"], row["inf_tensors"]) for c, row in report["components"].items()}
    assert counts == {
        "self_attn": (4 * 4 * 2, 4 * 4, 0),  # 4 layers x 4 projections x (A, B); NaN in every lora_A
        "dense_mlp": (3 * 2, 3, 0),  # layer 0 only
        "shared_experts": (3 * 3 * 2, 3 * 3, 0),  # layers 1..3
        "routed_experts": (3 * 4, 0, 0),  # finite, as in the seed
        "router": (0, 0, 0),
        "other": (0, 0, 0),
    }
    assert report["components"]["routed_experts"]["params"] == 3 * (12 * 8 + 16 * 12 + 12 * 8 + 8 * 12)
    assert report["nonfinite"] == bad
    assert len(bad) == 16 + 3 + 9
    assert report["ok"] is False


def test_stats_are_over_finite_values_only(tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a", {
        "model.layers.0.self_attn.o_proj.lora_A.weight": torch.tensor([[1.0, -3.0], [float("nan"), float("inf")]]),
        "model.layers.0.mlp.gate_proj.lora_A.weight": torch.tensor([0.5, -0.5], dtype=torch.bfloat16),
        "lm_head.lora_B.weight": torch.tensor([float("-inf"), float("nan")]),
    })
    components = inspect_adapter(adapter)["components"]
    attn = components["self_attn"]
    assert (attn["tensors"], attn["params"], attn["nan_tensors"], attn["inf_tensors"]) == (1, 4, 1, 1)
    assert attn["min"] == -3.0 and attn["max"] == 1.0
    assert attn["mean_abs"] == pytest.approx(2.0)
    assert attn["norm"] == pytest.approx(math.sqrt(10.0))
    assert components["dense_mlp"] == {"tensors": 1, "params": 2, "nan_tensors": 0, "inf_tensors": 0,
                                       "min": -0.5, "max": 0.5, "mean_abs": 0.5, "norm": pytest.approx(math.sqrt(0.5))}
    other = components["other"]  # no finite value at all: counts, but no stats
    assert (other["nan_tensors"], other["inf_tensors"], other["min"], other["norm"]) == (1, 1, None, None)
    for row in components.values():
        assert set(row) == STAT_KEYS
        assert all(isinstance(row[k], float) or row[k] is None for k in ("min", "max", "mean_abs", "norm"))
    assert components["router"] == dict.fromkeys(STAT_KEYS, None) | {"tensors": 0, "params": 0, "nan_tensors": 0,
                                                                      "inf_tensors": 0}


def test_clean_adapter_is_ok_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = write_adapter(tmp_path / "a", lora(f"{P}.0.self_attn.q_proj") | lora(f"{P}.1.mlp.experts.base_layer"))
    assert run_inspect(adapter, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["nonfinite"] == []
    assert report["components"]["self_attn"]["tensors"] == 2
    assert report["components"]["routed_experts"]["tensors"] == 2
    assert run_inspect(adapter, as_json=False) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "OK: all 4 tensors are finite"
    assert "non-finite tensors" not in out


def test_nonfinite_adapter_exits_1_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter, bad = seed_adapter(tmp_path / "a", n_layers=2)
    assert run_inspect(adapter, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)  # strict JSON: no NaN literals leak from the stats
    assert report == inspect_adapter(adapter)
    assert report["nonfinite"] == bad and report["ok"] is False


def test_table_lists_first_20_and_names_components(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter, bad = seed_adapter(tmp_path / "a")  # 28 NaN tensors
    assert run_inspect(adapter, as_json=False) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["component", "tensors", "params", "NaN", "Inf", "max|x|", "norm"]
    rows = {line.split()[0]: line.split() for line in lines[2:8]}
    assert list(rows) == list(COMPONENTS)
    assert rows["shared_experts"][1:5] == ["18", rows["shared_experts"][2], "9", "0"]
    assert rows["routed_experts"][3:5] == ["0", "0"]
    assert rows["router"][5:] == ["-", "-"]
    assert f"non-finite tensors ({len(bad)}):" in out
    assert all(name in out for name in bad[:20]) and bad[20] not in out
    assert "  ... and 8 more" in lines
    assert lines[-1].startswith("NOT OK: 28 of 68 tensors contain NaN/Inf (self_attn 16, shared_experts 9, dense_mlp 3)")
    assert format_table(inspect_adapter(adapter)) == out.rstrip("\n")


def test_safetensors_file_path_is_accepted(tmp_path: Path) -> None:
    adapter, _ = seed_adapter(tmp_path / "a", n_layers=1)
    assert inspect_adapter(adapter / "adapter_model.safetensors") == inspect_adapter(adapter)


def _error(path: Path) -> str:
    with pytest.raises(AdapterError) as info:
        inspect_adapter(path)
    assert isinstance(info.value, HybridMoEError)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_dir(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope")
    assert "adapter directory not found" in message and str(tmp_path / "nope") in message


def test_dir_without_adapter_file(tmp_path: Path) -> None:
    message = _error(tmp_path)
    assert f"no adapter_model.safetensors in {tmp_path}" in message


def test_dir_points_to_checkpoints(tmp_path: Path) -> None:
    seed_adapter(tmp_path / "checkpoint-10", n_layers=1)
    assert "found checkpoint-10" in _error(tmp_path)


def test_pickle_adapter_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    assert "safe_serialization=True" in _error(tmp_path)


def test_other_file_is_not_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    assert "is a file, not an adapter directory" in _error(tmp_path / "adapter_config.json")


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage", "empty"])
def test_corrupt_file(tmp_path: Path, damage: str) -> None:
    adapter, _ = seed_adapter(tmp_path / "a", n_layers=1)
    file = adapter / "adapter_model.safetensors"
    data = file.read_bytes()
    damaged = {"truncate_data": data[: len(data) - 100], "truncate_header": data[:20],
               "garbage": bytes(range(256)) * 4, "empty": b""}[damage]
    file.write_bytes(damaged)
    message = _error(adapter)
    assert message.startswith(f"cannot read {file}: ") and "truncated or not safetensors" in message
