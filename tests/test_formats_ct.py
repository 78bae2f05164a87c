"""compressed-tensors checkpoints (Kimi-K2-Thinking's int4 experts, llm-compressor W4A16/W8A16) load as shipped.

The checkpoints are written by the test with the compressed-tensors library itself (its scale rule, `quantize` and
`pack_to_int32`), so the byte layout under test is the library's, not ours. References: transformers' own
dequantized load (``CompressedTensorsConfig(dequantize=True)``) where it dequantizes in fp32 (fp32 scales), else the
library's ``unpack_from_int32`` + ``dequantize`` in fp32 written to a plain checkpoint. Tolerance: fp32 logits within
1e-5 relative (both sides compute q · scale exactly; what is left is summation order).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridmoe.errors import CheckpointError
from hybridmoe.loading import load_model

from .helpers import make_checkpoint, rel_err

ct = pytest.importorskip("compressed_tensors")

TINY = dict(hidden_size=64, moe_intermediate_size=32)  # every Linear input a multiple of 32: int4 groups of 32 fit
EXPERTS_RE = r"re:.*mlp\.experts\.[0-9]+\.(down|gate|up)_proj$"
# Kimi-K2-Thinking's config.json: `Linear` targets, everything but the routed experts ignored.
KIMI_IGNORE = ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]
IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def ct_quantize(w: torch.Tensor, bits: int, strategy: str, group: int | None, scale_dtype=torch.float32):
    """compressed-tensors' own symmetric int quantization of w [out, in]: (q int8 [out, in], scale [out, in/G])."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group)
    g = w.float().reshape(w.shape[0], -1, group or w.shape[1])  # [out, G, group]
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)  # [out, G]
    scale = scale.to(scale_dtype)
    return quantize(w.float(), scale.float(), zp, args, dtype=torch.int8), scale, args


