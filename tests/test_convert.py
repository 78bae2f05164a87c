"""`hybridmoe convert`: the converted checkpoint loads bit-identical routed experts to the original loaded with the
same expert_dtype (torch.equal on every ExpertWeights tensor) and identical logits; it is streamed, sharded and
written atomically; user errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from hybridmoe.cli import main
from hybridmoe.convert import convert_checkpoint
from hybridmoe.errors import CheckpointError
from hybridmoe.loading import load_model

from .helpers import make_checkpoint, one_line_error, rel_err, rewrite_checkpoint

TINY = dict(hidden_size=64, moe_intermediate_size=32)  # expert inputs 64 and 32: int4 groups fit
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """Tiny bf16 checkpoints saved in several shards (as a large release is)."""
    root = tmp_path_factory.mktemp("conv")
    cache = {}

    def make(arch):
        if arch not in cache:
            cache[arch] = make_checkpoint(arch, root / arch, dtype=torch.bfloat16, max_shard_size="40KB", **TINY)
        return cache[arch]

    return make



def assert_same_experts(a, b):
    for name in a.hybridmoe.moe_layers:
        wa, wb = a.get_submodule(name).weights, b.get_submodule(name).weights
        ta, tb = wa.host_tensors(), wb.host_tensors()
        assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb)), name


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_convert_int8_loads_bit_identical(arch, bf16, tmp_path):
    src = bf16(arch)
    out = convert_checkpoint(src, tmp_path / "int8", "int8", max_shard_size=50_000, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "tokenizer.json" in names and "generation_config.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    a = load_model(src, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    b = load_model(out, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    assert_same_experts(a, b)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
    # What is on disk: int8 experts with bf16 per-row scales, everything else as stored (bf16).
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(str(out / index[key]), "pt") as h:
        assert h.get_tensor(key).dtype == torch.int8
    with safe_open(str(out / index[key + "_scale"]), "pt") as h:
        assert h.get_tensor(key + "_scale").shape == (64, 1)
    with safe_open(str(out / index["model.layers.1.self_attn.o_proj.weight"]), "pt") as h:
        assert h.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16


def test_convert_from_fp8(bf16, tmp_path):
    """An FP8 block-scaled input: experts dequantized as read, then quantized exactly as the loader quantizes them;
    converting the converted checkpoint again changes nothing."""
    from .test_formats import _fp8_quantize_blocks

    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}
    fp8 = rewrite_checkpoint(bf16("qwen3_moe"), tmp_path / "fp8", lambda sd: _fp8_quantize_blocks(
        {k: v.float() for k, v in sd.items()}, 8), qc)
    out = convert_checkpoint(fp8, tmp_path / "int8", "int8", progress=False)
    a = load_model(fp8, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    b = load_model(out, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    assert_same_experts(a, b)
    with torch.no_grad():  # attention dequantized to bf16 on disk: close, not equal
        assert rel_err(b(IDS).logits, a(IDS).logits) < 1e-2
    again = convert_checkpoint(out, tmp_path / "again", "int8", progress=False)
    assert_same_experts(b, load_model(again, device="cpu", dtype="float32", expert_dtype="int8", progress=False))


def test_convert_from_compressed_int4(bf16, tmp_path):
    """A compressed-tensors int4 input (written by the library): int8 experts from its dequantized weights, exactly
    as the loader makes them; int4 experts of its own group copied through as stored."""
    pytest.importorskip("compressed_tensors")
    from .test_formats_ct import EXPERTS_RE, ct_config, is_expert, to_compressed

    qc = ct_config("pack-quantized", 4, "group", 32, [EXPERTS_RE], ["lm_head"])
    ct = rewrite_checkpoint(bf16("deepseek_v3"), tmp_path / "ct", lambda sd: to_compressed(
        sd, is_expert, "pack-quantized", 4, "group", 32, torch.bfloat16), qc)
    out = convert_checkpoint(ct, tmp_path / "int8", "int8", progress=False)
    a = load_model(ct, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    b = load_model(out, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    assert_same_experts(a, b)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
    # int4 of the input's group: the codes and scales are copied through, byte for byte.
    out4 = convert_checkpoint(ct, tmp_path / "int4", "int4", progress=False)
    with safe_open(str(ct / "model.safetensors"), "pt") as h, safe_open(str(out4 / "model.safetensors"), "pt") as g:
        keys = [k for k in h.keys() if k.endswith(("weight_packed", "weight_scale"))]  # noqa: SIM118 - a handle
        assert keys and all(torch.equal(h.get_tensor(k), g.get_tensor(k)) for k in keys)


def test_failure_leaves_nothing(bf16, tmp_path):
    """A tensor found broken only as it is read (a scale grid that does not fit): one line, no output directory, no
    temporary left beside it."""
    from .test_formats import _fp8_quantize_blocks

    def bad(sd):
        sd = _fp8_quantize_blocks({k: v.float() for k, v in sd.items()}, 8)
        k = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"
        sd[k] = sd[k][:, :1].contiguous()
        return sd

    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}
    broken = rewrite_checkpoint(bf16("qwen3_moe"), tmp_path / "broken", bad, qc)
    with pytest.raises(CheckpointError, match="experts.5.up_proj.weight_scale_inv' in 'model.safetensors' has shape"):
        convert_checkpoint(broken, tmp_path / "out" / "int8", "int8", progress=False)
    assert list((tmp_path / "out").iterdir()) == []



def test_cli(bf16, tmp_path, capsys):
    src = str(bf16("qwen3_moe"))
    out = tmp_path / "out"
    assert main(["convert", "--model", src, "--expert-dtype", "int8", "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    one_line_error(capsys, ["convert", "--model", src, "--expert-dtype", "int8", "--output", str(out)],
              "is not empty; pass a new or empty directory, or --overwrite")
    before = (out / "config.json").stat().st_mtime_ns
    assert main(["convert", "--model", src, "--expert-dtype", "int8", "--output", str(out), "--overwrite"]) == 0
    assert (out / "config.json").stat().st_mtime_ns != before
    one_line_error(capsys, ["convert", "--model", src, "--expert-dtype", "int8", "--output", f"{src}/sub"],
              "must not be, contain or be inside the model directory")
    one_line_error(capsys, ["convert", "--model", str(tmp_path / "nope"), "--expert-dtype", "int8", "--output",
                       str(tmp_path / "o2")], "does not exist")
    one_line_error(capsys, ["convert", "--model", src, "--expert-dtype", "int8", "--output", str(tmp_path / "o3"),
                       "--max-shard-size", "0"], "max_shard_size must be positive")


RSS_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    from pathlib import Path
    from hybridmoe.convert import convert_checkpoint

    def kib(field):
        return int(re.search(rf"{field}:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])

    torch.set_num_threads(1)  # memory is measured here, not speed: no thread pool spinning on a busy CI host
    src, out, shard = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    convert_checkpoint(src, out / "warm", "int8", max_shard_size=shard, progress=False)  # imports, model classes
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
    base = kib("VmRSS")
    convert_checkpoint(src, out / "measured", "int8", max_shard_size=shard, progress=False)
    print((kib("VmHWM") - base) * 1024)
""")


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc/self/clear_refs")
def test_peak_rss_about_one_tensor(tmp_path):
    """Converting a 24 MiB checkpoint held in one shard into one output shard raises the peak RSS by a small fraction
    of it: tensors are read one at a time without a memory map and written out as they are made, so neither the input
    shard nor the output shard is ever resident. (The first conversion in the process pays for imports and model
    classes; the second is measured.)"""
    from hybridmoe.testing import save_tiny_model

    src = tmp_path / "src"
    save_tiny_model("qwen3_moe", src, dtype=torch.bfloat16, max_shard_size="1GB", hidden_size=256,
                    moe_intermediate_size=512, num_experts=16, num_hidden_layers=2)
    total = (src / "model.safetensors").stat().st_size
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path), str(1 << 30)],
                         capture_output=True, text=True, check=True)
    grew = int(run.stdout.split()[-1])
    print(f"peak RSS grew {grew / 2**20:.1f} MiB converting {total / 2**20:.1f} MiB")
    assert total > 24e6 and grew < 0.25 * total, (grew, total)


