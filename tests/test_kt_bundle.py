"""KTransformers adapter bundles load with KT's exact semantics, everywhere an adapter is loaded, or are refused by
one line naming the file.

KT's semantics (read from kt-kernel: ``python/sft/lora.py`` ``_create_fused_expert_lora_buffers`` /
``_save_fused_expert_lora``, ``python/sft/artifacts.py`` ``save_kt_adapter_artifacts``, ``python/sft/base.py`` and
``operators/amx/sft_moe.hpp``):

- scale: ``lora_scaling = lora_alpha / lora_rank``, one rank and alpha per bundle (manifest ``lora``, equal to
  adapter_config.json's ``r``/``lora_alpha``); B is never pre-scaled.
- gate and up are two LoRAs with separate A's: gate_out += s·(x gate_a[e]^T) gate_b[e]^T and
  up_out += s·(x up_a[e]^T) up_b[e]^T, both before the activation; down_out += s·(h down_a[e]^T) down_b[e]^T.
- layout: gate_lora_a/up_lora_a [E, r, H], gate_lora_b/up_lora_b [E, I, r], down_lora_a [E, r, I],
  down_lora_b [E, H, r] (row-major per expert: the kernel offsets expert e by e·r·H), keyed ``layers.{L}.experts.*``
  with L the model's layer index.
- dtype: stored bf16 (kt-kernel's buffers). hybridmoe keeps expert LoRA in fp32 (the upcast is exact) and computes in
  the model's dtype; kt-kernel computes in bf16 with fp32 accumulation, so bf16 runs differ by rounding only.
- on hybridmoe's fused ``gate_up_proj [E, 2I, H]`` (gate rows first), one LoRA with one A cannot hold two A's at
  rank r; rank 2r with A = [gate_a; up_a], B = [[gate_b, 0], [0, up_b]] and alpha 2·alpha (same scale) gives
  B @ A = [gate_b @ gate_a; up_b @ up_a] exactly. ``test_kt_bundle_logits_equal_peft_reference`` also checks that
  against the formula written out on the expert weights (tests/kt_format.py ``merged_reference``).

Tolerance (fp32 model, bf16 LoRA values upcast exactly): logits max |Δ| ≤ 1e-5 · max(1, max|ref|).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hybridmoe
from hybridmoe.cli import main
from hybridmoe.experts import HybridExperts
from hybridmoe.inspect import inspect_adapter

from .kt_format import merged_reference, peft_reference, write_kt_bundle, write_manifest

KT_ARCHS = pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])  # dense layer 0 + shared experts; plain MoE


def _ids(n_vocab=128, seed=0):
    return torch.randint(4, n_vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _close(got, want):
    return (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, ckpt_dir):
    """bundles(arch) -> (checkpoint, bundle dir, bundle tensors); one per arch for the module (read-only)."""
    cache = {}

    def make(arch):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"kt_{arch}")
            cache[arch] = (ckpt_dir(arch), out, write_kt_bundle(ckpt_dir(arch), out, seed=3))
        return cache[arch]

    return make


@pytest.fixture(scope="module")
def reference_logits(bundles):
    """reference_logits(arch) -> logits of the vanilla transformers + PEFT reference on _ids() (cached)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            ckpt, _, tensors = bundles(arch)
            with torch.no_grad():
                cache[arch] = peft_reference(ckpt, tensors)(_ids()).logits
        return cache[arch]

    return get


@KT_ARCHS
def test_kt_bundle_logits_equal_peft_reference(arch, bundles, reference_logits):
    ckpt, adapter, tensors = bundles(arch)
    want = reference_logits(arch)
    model, _ = hybridmoe.load(ckpt, adapter=adapter, device="cpu", dtype="float32", progress=False)
    x = _ids()
    with torch.no_grad():
        assert _close(model(x).logits, want)
        # the rank-2r block layout the reference uses is KT's formula written out on the expert weights
        assert _close(merged_reference(ckpt, tensors)(x).logits, want)
        # and the routed-expert part matters: without it the answer differs (so it cannot have been dropped)
        for m in model.modules():
            if isinstance(m, HybridExperts):
                m.lora = {}
        assert not _close(model(x).logits, want)


