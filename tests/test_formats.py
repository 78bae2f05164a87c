"""Checkpoints in a format hybridmoe does not implement are refused with one line, before anything is computed.

The seed of this test: an FP8 checkpoint (DeepSeek-V3 / Qwen3-FP8 layout: float8_e4m3fn weights, one
``weight_scale_inv`` per weight, ``quantization_config.quant_method: fp8``) used to load with its scales ignored and
answer garbage with exit 0. Every kind below must now end in one ``hybridmoe: error:`` line naming the format or
tensor, exit 2, no traceback, for every command that loads a model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hybridmoe.cli import main
from hybridmoe.errors import CheckpointError
from hybridmoe.loading import load_model

from .helpers import make_checkpoint, one_line_error, rewrite_checkpoint, tiny_gpt_oss, write_dataset


def _is_linear_weight(k: str, t: torch.Tensor) -> bool:
    return k.endswith(".weight") and t.dim() == 2 and "norm" not in k and "embed" not in k


def _fp8_blockwise(sd: dict) -> dict:
    """Every Linear/expert weight as float8_e4m3fn with a [ceil(out/128), ceil(in/128)] weight_scale_inv."""
    out = {}
    for k, t in sd.items():
        if _is_linear_weight(k, t) and "lm_head" not in k:
            scale = t.abs().amax().clamp_min(1e-12) / 448.0
            out[k] = (t / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "weight_scale_inv"] = scale.reshape(1, 1).float()
        else:
            out[k] = t
    return out


def _fp8_no_scales(sd: dict) -> dict:
    return {k: (t.to(torch.float8_e4m3fn) if _is_linear_weight(k, t) and "lm_head" not in k else t) for k, t in sd.items()}


def _scales_beside_float(sd: dict) -> dict:
    """bf16 weights with stray scale tensors: the scales would be ignored, so the checkpoint is not understood."""
    out = dict(sd)
    for k in sd:
        if k.endswith("experts.0.down_proj.weight"):
            out[k[: -len("weight")] + "weight_scale_inv"] = torch.ones(1, 1)
    return out


def _gptq_packed(sd: dict) -> dict:
    """A GPTQ-style pack on the first attention projection: qweight int32 + scales + qzeros, no float weight."""
    out = dict(sd)
    k = next(k for k in sd if k.endswith("self_attn.q_proj.weight"))
    w = out.pop(k)
    base = k[: -len("weight")]
    out[base + "qweight"] = torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32)
    out[base + "scales"] = torch.ones(1, w.shape[0], dtype=torch.float16)
    out[base + "qzeros"] = torch.zeros(1, w.shape[0] // 8, dtype=torch.int32)
    return out


def _int_weight(sd: dict) -> dict:
    k = next(k for k in sd if k.endswith("self_attn.o_proj.weight"))
    return {**sd, k: sd[k].to(torch.int8)}


def _extra_in_used_module(sd: dict) -> dict:
    k = next(k for k in sd if k.endswith("self_attn.o_proj.weight"))
    return {**sd, k[: -len("weight")] + "lora_magnitude": torch.ones(4)}


# (id, transform, quantization_config, fragment the one line must contain)
KINDS = [
    ("nvfp4", lambda sd: sd, {"quant_method": "nvfp4"}, "quant_method 'nvfp4' (NVFP4 weights)"),
    ("compressed-tensors", lambda sd: sd, {"quant_method": "compressed-tensors", "format": "pack-quantized"},
     "quant_method 'compressed-tensors'"),
    ("gptq", _gptq_packed, {"quant_method": "gptq", "bits": 4, "group_size": 128}, "quant_method 'gptq'"),
    ("awq", lambda sd: sd, {"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
    ("bitsandbytes", lambda sd: sd, {"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ("fp8-no-config", _fp8_no_scales, None, "is stored as F8_E4M3"),
    ("fp8-scales-no-config", _fp8_blockwise, None, "is quantization data ('weight_scale_inv')"),
    ("scales-beside-bf16", _scales_beside_float, None, "experts.0.down_proj.weight_scale_inv"),
    ("gptq-no-config", _gptq_packed, None, "is quantization data"),
    ("int8-weight", _int_weight, None, "is stored as I8"),
    ("extra-tensor", _extra_in_used_module, None, "o_proj.lora_magnitude' in 'model.safetensors' belongs to a module"),
]


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    base = make_checkpoint("qwen3_moe", root / "base")
    out = {kid: rewrite_checkpoint(base, root / kid, tf, qc) for kid, tf, qc, _ in KINDS}
    return out


@pytest.mark.parametrize("kind", KINDS, ids=[k[0] for k in KINDS])
def test_load_refuses(kind, bad_ckpts):
    kid, _, _, fragment = kind
    with pytest.raises(CheckpointError) as e:
        load_model(bad_ckpts[kid], device="cpu", progress=False)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)



def test_every_command_refuses_an_unimplemented_format(bad_ckpts, tmp_path, capsys, ckpt_dir):
    """train, chat, info, export and serve all go through the guard (NVFP4 here)."""
    mx = str(bad_ckpts["nvfp4"])
    frag = "quant_method 'nvfp4'"
    one_line_error(capsys, ["chat", "--model", mx, "--prompt", "hi", "--device", "cpu"], frag)
    one_line_error(capsys, ["info", "--model", mx, "--device", "cpu"], frag)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model_name_or_path: {mx}\ndataset: {write_dataset(tmp_path / 'd.jsonl', n=4)}\n"
                   f"output_dir: {tmp_path / 'out'}\ndevice: cpu\nmax_steps: 1\nprogress: false\n")
    one_line_error(capsys, ["train", str(cfg)], frag)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # export: an adapter trained on the plain checkpoint, merged into an NVFP4 one, is refused before writing.
    adapter = tmp_path / "adapter"
    ok_cfg = tmp_path / "ok.yaml"
    ok_cfg.write_text(f"model_name_or_path: {ckpt_dir('qwen3_moe')}\ndataset: {tmp_path / 'd.jsonl'}\n"
                      f"output_dir: {adapter}\ndevice: cpu\nmax_steps: 1\nprogress: false\nlora_rank: 2\n")
    assert main(["train", str(ok_cfg)]) == 0
    one_line_error(capsys, ["export", "--model", mx, "--adapter", str(adapter), "--output", str(tmp_path / "merged")], frag)
    assert not (tmp_path / "merged").exists()
    pytest.importorskip("fastapi")
    one_line_error(capsys, ["serve", "--model", mx, "--device", "cpu", "--port", "0"], frag)


def test_export_refuses_fp8_without_config(bad_ckpts, tmp_path, capsys, ckpt_dir):
    """The per-tensor check also guards export (it copies tensors it does not merge)."""
    adapter = tmp_path / "adapter"
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(f"model_name_or_path: {ckpt_dir('qwen3_moe')}\ndataset: {write_dataset(tmp_path / 'd.jsonl', n=4)}\n"
                   f"output_dir: {adapter}\ndevice: cpu\nmax_steps: 1\nprogress: false\nlora_rank: 2\n")
    assert main(["train", str(cfg)]) == 0
    one_line_error(capsys, ["export", "--model", str(bad_ckpts["fp8-no-config"]), "--adapter", str(adapter),
                       "--output", str(tmp_path / "merged")], "is stored as F8_E4M3")


def test_provably_unused_tensors_are_ignored(tmp_path, ckpt_dir):
    """Rotary buffers and a layer past the model's depth (DeepSeek-V3's MTP layer) are the only tensors ignored;
    the model loads and computes exactly what the plain checkpoint does."""
    base = ckpt_dir("deepseek_v3")
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]

    def extras(sd):
        out = dict(sd)
        out[f"model.layers.{n_layers}.mlp.experts.0.gate_proj.weight"] = torch.ones(24, 32)  # MTP layer
        out[f"model.layers.{n_layers}.eh_proj.weight"] = torch.ones(32, 64)
        out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # v4-era persisted rotary buffer
        return out

    ok = rewrite_checkpoint(base, tmp_path / "mtp", extras)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = load_model(base, device="cpu", progress=False)(ids).logits
        got = load_model(ok, device="cpu", progress=False)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- FP8 block-quantized checkpoints: read as shipped -----------------------------------------------------------
def _fp8_quantize_blocks(sd: dict, block: int) -> dict:
    """DeepSeek-V3's layout: every Linear/expert weight as float8_e4m3fn with a float32 weight_scale_inv per
    [block, block] block (absmax / 448), written by the test itself."""
    out = {}
    for k, t in sd.items():
        if not (_is_linear_weight(k, t) and "lm_head" not in k and ".gate.weight" not in k):
            out[k] = t
            continue
        o, i = t.shape
        tb = t.reshape(o // block, block, i // block, block)
        scale = (tb.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)  # [o/b, i/b]
        q = (tb / scale[:, None, :, None]).reshape(o, i).to(torch.float8_e4m3fn)
        out[k], out[k[: -len("weight")] + "weight_scale_inv"] = q, scale.float()
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_fp8_block_checkpoint_equals_transformers_dequantized(arch, tmp_path, ckpt_dir):
    """An FP8 block-quantized checkpoint loads (experts bf16-free: dequantized slice by slice) and its fp32 logits equal
    transformers' own dequantized load (FineGrainedFP8Config(dequantize=True)) within 1e-5 relative; the weights that
    reach the model are fp8 · scale, which is also checked against the plain checkpoint's error budget."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    block = 8  # divides every tiny dim (32, 24, 40, head dims), so the scale grid is a real grid
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
    fp8 = rewrite_checkpoint(ckpt_dir(arch), tmp_path / "fp8", lambda sd: _fp8_quantize_blocks(sd, block), qc)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32,
                                               quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    hyb = load_model(fp8, device="cpu", dtype="float32", expert_dtype="float32", progress=False)
    with torch.no_grad():
        want, got = ref(ids).logits, hyb(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    # Without an expert_dtype the experts stay compact: int8 (the FP8 bytes), stated in info's checkpoint_format.
    compact = load_model(fp8, device="cpu", dtype="float32", progress=False)
    assert compact.hybridmoe.expert_format == "int8" and "experts held as int8" in compact.hybridmoe.source_format
    # The plain checkpoint gives visibly different logits: the FP8 rounding is real, and it was not skipped.
    with torch.no_grad():
        plain = load_model(ckpt_dir(arch), device="cpu", dtype="float32", progress=False)(ids).logits
    assert ((plain - want).norm() / want.norm()).item() > 1e-4


def test_fp8_with_int8_experts_and_bad_scales(tmp_path, ckpt_dir):
    """int8 experts from FP8 (quantized slice by slice); a scale grid that does not fit its weight is named."""
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}
    fp8 = rewrite_checkpoint(ckpt_dir("qwen3_moe"), tmp_path / "fp8", lambda sd: _fp8_quantize_blocks(sd, 8), qc)
    m = load_model(fp8, device="cpu", dtype="float32", expert_dtype="int8", progress=False)
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[3, 4, 5]])).logits).all()

    def bad(sd):
        sd = _fp8_quantize_blocks(sd, 8)
        k = next(k for k in sd if k.endswith("experts.1.up_proj.weight_scale_inv"))
        sd[k] = sd[k][:, :1].contiguous()
        return sd

    broken = rewrite_checkpoint(ckpt_dir("qwen3_moe"), tmp_path / "bad", bad, qc)
    with pytest.raises(CheckpointError, match=r"experts.1.up_proj.weight_scale_inv' in 'model.safetensors' has shape"):
        load_model(broken, device="cpu", progress=False)
    qc_static = {**qc, "activation_scheme": "static"}
    static = rewrite_checkpoint(ckpt_dir("qwen3_moe"), tmp_path / "static", lambda sd: _fp8_quantize_blocks(sd, 8), qc_static)
    with pytest.raises(CheckpointError, match="activation_scheme 'static'"):
        load_model(static, device="cpu", progress=False)


