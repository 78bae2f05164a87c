"""Graph decode's mapped GPU share (hybridmoe.mapped_share): the last n of each token's picked 4-bit experts computed
on the GPU from the weights in host memory, the rest on the CPU. Against the copy share (the same math from copied
weights) and against decoding with no share: on the CPU through Triton's interpreter (where Triton is installed),
on CUDA in graphs with gates (`pytest -m gpu`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import hybridmoe
from hybridmoe import mapped_share
from hybridmoe.decode_graph import StaticDecoder
from hybridmoe.generation import input_device
from hybridmoe.placement import format_report, placement_report

from .helpers import make_zoo_checkpoint, run_in_triton_interpreter

# Logits of six decode steps: the mapped share against the copy share (the same bf16 math, fp32 sums in another
# order, so an output's bf16 rounding may differ by a unit) and against no share (the CPU's 4-bit math: int8
# activations for MXFP4 and int4 in groups of 64, bf16 ones on the GPU).
STEPS = """
import torch
import hybridmoe
from hybridmoe import mapped_share
from hybridmoe.decode_graph import MappedShare, StaticDecoder, _GpuShare
from hybridmoe.generation import input_device

def logits(model, share, mapped=True, graphs=True):
    mapped_share.ENABLED = mapped
    dev = input_device(model)
    dec = StaticDecoder(model, 64, dev, use_graphs=graphs, gpu_share=share)
    out = [dec.prefill(torch.arange(5, 25, device=dev).unsqueeze(0))]
    token = out[0].argmax(-1)
    for pos in range(20, 26):
        out.append(dec.step(token, pos))
        token = out[-1].argmax(-1)
    mapped_share.ENABLED = True
    return torch.stack([o.float().cpu() for o in out]), dec

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

def check(path, fmt, device, share):
    model, _ = hybridmoe.load(path, device=device, dtype="float32", expert_dtype=fmt, progress=False)
    model.eval()
    got, dec = logits(model, share)
    assert isinstance(dec.share, MappedShare), type(dec.share)
    k = dec.cuts[0].ids.shape[1]
    assert dec.share.n == min(k, round(k * share))
    copied, cdec = logits(model, share, mapped=False)
    assert isinstance(cdec.share, _GpuShare) and not isinstance(cdec.share, MappedShare)
    none, _ = logits(model, 0.0)
    assert rel(got, copied) < 2e-3, rel(got, copied)
    assert rel(got, none) < 3e-2, rel(got, none)
    assert torch.equal(got.argmax(-1), copied.argmax(-1))
    if device == "cuda":  # in graphs with gates; bit for bit the same kernels run eagerly
        assert dec.mode == "cuda_graphs" and dec.chain.gates is not None
        eager, _ = logits(model, share, graphs=False)
        assert torch.equal(got, eager)
    return rel(got, copied), rel(got, none)
"""

CASES = [("gpt_oss", "mxfp4", 0.5), ("deepseek_v2", "int4", 0.5), ("qwen3_moe", "int4", 1.0)]


# expert inputs of 128 and 64: MXFP4's group of 32 and int4's of 64 fit
DIMS = {"gpt_oss": dict(hidden_size=128, intermediate_size=64),
        "deepseek_v2": dict(hidden_size=128, moe_intermediate_size=64),
        "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=64)}


def _checkpoint(arch, tmp_path):
    return make_zoo_checkpoint(arch, tmp_path / arch, **DIMS[arch])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("arch,fmt,share", CASES[:1])
def test_mapped_share_in_interpreter(arch, fmt, share, tmp_path):
    """Eager decode on the CPU, the share's kernels in Triton's interpreter (read when they are defined: a child
    process). gpt-oss: MXFP4 with e8m0 scales, expert biases, its clamped SwiGLU between the GEMVs (int4 with bf16
    scales: test_host_gemv here, every case on CUDA)."""
    path = _checkpoint(arch, tmp_path)
    code = STEPS + f"\nprint(check({str(path)!r}, {fmt!r}, 'cpu', {share}))\nprint('ok')\n"
    # a row block of 16 a program: the interpreter runs programs one by one (test_host_gemv covers the default tiling)
    run_in_triton_interpreter(code, timeout=900, HYBRIDMOE_HOST_GEMV_TILING="16,2048,4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch,fmt,share", CASES)
def test_mapped_share_on_cuda(arch, fmt, share, tmp_path):
    scope: dict = {}
    exec(STEPS, scope)
    scope["check"](str(_checkpoint(arch, tmp_path)), fmt, "cuda", share)


def test_mapped_share_says_why_not(monkeypatch, tmp_path):
    path = _checkpoint("deepseek_v2", tmp_path)
    model, _ = hybridmoe.load(path, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    m = next(m for m in model.modules() if hasattr(m, "weights") and hasattr(m, "mlp"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    want = "CUDA only" if mapped_share.host_gemv.available() else "Triton is not installed"
    assert mapped_share.unavailable(m.weights, torch.device("cpu")) == want
    assert (f"decode GPU share: none (4-bit experts are shared only when the GPU reads them from host memory: {want})"
            in format_report(placement_report(model)))
    monkeypatch.setattr(mapped_share, "ENABLED", False)
    assert mapped_share.unavailable(m.weights, torch.device("cuda")) == "HYBRIDMOE_MAPPED_SHARE=0"
    monkeypatch.setattr(mapped_share, "ENABLED", True)
    bf16, _ = hybridmoe.load(path, device="cpu", dtype="float32", progress=False)
    mb = next(m for m in bf16.modules() if hasattr(m, "weights") and hasattr(m, "mlp"))
    assert mapped_share.unavailable(mb.weights, torch.device("cuda")) == "int4 and MXFP4 experts only"
    # on the CPU without the interpreter a given share of 4-bit experts is the copy share, as before
    dec = StaticDecoder(model.eval(), 64, input_device(model), gpu_share=0.5)
    dec.prefill(torch.arange(5, 25).unsqueeze(0))
    dec.step(torch.tensor([3]), 20)
    assert dec.share is not None and not isinstance(dec.share, mapped_share.MappedShare)


def test_decode_share_by_default_and_when_set(monkeypatch, tmp_path):
    """The default share of 4-bit experts (0.2: 1 of 4, 1 of 6, 2 of 8 picks) holds only where it is mapped and for
    batch 1; a share set explicitly is kept, copied where it cannot be mapped."""
    path = _checkpoint("deepseek_v2", tmp_path)
    model, _ = hybridmoe.load(path, device="cpu", dtype="float32", expert_dtype="int4", progress=False)
    m = next(m for m in model.modules() if hasattr(m, "weights") and hasattr(m, "mlp"))
    cuda = torch.device("cuda")
    monkeypatch.setattr(mapped_share, "unavailable", lambda weights, device: None)
    assert mapped_share.decode_share(m, cuda) == (0.2, True)
    assert mapped_share.decode_share(m, cuda, batched=True) == (0.0, False)  # the server's batches: none, as before
    assert mapped_share.decode_share(m, torch.device("cpu")) == (0.0, False)  # (defaults are for CUDA)
    monkeypatch.setattr(mapped_share, "unavailable", lambda weights, device: "CUDA only")
    assert mapped_share.decode_share(m, cuda) == (0.0, False)
    m.settings.gpu_share = 0.5
    assert mapped_share.decode_share(m, cuda) == (0.5, False)
    m.settings.gpu_share = None