def test_kt_bundle_export_and_merge(bundles, reference_logits, tmp_path):
    ckpt, adapter, tensors = bundles("deepseek_v2")
    from transformers import AutoModelForCausalLM

    from hybridmoe.export import export_merged

    export_merged(ckpt, adapter, tmp_path / "merged")
    x, want = _ids(), reference_logits("deepseek_v2")
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(x).logits
        merged = hybridmoe.load(ckpt, adapter=adapter, device="cpu", dtype="float32", merge=True, progress=False)[0]
        # merged weights sum x·(W + ΔW) instead of x·W + x·ΔW: fp32 rounding of a different order, as in test_chat
        assert torch.allclose(exported, want, atol=1e-4, rtol=1e-4), (exported - want).abs().max()
        assert torch.allclose(merged(x).logits, want, atol=1e-4, rtol=1e-4)


def test_kt_bundle_served_by_name(bundles, reference_logits):
    """`serve` loads each adapter into an AdapterSet by name; a KT bundle there answers like the reference."""
    from hybridmoe.loading import load_model
    from hybridmoe.serve.adapters import AdapterSet

    ckpt, adapter, _ = bundles("deepseek_v2")
    adapters = AdapterSet(load_model(ckpt, device="cpu", dtype="float32", progress=False))
    adapters.load("kt", adapter)
    want = reference_logits("deepseek_v2")
    with torch.no_grad():
        adapters.activate("kt")
        assert _close(adapters.model(_ids()).logits, want)
        adapters.activate(None)
        assert not _close(adapters.model(_ids()).logits, want)