def to_compressed(sd: dict, select, fmt: str, bits: int, strategy: str, group: int | None, scale_dtype) -> dict:
    """Every selected `*.weight` as compressed-tensors stores it: weight_packed/weight_scale/weight_shape
    (pack-quantized) or int8 weight + weight_scale (int-quantized)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {}
    for k, t in sd.items():
        if not (k.endswith(".weight") and t.dim() == 2 and select(k)):
            out[k] = t
            continue
        q, scale, _ = ct_quantize(t, bits, strategy, group, scale_dtype)
        base = k[: -len("weight")]
        if fmt == "pack-quantized":
            out[base + "weight_packed"] = pack_to_int32(q, bits)
            out[base + "weight_shape"] = torch.tensor(list(t.shape))
        else:
            out[base + "weight"] = q
        out[base + "weight_scale"] = scale
    return out


def ct_config(fmt: str, bits: int, strategy: str, group: int | None, targets, ignore, **weights) -> dict:
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group)
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": targets, "weights": {**args.model_dump(mode="json"), **weights},
                                          "input_activations": None, "output_activations": None, "format": fmt}},
            "ignore": ignore, "kv_cache_scheme": None}


def rewrite(src, dst, transform, quant_config=None):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    save_file(transform(load_file(str(f))), str(f), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    if quant_config is not None:
        cfg["quantization_config"] = quant_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def is_linear(k: str) -> bool:
    return not any(s in k for s in ("embed", "norm", "lm_head", "mlp.gate.weight"))


def is_expert(k: str) -> bool:
    return ".mlp.experts." in k


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    cache = {}

    def make(arch):
        if arch not in cache:
            cache[arch] = make_checkpoint(arch, root / arch, **TINY)
        return cache[arch]

    return make


def transformers_dequantized(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("fmt,bits,strategy,group", [("pack-quantized", 4, "group", 32),
                                                     ("int-quantized", 8, "channel", None)])
def test_all_linear_equals_reference(fmt, bits, strategy, group, base, tmp_path):
    """qwen3_moe with every Linear (attention and experts) int4 in groups of 32 / int8 per channel, fp32 scales: the
    fp32 logits equal transformers' own dequantized load within 1e-5 relative, and the quantization is visible.
    (transformers 5.17 cannot load int-quantized experts, "Concatenate on tensors destined for ...gate_up_proj":
    for int8 the reference is the library's dequantization loaded by transformers.)"""
    from transformers import AutoModelForCausalLM

    src = base("qwen3_moe")
    qc = ct_config(fmt, bits, strategy, group, ["Linear"], ["lm_head", r"re:.*mlp\.gate$"])
    path = rewrite(src, tmp_path / "ct", lambda sd: to_compressed(sd, is_linear, fmt, bits, strategy, group,
                                                                     torch.float32), qc)
    hyb = load_model(path, device="cpu", dtype="float32", expert_dtype="float32", progress=False)
    if fmt == "pack-quantized":
        ref = transformers_dequantized(path)
    else:
        ref_dir = rewrite(src, tmp_path / "ref", lambda sd: library_dequantized(load_file(str(path / "model.safetensors")),
                                                                              qc))
        ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = ref(IDS).logits, hyb(IDS).logits
        plain = load_model(src, device="cpu", dtype="float32", progress=False)(IDS).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(plain, want) > (1e-3 if bits == 4 else 1e-5)  # the rounding is real and was applied
    assert "compressed-tensors" in hyb.hybridmoe.source_format


def library_dequantized(sd: dict, qc: dict, group_of=lambda key: "group_0") -> dict:
    """The plain checkpoint a compressed-tensors one means: the library's unpack_from_int32 + dequantize, in fp32, with
    the arguments of config group group_of(key)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    out = {k: t for k, t in sd.items() if not k.endswith(("weight_packed", "weight_scale", "weight_shape"))}
    for k in sd:
        if k.endswith(".weight_scale"):
            args = QuantizationArgs(**qc["config_groups"][group_of(k)]["weights"])
            base = k[: -len("scale")]
            if base + "packed" in sd:
                q = unpack_from_int32(sd[base + "packed"], args.num_bits, torch.Size(sd[base + "shape"].tolist()))
            else:
                q = sd[base[:-1]]
            out[base[:-1]] = dequantize(q, sd[k].float(), None, args)
    return out


def test_kimi_layout_int4_experts_bf16_scales(base, tmp_path):
    """Kimi-K2-Thinking's layout on deepseek_v3 (its quantization_config: `Linear` targets, routed experts only through
    its `ignore` list): routed experts int4 (groups of 32, bf16 scales), everything else float (dense layer, shared experts, attention, router): the fp32 logits equal the library's own
    fp32 dequantization loaded by transformers, within 1e-5 relative; int8 experts from it stay close."""
    from transformers import AutoModelForCausalLM

    src = base("deepseek_v3")
    qc = ct_config("pack-quantized", 4, "group", 32, ["Linear"], KIMI_IGNORE)
    path = rewrite(src, tmp_path / "ct", lambda sd: to_compressed(sd, is_expert, "pack-quantized", 4, "group", 32,
                                                                     torch.bfloat16), qc)
    ref_dir = rewrite(src, tmp_path / "ref", lambda sd: library_dequantized(load_file(str(path / "model.safetensors")), qc))
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    hyb = load_model(path, device="cpu", dtype="float32", expert_dtype="float32", progress=False)
    int8 = load_model(path, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    with torch.no_grad():
        want, got, got8 = ref(IDS).logits, hyb(IDS).logits, int8(IDS).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got8, want) <= 0.05  # int8 of the dequantized int4: one more (small) rounding


def test_mixed_config_groups(base, tmp_path):
    """`format: mixed`: attention int8 per channel (int-quantized) and routed experts int4 in groups of 32
    (pack-quantized), each module decoded with its own config group's arguments."""
    from transformers import AutoModelForCausalLM

    attn = ct_config("int-quantized", 8, "channel", None, [r"re:.*self_attn\.(q|k|v|o)_proj$"], [])
    experts = ct_config("pack-quantized", 4, "group", 32, [EXPERTS_RE], [])
    qc = {**experts, "format": "mixed", "ignore": ["lm_head"],
          "config_groups": {"attention": attn["config_groups"]["group_0"], "experts": experts["config_groups"]["group_0"]}}

    def mixed(sd):
        sd = to_compressed(sd, lambda k: "self_attn" in k and "norm" not in k, "int-quantized", 8, "channel", None,
                           torch.float32)
        return to_compressed(sd, is_expert, "pack-quantized", 4, "group", 32, torch.bfloat16)

    src = base("qwen3_moe")
    path = rewrite(src, tmp_path / "ct", mixed, qc)
    ref_dir = rewrite(src, tmp_path / "ref", lambda sd: library_dequantized(
        load_file(str(path / "model.safetensors")), qc, lambda k: "attention" if "self_attn" in k else "experts"))
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    hyb = load_model(path, device="cpu", dtype="float32", expert_dtype="float32", progress=False)
    with torch.no_grad():
        assert rel_err(hyb(IDS).logits, ref(IDS).logits) <= 1e-5
    assert "int4 pack-quantized group 32, int8 int-quantized channel" in hyb.hybridmoe.source_format


# -- bad input: one line naming the tensor, file or setting -----------------------------------------------------
def _ct4(sd):
    return to_compressed(sd, is_expert, "pack-quantized", 4, "group", 32, torch.bfloat16)


def _bad_scale(sd):
    sd = _ct4(sd)
    k = "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    sd[k] = sd[k][:, :1].contiguous()
    return sd