# -- MXFP4 experts (gpt-oss as shipped) ------------------------------------------------------------------------
_E2M1_POS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, out, in] -> (blocks [E, out, in/32, 16] uint8, scales [E, out, in/32] uint8), round to nearest e2m1 with
    one power-of-two scale per 32 inputs (OpenAI's layout: low nibble first, sign in the nibble's high bit)."""
    e, o, i = w.shape
    g = w.reshape(e, o, i // 32, 32)
    exp = torch.floor(torch.log2(g.abs().amax(-1).clamp_min(2.0**-100) / 6.0)).clamp(-127, 127)  # [E, out, G]
    x = g / torch.exp2(exp)[..., None]
    code = (x.abs()[..., None] - _E2M1_POS).abs().argmin(-1) + 8 * (x < 0).long()  # [E, out, G, 32]
    code = code.to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # [E, out, G, 16]
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def test_mxfp4_gpt_oss_equals_transformers_dequantized(tmp_path):
    """gpt-oss with MXFP4 experts, written by the test in the shipped layout, loads (experts dequantized as read;
    biases, attention and router bf16/fp32 as shipped) and its fp32 logits equal transformers' own dequantized load
    (Mxfp4Config(dequantize=True)) within 1e-5 relative."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = tiny_gpt_oss()
    src = tmp_path / "plain"
    model.save_pretrained(src)

    def to_mxfp4(sd):
        out = {}
        for k, t in sd.items():
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[k + "_blocks"], out[k + "_scales"] = _mxfp4_pack(t.transpose(1, 2).float())  # [E, out, in]
            else:
                out[k] = t
        return out

    mx = rewrite_checkpoint(src, tmp_path / "mxfp4", to_mxfp4, {"quant_method": "mxfp4", "modules_to_not_convert": None})
    # transformers keeps the dequantized experts in bf16 (exact: e2m1 · 2^k fits); .float() makes the reference fp32.
    ref = AutoModelForCausalLM.from_pretrained(mx, dtype=torch.float32,
                                               quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    hyb = load_model(mx, device="cpu", dtype="float32", expert_dtype="float32", progress=False)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, hyb(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert ((plain - want).norm() / want.norm()).item() > 1e-3  # the 4-bit rounding is real and was applied
    # By default the experts stay MXFP4 in RAM, byte for byte the shipped blocks (no float copy), and compute within
    # the bf16 rounding of the expert GEMMs' inputs and outputs.
    kept = load_model(mx, device="cpu", dtype="float32", progress=False)
    assert kept.hybridmoe.expert_format == "mxfp4" and "kept as shipped" in kept.hybridmoe.source_format

    shipped = load_file(str(mx / "model.safetensors"))
    ex = kept.model.layers[0].mlp.experts.weights
    assert torch.equal(ex.gate_up, shipped["model.layers.0.mlp.experts.gate_up_proj_blocks"].flatten(-2))
    # the scales too: the shipped e8m0 exponents, one byte per 32 weights
    assert torch.equal(ex.scales["gate_up_proj"], shipped["model.layers.0.mlp.experts.gate_up_proj_scales"])
    assert torch.equal(ex.scales["down_proj"], shipped["model.layers.0.mlp.experts.down_proj_scales"])
    with torch.no_grad():
        assert ((kept(ids).logits - want).norm() / want.norm()).item() <= 1e-2