def test_kt_bundle_chat_info_inspect(bundles, capsys):
    ckpt, adapter, tensors = bundles("deepseek_v2")
    assert main(["chat", "--model", str(ckpt), "--adapter", str(adapter), "--prompt", "hi", "--temperature", "0",
                 "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"]) == 0
    capsys.readouterr()

    assert main(["info", "--model", str(ckpt), "--adapter", str(adapter), "--device", "cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["lora_targets"]["routed_experts"] == 2 * 2  # 2 MoE layers x (gate_up, down)
    assert rep["adapter"]["format"] == "kt-bundle" and rep["adapter"]["routed_expert_layers"] == [1, 2]

    report = inspect_adapter(adapter)
    routed = report["components"]["routed_experts"]
    assert routed["tensors"] == len(tensors["fused"]) == 12
    assert routed["params"] == sum(v.numel() for v in tensors["fused"].values())
    assert report["kt_bundle"]["rank"] == 2 and report["kt_bundle"]["layers"] == [1, 2]
    assert report["ok"]
    assert main(["inspect", str(adapter)]) == 0
    assert "KTransformers bundle" in capsys.readouterr().out


def _copy(adapter, dst):
    shutil.copytree(adapter, dst)
    return dst


def test_inspect_finds_nan_in_routed_expert_part(bundles, tmp_path, capsys):
    """The seed's NaN diagnosis covers the fused file: a NaN there is named, and chat refuses the bundle."""
    ckpt, adapter, tensors = bundles("deepseek_v2")
    bad = _copy(adapter, tmp_path / "nan")
    from safetensors.torch import save_file

    fused = dict(tensors["fused"])
    fused["layers.2.experts.up_lora_b"] = fused["layers.2.experts.up_lora_b"].clone()
    fused["layers.2.experts.up_lora_b"][0, 0, 0] = float("nan")
    save_file(fused, str(bad / "fused_expert_lora.safetensors"))
    write_manifest(bad, tensors["rank"], tensors["alpha"], fused)
    report = inspect_adapter(bad)
    assert report["nonfinite"] == ["layers.2.experts.up_lora_b"]
    assert report["components"]["routed_experts"]["nan_tensors"] == 1
    assert main(["inspect", str(bad)]) == 1
    assert main(["chat", "--model", str(ckpt), "--adapter", str(bad), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "routed_experts 1" in err[0]


# -- bad input: one line naming the file, non-zero exit, for every entry point ----------------------------------
def _tamper_hash(d, tensors):
    raw = bytearray((d / "fused_expert_lora.safetensors").read_bytes())
    raw[-1] ^= 0x01  # same size, different bytes: a flipped bit in the last tensor's data
    (d / "fused_expert_lora.safetensors").write_bytes(bytes(raw))


def _status_saving(d, tensors):
    m = json.loads((d / "kt_adapter_manifest.json").read_text())
    m["status"] = "saving"
    (d / "kt_adapter_manifest.json").write_text(json.dumps(m))


def _rank_differs(d, tensors):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 4
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    write_manifest(d, tensors["rank"], tensors["alpha"], tensors["fused"])  # a consistent manifest: only r differs


def _wrong_shapes(d, tensors):
    """A self-consistent bundle whose experts have a different intermediate size than the model's."""
    from safetensors.torch import save_file

    fused = {}
    for k, v in tensors["fused"].items():
        shape = list(v.shape)
        if k.endswith(("gate_lora_b", "up_lora_b")):
            shape[1] += 1
        elif k.endswith("down_lora_a"):
            shape[2] += 1
        fused[k] = torch.zeros(shape, dtype=torch.bfloat16)
    save_file(fused, str(d / "fused_expert_lora.safetensors"))
    write_manifest(d, tensors["rank"], tensors["alpha"], fused)


def _no_manifest(d, tensors):
    (d / "kt_adapter_manifest.json").unlink()


def _no_fused(d, tensors):
    (d / "fused_expert_lora.safetensors").unlink()


BAD = {
    "hash": (_tamper_hash, "fused_expert_lora.safetensors' does not match its size/sha256"),
    "status": (_status_saving, "status 'saving', not 'ready'"),
    "rank": (_rank_differs, "adapter_config.json' says r=4"),
    "shapes": (_wrong_shapes, "intermediate 24"),
    "no-manifest": (_no_manifest, "but no kt_adapter_manifest.json"),
    "no-fused": (_no_fused, "fused_expert_lora.safetensors' is listed in kt_adapter_manifest.json but missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundle_one_line(case, bundles, tmp_path, capsys):
    ckpt, adapter, tensors = bundles("deepseek_v2")
    bad = _copy(adapter, tmp_path / case)
    breaker, message = BAD[case]
    breaker(bad, tensors)
    commands = [["chat", "--model", str(ckpt), "--adapter", str(bad), "--prompt", "hi", "--device", "cpu"],
                ["info", "--model", str(ckpt), "--adapter", str(bad), "--device", "cpu", "--json"]]
    if case != "shapes":  # inspect has no model to compare shapes with
        commands.append(["inspect", str(bad)])
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hybridmoe: error: "), (argv[0], err)
        assert message in err[0], (argv[0], err[0])
    out = tmp_path / "export"
    assert main(["export", "--model", str(ckpt), "--adapter", str(bad), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_legacy_kt_orig_module_keys(bundles, reference_logits, tmp_path):
    """Older KTransformers (kt-sft) saved keys through its injected wrappers (`….orig_module.q_proj.orig_module.
    lora_A.weight`); they load as the plain names, and converting writes the plain names."""
    from safetensors.torch import load_file, save_file

    ckpt, adapter, _ = bundles("deepseek_v2")
    peft_dir = tmp_path / "peft"
    assert main(["adapter", "convert", str(adapter), "--to", "peft", "--output", str(peft_dir)]) == 0
    legacy = _copy(peft_dir, tmp_path / "legacy")
    sd = load_file(str(legacy / "adapter_model.safetensors"))
    renamed = {k.replace("model.model.layers", "model.model.orig_module.layers").replace(".self_attn.", ".self_attn.orig_module.")
               .replace(".mlp.", ".mlp.orig_module."): v for k, v in sd.items()}
    assert sum(".orig_module." in k for k in renamed) == len(renamed)
    save_file(renamed, str(legacy / "adapter_model.safetensors"))
    model, _ = hybridmoe.load(ckpt, adapter=legacy, device="cpu", dtype="float32", progress=False)
    with torch.no_grad():
        assert _close(model(_ids()).logits, reference_logits("deepseek_v2"))
    assert main(["adapter", "convert", str(legacy), "--to", "peft", "--output", str(tmp_path / "again")]) == 0
    assert set(load_file(str(tmp_path / "again" / "adapter_model.safetensors"))) == set(sd)