def _no_shape(sd):
    sd = _ct4(sd)
    del sd["model.layers.1.mlp.experts.0.down_proj.weight_shape"]
    return sd


def _float_beside_scale(sd):
    out = dict(sd)
    out["model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(64, 1)
    return out


def _zero_points(sd):
    sd = _ct4(sd)
    sd["model.layers.1.mlp.experts.0.down_proj.weight_zero_point"] = torch.zeros(64, 1, dtype=torch.int32)
    return sd


CT4 = ct_config("pack-quantized", 4, "group", 32, [EXPERTS_RE], ["lm_head"])
_G = CT4["config_groups"]["group_0"]
BAD = [
    ("scale-shape", _bad_scale, CT4, "experts.2.up_proj.weight_scale' in 'model.safetensors' has shape (32, 1)"),
    ("group-not-dividing", _ct4, {**CT4, "config_groups": {"group_0": {**_G, "weights": {**_G["weights"],
                                                                                          "group_size": 24}}}},
     "group_size 24 does not divide the weight's 32 inputs"),
    ("unknown-format", _ct4, {**CT4, "format": "marlin-24", "config_groups": {"group_0": {**_G, "format": None}}},
     "format 'marlin-24'"),
    ("asymmetric", _ct4, {**CT4, "config_groups": {"group_0": {**_G, "weights": {**_G["weights"], "symmetric": False}}}},
     "asymmetric weights with zero points"),
    ("activations", _ct4, {**CT4, "config_groups": {"group_0": {**_G, "input_activations": {"num_bits": 8}}}},
     "quantized input activations"),
    ("8-bit-packed", _ct4, {**CT4, "config_groups": {"group_0": {**_G, "weights": {**_G["weights"], "num_bits": 8}}}},
     "8-bit pack-quantized weights"),
    ("float-type", _ct4, {**CT4, "config_groups": {"group_0": {**_G, "weights": {**_G["weights"], "type": "float"}}}},
     "float weights"),
    ("no-weight-shape", _no_shape, CT4, "experts.0.down_proj.weight_packed' in 'model.safetensors' is pack-quantized "
                                        "but the checkpoint has no"),
    ("float-beside-scale", _float_beside_scale, CT4, "o_proj.weight' in 'model.safetensors' is stored as F32 beside a "
                                                     "weight_scale"),
    ("zero-point-tensor", _zero_points, CT4, "weight_zero_point"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line(case, base, tmp_path):
    _, transform, qc, fragment = case
    path = rewrite(base("qwen3_moe"), tmp_path / "bad", transform, qc)
    with pytest.raises(CheckpointError) as e:
        load_model(path, device="cpu", progress=False)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_int4_experts_copied_as_stored(base, tmp_path):
    """With int4 experts of the checkpoint's group, the codes and scales land in RAM byte for byte as the library
    packed them (no float copy, no re-quantization; their scales and shapes read from another shard), and the model
    computes what the dequantized load computes."""
    from hybridmoe.experts.packed import PackedFormat

    qc = ct_config("pack-quantized", 4, "group", 32, [EXPERTS_RE], ["lm_head"])
    path = rewrite(base("deepseek_v3"), tmp_path / "ct", _ct4, qc)
    sd = load_file(str(path / "model.safetensors"))
    # Two shards, the codes in one and their scales and shapes in the other (a sharded release splits anywhere).
    (path / "model.safetensors").unlink()
    shards = {"a.safetensors": {k: v for k, v in sd.items() if k.endswith("packed")},
              "b.safetensors": {k: v for k, v in sd.items() if not k.endswith("packed")}}
    for name, part in shards.items():
        save_file(part, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in shards.items() for k in part}}))
    hyb = load_model(path, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    w = hyb.get_submodule("model.layers.1.mlp.experts").weights
    assert w.packed == PackedFormat("int4", 32)
    for e in (0, 5):
        for proj, rows, names in (("gate_up_proj", 32, ("gate_proj", "up_proj")), ("down_proj", 64, ("down_proj",))):
            for c, name in enumerate(names):
                k = f"model.layers.1.mlp.experts.{e}.{name}.weight_"
                assert torch.equal(w.tensor(proj)[e, c * rows:(c + 1) * rows], sd[k + "packed"].view(torch.uint8))
                assert torch.equal(w.scales[proj][e, c * rows:(c + 1) * rows], sd[k + "scale"])
    fp32 = load_model(path, device="cpu", dtype="float32", expert_dtype="float32", progress=False)
    with torch.no_grad():
        assert rel_err(hyb(IDS).logits, fp32(IDS).logits) <= 1e-2  # the int4 kernel rounds activations to bf16
