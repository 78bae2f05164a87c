"""`hybridmoe export` on quantized bases: FP8 block-scaled, MXFP4 (gpt-oss) and compressed-tensors int4 / int8.

Each base is written by the test from a plain tiny checkpoint: FP8 by an e4m3 block writer here (blocks that do not
divide the weights; scales in another shard than their weights, in both directions; per-expert keys, and fused
[E, out, in] keys per block and per tensor), MXFP4 by test_formats' gpt-oss packer, compressed-tensors by
``hybridmoe convert``. The adapter touches `q_proj` and one routed-expert projection (gpt-oss: its interleaved
`gate_up_proj`; else `down_proj`), so each base has quantized weights the adapter touches (re-quantized) and quantized
weights it does not (the other expert projection, FP8's k/v/o: copied byte for byte, scales included).

Tolerances (fp32 logits, relative L2 error against the base with the adapter, both loaded by hybridmoe):
- re-quantized export: at most 1.25x one quantization's error, measured in the test as the error of the fp32-merged
  model (the ``--dtype float32`` export) quantized once into the same format by the test's own writer (for FP8, int4
  and int8 the two are equal: the same rule, idempotent on untouched weights); and far below the adapter's effect;
- ``--dtype bfloat16`` export: its tensors are the float32 export's rounded once to bf16 (bitwise), transformers reads
  the float32 export as base + adapter (1e-5) and the bf16 one as hybridmoe does (1e-5); against base + adapter its
  logits are within 0.15 (see the test: a bf16 rounding can flip a top-k expert choice in these random models).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybridmoe
from hybridmoe.adapters import apply_lora, save_adapter
from hybridmoe.checkpoint import INDEX_NAME
from hybridmoe.cli import main
from hybridmoe.convert import convert_checkpoint
from hybridmoe.export import export_merged
from hybridmoe.loading import load_model
from hybridmoe.testing import build_tokenizer, save_tiny_model

from .helpers import make_checkpoint, one_line_error, randomize_lora, rel_err, tiny_gpt_oss
from .test_formats import _mxfp4_pack

TINY = dict(hidden_size=64, moe_intermediate_size=32)  # expert inputs 64 and 32: int4 groups of 32 fit
FP8_BLOCK = [16, 24]  # 24 divides none of 64, 32, head dims: edge blocks are cut short
# The routed-expert projection each adapter touches (with q_proj): gpt-oss's interleaved gate_up_proj, else down_proj
EXPERT_PROJ = {"gpt_oss": "gate_up_proj", "qwen3_moe": "down_proj", "olmoe": "down_proj"}
IDS = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))
FORMATS = ["fp8", "mxfp4", "int4", "int8"]
# FP8 on fused v5 expert keys ([E, out, in], scales [E, ...]): merged slice by slice (blocks) or whole (one scale)
FUSED_FP8 = ["fp8-fused", "fp8-tensor"]


# -- bases written by the test ---------------------------------------------------------------------------------
def _is_linear(k: str, t: torch.Tensor) -> bool:
    if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return True  # fused [E, out, in]
    return k.endswith(".weight") and t.dim() == 2 and not any(s in k for s in ("norm", "embed", "lm_head", "mlp.gate."))


def _copy_without_weights(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """Copy checkpoint `src` to `dst` without its weights (shards and index); returns the weights, fp32."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", INDEX_NAME, "hybridmoe_export.json"))
    return {k: v.float() for k, v in _tensors(src).items()}


def _write(fmt: str, plain: Path, dst: Path) -> Path:
    """`plain` quantized into `fmt` by this test's writers (compressed-tensors: by `hybridmoe convert`)."""
    if fmt.startswith("fp8"):
        return _write_fp8(plain, dst, None if fmt == "fp8-tensor" else FP8_BLOCK)
    if fmt == "mxfp4":
        return _write_mxfp4(plain, dst)
    return convert_checkpoint(plain, dst, fmt, progress=False)


