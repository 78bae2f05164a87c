"""Hybrid forward and LoRA gradients equal transformers (+PEFT) on tiny random configs of every architecture.

Tolerances (fp32): logits max |Δ| ≤ 1e-5 · max(1, max|ref|); gradients ‖Δ‖/‖ref‖ ≤ 1e-5. The only differences are
summation order (per-expert index_add vs transformers' loop) and fp32 rounding.
bf16 experts and compute: the error against the fp32 reference is at most 1.5x transformers' own bf16 error + 1e-3
(a bf16 forward can flip a top-k routing choice in either implementation, so a fixed bound would test luck).
"""

from __future__ import annotations

import pytest
import torch

from hybridmoe.adapters import apply_lora
from hybridmoe.experts import HybridExperts
from hybridmoe.experts.streaming import enable_streaming
from hybridmoe.loading import load_model
from hybridmoe.placement import placement_report
from hybridmoe.testing import TINY_ARCHS

from .conftest import DEVICES
from .helpers import lora_grads_hybrid, lora_grads_peft, peft_reference, randomize_lora, reference_model, rel_err

ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)
# "cpu-experts": every batch runs the experts on the CPU; "streamed": every batch runs them on `device` from the
# two-slot weight cache (on the CPU the slots are host copies: the same cache bookkeeping, checked without a GPU).
MODES = pytest.mark.parametrize("mode", ["cpu-experts", "streamed"])


def _load(path, device, mode, dtype="float32"):
    streamed = mode == "streamed"
    m = load_model(path, device=device, dtype=dtype, progress=False, stream_min_tokens=1 if streamed else 0)
    if streamed and device == "cpu":
        enable_streaming(m, "cpu", 1)
    return m


@MODES
@DEVICES
@ARCHS
def test_logits_match_transformers_fp32(arch, device, mode, tiny_ckpt):
    path = tiny_ckpt(arch)
    ref = reference_model(path, device=device)
    hyb = _load(path, device, mode)
    rep = placement_report(hyb)
    assert rep["ok"], rep["problems"]
    assert rep["moe_layers"] and all(dev.startswith(("cpu", device)) for dev in rep["devices"])
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want, got = ref(ids).logits, hyb(ids).logits
    assert (want - got).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@ARCHS
def test_logits_bf16_within_tolerance(arch, tiny_ckpt):
    path = tiny_ckpt(arch)
    ref32, ref16 = reference_model(path), reference_model(path, torch.bfloat16)
    hyb = load_model(path, device="cpu", dtype="bfloat16", expert_dtype="bfloat16", progress=False)
    assert all(m.weights.gate_up.dtype == torch.bfloat16 for m in hyb.modules() if isinstance(m, HybridExperts))
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, theirs, got = ref32(ids).logits, ref16(ids).logits.float(), hyb(ids).logits.float()
    assert rel_err(got, want) <= 1.5 * rel_err(theirs, want) + 1e-3


@MODES
@DEVICES
@ARCHS
def test_lora_gradients_match_peft(arch, device, mode, tiny_ckpt):
    path = tiny_ckpt(arch)
    hyb = apply_lora(_load(path, device, mode), "all", rank=4, alpha=8, seed=3)
    randomize_lora(hyb, seed=4)
    ref = peft_reference(path, hyb, device)

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 9), generator=g).to(device)
    emb = torch.randn(2, 9, 32, generator=g).to(device)
    losses, embeds = [], []
    for model in (ref, hyb):
        x = emb.clone().requires_grad_(True)
        out = model(inputs_embeds=x, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        embeds.append(x.grad)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert rel_err(embeds[1], embeds[0]) <= 1e-5

    want, got = lora_grads_peft(ref), lora_grads_hybrid(hyb)
    assert set(want) == set(got)
    assert any(".experts." in k for k in want)  # routed-expert LoRA is part of the comparison
    for k in want:
        assert got[k].device.type == ("cpu" if ".experts." in k else device)  # expert LoRA grads stay on the CPU
        assert rel_err(got[k].cpu(), want[k].cpu()) <= 1e-5, k