def test_convert_int4_loads_bit_identical_and_reads_in_transformers(bf16, tmp_path):
    """int4: the loader's group, the loader's quantize_int4; the output loads to the same codes and scales as the bf16
    input does, and transformers' own compressed-tensors reader takes it (its dequantization runs in the scales'
    bf16, hence the tolerance)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = bf16("qwen3_moe")
    out = convert_checkpoint(src, tmp_path / "int4", "int4", max_shard_size=30_000, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    a = load_model(src, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    b = load_model(out, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    assert_same_experts(a, b)
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
        exact = load_model(out, device="cpu", dtype="float32", expert_dtype="float32", progress=False)(IDS).logits
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(
            dequantize=True)).eval()(IDS).logits
    assert rel_err(exact, ref) <= 1e-2


def _fused(sd: dict) -> dict:
    """The transformers-v5 layout: per-expert hub tensors stacked into gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    out, parts = {}, {}
    for k, t in sd.items():
        head, sep, tail = k.partition(".mlp.experts.")
        if not sep:
            out[k] = t
            continue
        e, proj, _ = tail.split(".")
        parts.setdefault(head, {}).setdefault(proj, {})[int(e)] = t
    for head, p in parts.items():
        n = len(p["down_proj"])
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([p["gate_proj"][e], p["up_proj"][e]])
                                                              for e in range(n)])
        out[f"{head}.mlp.experts.down_proj"] = torch.stack([p["down_proj"][e] for e in range(n)])
    return out


def test_convert_fused_source_and_refusal(bf16, tmp_path, capsys):
    """Fused [E, ...] expert tensors (a v5 save) are written in the hub's per-expert layout, one expert at a time,
    and load to the same int4 codes; a model whose experts have no per-expert layout (gpt-oss) is refused up front."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fused = rewrite_checkpoint(bf16("qwen3_moe"), tmp_path / "fused", _fused, None)
    out = convert_checkpoint(fused, tmp_path / "int4", "int4", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        assert "model.layers.2.mlp.experts.5.up_proj.weight_packed" in set(h.keys())
    a = load_model(fused, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    b = load_model(out, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    assert_same_experts(a, b)

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2, layer_types=["full_attention"])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt_oss")
    one_line_error(capsys, ["convert", "--model", str(tmp_path / "gpt_oss"), "--expert-dtype", "int4", "--output",
                       str(tmp_path / "g4")], "has no per-expert layout for model_type 'gpt_oss'")
    assert not (tmp_path / "g4").exists()