def _fp8(t: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [(E,) out, in] -> (float8_e4m3fn, fp32 scale_inv [(E,) ceil(out/bo), ceil(in/bi)]): block amax / 448, edge
    blocks cut short (zero padding), DeepSeek-V3's layout; block None: one scale [1] for the tensor."""
    if block is None:
        scale = (t.abs().amax() / 448.0).reshape(1)
        return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale
    if t.dim() == 3:
        parts = [_fp8(x, block) for x in t]
        return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])
    (o, i), (bo, bi) = t.shape, block
    p = torch.zeros(-(-o // bo) * bo, -(-i // bi) * bi)
    p[:o, :i] = t
    b = p.view(p.shape[0] // bo, bo, p.shape[1] // bi, bi)
    scale = (b.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    q = (b / scale[:, None, :, None]).clamp(-448, 448).view_as(p)[:o, :i].to(torch.float8_e4m3fn)
    return q, scale


def _write_fp8(plain: Path, dst: Path, block: list[int] | None = FP8_BLOCK) -> Path:
    """FP8 in two shards: even layers' weights with odd layers' scales, and the other way round (a weight's
    scale_inv in an earlier and in a later shard than the weight)."""
    sd = _copy_without_weights(plain, dst)
    shards: list[dict] = [{}, {}]
    for k, t in sd.items():
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else 0
        if not _is_linear(k, t):
            shards[0][k] = t
            continue
        q, s = _fp8(t, block)
        shards[layer % 2][k] = q
        shards[1 - layer % 2][k + "_scale_inv"] = s
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, shard in zip(names, shards):
        save_file(shard, str(dst / name), metadata={"format": "pt"})
    weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  **({"weight_block_size": block} if block else {})}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _plain_gpt_oss(dst: Path) -> Path:
    model = tiny_gpt_oss()
    model.save_pretrained(dst)
    build_tokenizer().save_pretrained(dst)  # hybridmoe.load wants one; IDS stay inside the vocabulary
    return dst


def _plain_fused_olmoe(dst: Path) -> Path:
    """olmoe saved as its v5 module state dict: fused experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    model = save_tiny_model("olmoe", dst, tokenizer=build_tokenizer(), vocab_size=len(build_tokenizer()), **TINY)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def _write_mxfp4(plain: Path, dst: Path) -> Path:
    sd = _copy_without_weights(plain, dst)
    out = {}
    for k, t in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> blocks of [E, out, in]
            out[k + "_blocks"], out[k + "_scales"] = _mxfp4_pack(t.transpose(1, 2).float())
        else:
            out[k] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": None}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _expert_proj(plain: Path) -> str:
    return EXPERT_PROJ[json.loads((plain / "config.json").read_text())["model_type"]]


def _adapter(plain: Path, out: Path) -> Path:
    """Rank-4 LoRA on q_proj and one routed-expert projection, random A and B, made on the plain model."""
    model = load_model(plain, device="cpu", dtype="float32", progress=False)
    peft_model = apply_lora(model, f"q_proj,{_expert_proj(plain)}", 4, 8.0, seed=0)
    randomize_lora(peft_model, 1, scale=0.2)
    save_adapter(peft_model, out)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """cases(fmt) -> (plain dir, quantized base dir, adapter dir), built once."""
    root = tmp_path_factory.mktemp("export_q")
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def make(fmt: str) -> tuple[Path, Path, Path]:
        if fmt not in cache:
            if fmt in FUSED_FP8:
                plain = root / "olmoe_fused"
                if not plain.exists():
                    _plain_fused_olmoe(plain)
                adapter = root / "adapter_olmoe"
                base = _write(fmt, plain, root / fmt)
            elif fmt == "mxfp4":
                plain = root / "gpt_oss"
                if not plain.exists():
                    _plain_gpt_oss(plain)
                adapter = root / "adapter_gpt_oss"
                base = _write(fmt, plain, root / fmt)
            else:
                plain = root / "qwen3_moe"
                if not plain.exists():
                    make_checkpoint("qwen3_moe", plain, **TINY)
                adapter = root / "adapter_qwen3_moe"
                base = _write(fmt, plain, root / fmt)
            if not adapter.exists():
                _adapter(plain, adapter)
            cache[fmt] = (plain, base, adapter)
        return cache[fmt]

    return make


@functools.cache  # base (+ adapter) logits are wanted by several tests; never mutated
def _logits(path: Path, adapter: Path | None = None) -> torch.Tensor:
    """fp32 logits of hybridmoe's load (experts fp32: the checkpoint's values, no compact re-quantization)."""
    model, _ = hybridmoe.load(str(path), adapter=str(adapter) if adapter else None, device="cpu", dtype="float32",
                              expert_dtype="float32", progress=False)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


# -- (a) + (c): re-quantized into the base's own format ----------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS + FUSED_FP8)
def test_requantized_export(fmt, cases, tmp_path):
    plain, base, adapter = cases(fmt)
    out = export_merged(base, adapter, tmp_path / "merged", progress=False)
    src, dst = _tensors(base), _tensors(out)
    # (c) the base's layout: the same keys, dtypes and shapes, in the same shards; the config (quantization_config
    # included) as it was; every tensor the adapter does not touch byte for byte, its scales included.
    assert {k: (v.dtype, v.shape) for k, v in dst.items()} == {k: (v.dtype, v.shape) for k, v in src.items()}
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    changed = {k for k in src if not torch.equal(_bytes(src[k]), _bytes(dst[k]))}
    proj = _expert_proj(plain)
    touched = {k for k in src if (".q_proj." in k or (proj in k and ".experts" in k)) and "bias" not in k}
    assert changed <= touched and {k for k in touched if "scale" not in k and "shape" not in k} <= changed
    assert any(".experts" in k and "scale" in k and proj not in k for k in src.keys() - changed)
    # (a) hybridmoe reads it back: base + adapter within one quantization's error, and the adapter is in it. One
    # quantization's error: that of the plain merged model (the float32 export: base dequantized + ΔW, in fp32)
    # quantized once into the same format by this test's own writer.
    want = _logits(base, adapter)
    merged = export_merged(base, adapter, tmp_path / "merged_f32", progress=False, dtype="float32")
    assert rel_err(_logits(merged), want) <= 1e-5  # the fp32 merge is exact up to summation order
    one_quantization = rel_err(_logits(_write(fmt, merged, tmp_path / "requantized_by_test")), want)
    err = rel_err(_logits(out), want)
    assert err <= 1.25 * one_quantization, (err, one_quantization)
    assert rel_err(_logits(base), want) > 3 * err  # the merge is there: without it the error is far larger
    # transformers' own readers of the format (dequantizing) read the export as hybridmoe does: MXFP4 within 1e-5;
    # compressed-tensors int4 as closely as they read the base (transformers dequantizes bf16-scaled int4 in bf16:
    # 2e-3 on the base). (Its FP8 reader needs blocks that divide the weights; test_formats covers those.)
    if fmt in ("mxfp4", "int4"):
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig, Mxfp4Config

        qc = Mxfp4Config(dequantize=True) if fmt == "mxfp4" else CompressedTensorsConfig(dequantize=True)

        def transformers_logits(path: Path) -> torch.Tensor:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, quantization_config=qc)
            with torch.no_grad():
                return model.float().eval()(IDS).logits

        on_base = rel_err(transformers_logits(base), _logits(base))
        assert rel_err(transformers_logits(out), _logits(out)) <= 1.5 * on_base + 1e-5


# -- (b): a plain bf16 checkpoint that transformers loads ----------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_export_loads_in_transformers(fmt, cases, tmp_path, capsys):
    """The --dtype bfloat16 export is base + adapter with exactly one bf16 rounding per weight: its tensors are the
    float32 export's rounded once, and transformers reads the float32 export as base + adapter in hybridmoe (1e-5)
    and the bf16 one as hybridmoe reads it (1e-5). Against base + adapter its logits are within 0.15: one bf16
    rounding of every weight is 0.3-1% on these random tiny models, but a weight's rounding can flip a top-k expert
    choice (measured up to 10% with a larger adapter); the exact checks above are the sharp ones."""
    from transformers import AutoModelForCausalLM

    _, base, adapter = cases(fmt)
    out, f32 = tmp_path / "bf16", tmp_path / "f32"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output", str(out),
                 "--dtype", "bfloat16"]) == 0
    export_merged(base, adapter, f32, progress=False, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    tensors, exact = _tensors(out), _tensors(f32)
    assert not [k for k in tensors if k.endswith(("_scale", "_scale_inv", "_scales", "_blocks", "_packed", "_shape"))]
    assert tensors.keys() == exact.keys()
    for k, t in tensors.items():
        assert torch.equal(t, exact[k].to(torch.bfloat16) if t.is_floating_point() else exact[k]), k

    def transformers_logits(path: Path) -> torch.Tensor:
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()(IDS).logits

    want = _logits(base, adapter)
    assert rel_err(transformers_logits(f32), want) <= 1e-5
    got = transformers_logits(out)
    assert rel_err(got, _logits(out)) <= 1e-5
    assert rel_err(got, want) <= 0.15


def test_plain_base_dtype_export(cases, tmp_path):
    """A plain fp32 base with --dtype bfloat16: every float tensor is the fp32 merge rounded once to bf16."""
    plain, _, adapter = cases("int8")
    exact = _tensors(export_merged(plain, adapter, tmp_path / "f32", progress=False))  # the base's own fp32
    got = _tensors(export_merged(plain, adapter, tmp_path / "bf16", progress=False, dtype="bfloat16"))
    assert got.keys() == exact.keys()
    assert all(torch.equal(t, exact[k].to(torch.bfloat16)) for k, t in got.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# -- (d): bad input: one line, non-zero exit, nothing written ---------------------------------------------------
def test_bad_input_one_line_nothing_written(cases, tmp_path, capsys):
    _, fp8, qwen_adapter = cases("fp8")
    _, mxfp4, gpt_adapter = cases("mxfp4")
    out = tmp_path / "merged"

    def refused(model: Path, adapter: Path, *fragments: str) -> None:
        one_line_error(capsys, ["export", "--model", str(model), "--adapter", str(adapter), "--output", str(out)],
                       *fragments)
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))

    refused(mxfp4, qwen_adapter, "another model")  # an adapter for another model
    refused(fp8, gpt_adapter, "another model")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for p in fp8.iterdir():
        (unknown / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "nvfp4"}}))
    refused(unknown, qwen_adapter, "quant_method 'nvfp4'")
    # scale grids that do not fit their weights (a block size the scales were not made with; one scale tensor cut
    # short, of a weight the adapter does not touch): refused before anything is written, not copied
    cfg["quantization_config"]["weight_block_size"] = [32, 32]
    (unknown / "config.json").write_text(json.dumps(cfg))
    refused(unknown, qwen_adapter, "weight_scale_inv", "do not match")
    (unknown / "config.json").write_bytes((fp8 / "config.json").read_bytes())
    key = "model.layers.0.self_attn.k_proj.weight_scale_inv"
    shard = unknown / json.loads((unknown / INDEX_NAME).read_text())["weight_map"][key]
    sd = load_file(str(shard))
    sd[key] = sd[key][:, :1].contiguous()
    save_file(sd, str(shard), metadata={"format": "pt"})
    refused(unknown, qwen_adapter, f"'{key}'", "do not match")


# -- the quantizers: idempotent on what they wrote ------------------------------------------------------------------
def test_requantization_is_idempotent():
    """Dequantized (the loader's functions) and quantized again, every format gets its own codes back: a weight
    re-quantized without a delta is unchanged (FP8's fp32 scale may move by an ulp: 448 · s rounds in fp32)."""
    from hybridmoe.compressed import IntScheme, dequantize_int, read_packed
    from hybridmoe.experts.packed import PackedFormat, dequantize_packed, mxfp4_scales
    from hybridmoe.formats import dequantize_fp8
    from hybridmoe.requantize import quantize_compressed, quantize_fp8, quantize_mxfp4_blocks

    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    w[:16, :24] = 0  # an all-zero block
    f = Path("model.safetensors")
    for block in ([16, 24], None):
        q, s = quantize_fp8(w, block, torch.float32)
        w1 = dequantize_fp8(q, s, block, "w", f)
        assert rel_err(w1, w) < 0.05
        q2, s2 = quantize_fp8(w1, block, torch.float32)
        assert torch.equal(_bytes(q2), _bytes(q)) and torch.allclose(s2, s, rtol=2**-22, atol=0)
    blocks, exps = quantize_mxfp4_blocks(w)
    w1 = dequantize_packed(blocks.flatten(-2), mxfp4_scales(exps), PackedFormat("mxfp4", 32))
    assert rel_err(w1, w) < 0.2
    assert all(torch.equal(a, b) for a, b in zip(quantize_mxfp4_blocks(w1), (blocks, exps)))
    for bits, fmt, strategy, group in ((4, "pack-quantized", "group", 32), (4, "pack-quantized", "channel", None),
                                       (4, "int-quantized", "group", 32), (8, "int-quantized", "group", 32),
                                       (8, "int-quantized", "channel", None)):
        scheme = IntScheme(("Linear",), fmt, bits, strategy, group)
        packed = fmt == "pack-quantized"
        q, s = quantize_compressed(w, bits, group or 64, torch.bfloat16, packed)
        if packed:
            w1 = read_packed(q, torch.tensor([40, 64]), s, scheme, "m.weight_packed", f).dequantize()
        else:
            w1 = dequantize_int(q, s, scheme, "m.weight", f)
        assert rel_err(w1, w) < (0.15 if bits == 4 else 0.01)
        q2, s2 = quantize_compressed(w1, bits, group or 64, torch.bfloat16, packed)
        assert torch.equal(q2, q) and torch.equal(s2, s), (bits, strategy)
