"""Loading: checkpoint layouts, placement report, and one clear line for every bad checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from hybridmoe.cli import main
from hybridmoe.errors import CheckpointError
from hybridmoe.experts import HybridExperts
from hybridmoe.loading import load_model
from hybridmoe.testing import SUPPORTED_ARCHITECTURES, save_tiny_model


@pytest.fixture(scope="module")
def ds_v2(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv2")
    save_tiny_model("deepseek_v2", path)
    return path


def _logits(model, seed=0):
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_sharded_and_fused_layouts_load_identically(ds_v2, tmp_path):
    """Hub per-expert keys in one file, the same split into shards with an index, and transformers-v5 fused keys."""
    ref = _logits(load_model(ds_v2, device="cpu", progress=False))
    sharded = tmp_path / "sharded"
    save_tiny_model("deepseek_v2", sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(_logits(load_model(sharded, device="cpu", progress=False)), ref)

    fused = tmp_path / "fused"
    shutil.copytree(ds_v2, fused)
    model = AutoModelForCausalLM.from_pretrained(ds_v2, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(str(fused / "model.safetensors")))
    assert torch.equal(_logits(load_model(fused, device="cpu", progress=False)), ref)


def test_placement_report(ds_v2, capsys):
    assert main(["info", "--model", str(ds_v2), "--device", "cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and all(rep["checks"].values())
    assert rep["dense_mlp_layers"] == ["model.layers.0.mlp"]  # the seed's bug 4: layer 0 is dense, on the device
    assert rep["moe_layers"] == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    assert rep["devices"]["cpu (routed experts)"]["tensors"] == 4
    assert rep["cpu_kernel"]["used"] == (rep["cpu_kernel"]["status"] == "ready")  # SiLU experts: used when built


def test_no_empty_or_meta_tensors_anywhere(ds_v2):
    model = load_model(ds_v2, device="cpu", progress=False)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t.numel() > 0 and not t.is_meta, name
    experts = [m for m in model.modules() if isinstance(m, HybridExperts)]
    assert experts and all(m.weights.gate_up.numel() > 0 and not m.weights.missing() for m in experts)


def _expect_error(argv, capsys, *fragments):
    capsys.readouterr()  # drop what the test's own setup printed
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    # progress bars may precede it; the error itself is exactly one line
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("hybridmoe: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_checkpoints_get_one_clear_line(ds_v2, tmp_path, capsys):
    info = ["info", "--device", "cpu", "--model"]
    _expect_error(info + [str(tmp_path / "missing")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    _expect_error(info + [str(tmp_path / "empty")], capsys, "no config.json")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(ds_v2 / "config.json", noweights)
    _expect_error(info + [str(noweights)], capsys, "no *.safetensors")

    garbage = tmp_path / "garbage"
    shutil.copytree(ds_v2, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    _expect_error(info + [str(garbage)], capsys, "model.safetensors", "corrupt")

    trunc = tmp_path / "trunc"
    shutil.copytree(ds_v2, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(info + [str(trunc)], capsys, "model.safetensors")

    missing = tmp_path / "missing_tensor"
    shutil.copytree(ds_v2, missing)
    sd = load_file(str(ds_v2 / "model.safetensors"))
    sd.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(sd, str(missing / "model.safetensors"))
    _expect_error(info + [str(missing)], capsys, "model.layers.0.mlp.gate_proj.weight")

    shape = tmp_path / "shape"
    shutil.copytree(ds_v2, shape)
    sd = load_file(str(ds_v2 / "model.safetensors"))
    sd["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 5)
    save_file(sd, str(shape / "model.safetensors"))
    _expect_error(info + [str(shape)], capsys, "experts.3.up_proj.weight", "shape")

    expert_gap = tmp_path / "expert_gap"
    shutil.copytree(ds_v2, expert_gap)
    sd = load_file(str(ds_v2 / "model.safetensors"))
    sd.pop("model.layers.2.mlp.experts.5.down_proj.weight")
    save_file(sd, str(expert_gap / "model.safetensors"))
    _expect_error(info + [str(expert_gap)], capsys, "down_proj[5]")


def test_missing_shard_named(tmp_path, capsys):
    sharded = tmp_path / "sharded"
    save_tiny_model("qwen3_moe", sharded, max_shard_size="20KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    _expect_error(["info", "--device", "cpu", "--model", str(sharded)], capsys, victim.name, "missing")


def test_non_moe_model_lists_supported(tmp_path, capsys):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, device="cpu", progress=False)
    # the architectures named are the tested ones (hybridmoe.testing.zoo), not a hand-written list
    assert f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}" in str(err.value)


def test_peak_host_memory_near_final_footprint(tmp_path):
    """Loading streams tensors into their final homes: peak RSS grows by about the model size, not twice it."""
    path = tmp_path / "big"
    save_tiny_model("qwen3_moe", path, hidden_size=256, moe_intermediate_size=256, num_experts=64,
                    num_hidden_layers=2, head_dim=32, init_std=0.02)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    code = (
        "import resource, sys, torch\n"
        "from hybridmoe.loading import load_model\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        f"m = load_model({str(path)!r}, device='cpu', progress=False)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(peak - base)\n"
    )
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert size > 50 * 2**20
    assert grown < 1.35 * size, (grown, size)


def test_generation_config_is_read(ds_v2, tmp_path):
    """Stop tokens listed only in generation_config.json (as chat models do) reach generation."""
    path = tmp_path / "gc"
    shutil.copytree(ds_v2, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    assert load_model(path, device="cpu", progress=False).generation_config.eos_token_id == [1, 3]
