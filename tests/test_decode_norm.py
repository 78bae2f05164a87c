"""The fused RMSNorm of decode steps (hybridmoe.decode_norm): the kernel against transformers' RMSNorm modules, in
Triton's interpreter on the CPU (where Triton is installed) and on CUDA (`pytest -m gpu`), and graph decode with it
against graph decode without it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hybridmoe import decode_norm

from .helpers import run_in_triton_interpreter

# Run in a child process (TRITON_INTERPRET is read when a kernel is defined) and on CUDA: every formula transformers'
# MoE models use, on bf16 and fp32 rows of several widths (a power of two, not one, gpt-oss's 2880), strided rows and
# [B, 1, H] inputs; Gemma's and Qwen3-Next's 1 + weight norms must be refused.
CASES = r'''
import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

from hybridmoe import decode_norm as dn

WANT = {DeepseekV2RMSNorm: "cast_first", MixtralRMSNorm: "cast_first", Qwen3MoeRMSNorm: "cast_first",
        GptOssRMSNorm: "scale_first", GemmaRMSNorm: None, Qwen3NextRMSNorm: None}


def check(device):
    torch.manual_seed(0)
    for cls, want in WANT.items():
        for n in (64, 96, 2880):
            for dtype in (torch.bfloat16, torch.float32):
                m = cls(n, eps=1e-6).to(device, dtype)
                with torch.no_grad():
                    m.weight.normal_(0.5, 0.3)  # not all ones: the formulas differ in the weight's rounding
                found = dn._formula_of(m, dtype)
                got = found and found[0]
                if dtype == torch.float32 and want is not None:
                    assert got is not None, (cls, n)  # in fp32 both formulas are one (the first is found)
                else:
                    assert got == want, (cls, n, dtype, got)
                if got is None:
                    continue
                fwd = dn._forward(m, *found, dtype)
                x = torch.randn(8, 2 * n, device=device).to(dtype)[:, ::2]  # strided columns: made contiguous
                assert dn._agrees(fwd(x), m(x)), (cls, n, dtype)
                x = torch.randn(3, 1, n, device=device).to(dtype)  # the decode step's [B, 1, H]
                y = fwd(x)
                assert y.shape == x.shape and dn._agrees(y, m(x)), (cls, n, dtype)
                other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
                x = torch.randn(2, n, device=device).to(other)
                assert torch.equal(fwd(x), m(x))  # another dtype than checked: the module's own forward
        # fp32 weights (gpt-oss keeps its norms in fp32) on bf16 rows: the output dtype is the module's (gpt-oss:
        # bf16; Llama's formula: fp32), so the next layer takes it
        m = cls(96, eps=1e-6).to(device, torch.float32)
        with torch.no_grad():
            m.weight.normal_(0.5, 0.3)
        found = dn._formula_of(m, torch.bfloat16)
        if found is not None:
            x = torch.randn(4, 96, device=device).to(torch.bfloat16)
            y, want_y = dn._forward(m, *found, torch.bfloat16)(x), m(x)
            assert y.dtype == want_y.dtype and dn._agrees(y, want_y), (cls, found)
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_fused_norm_formulas_in_interpreter():
    run_in_triton_interpreter(CASES + "\ncheck('cpu')\nprint('ok')\n")


def test_agreement_allows_one_unit_in_few_places_only():
    a = torch.linspace(-3, 3, 1000).to(torch.bfloat16)
    assert decode_norm._agrees(a.clone(), a)
    one = a.view(torch.int16).clone()
    one[7] += 1  # one value one unit off
    assert decode_norm._agrees(one.view(torch.bfloat16), a)
    two = one.clone()
    two[9] += 2  # two units
    assert not decode_norm._agrees(two.view(torch.bfloat16), a)
    many = a.view(torch.int16) + 1  # every value one unit off
    assert not decode_norm._agrees(many.view(torch.bfloat16), a)
    assert not decode_norm._agrees(a.float(), a)  # another dtype
    nan = a.clone()
    nan[0] = float("nan")
    assert not decode_norm._agrees(nan, a)


def test_swapped_forwards_restore_an_instance_forward():
    """A forward set on the instance (a hook's, a test's) is back after the block, and a plain module has none."""
    plain, hooked = torch.nn.Identity(), torch.nn.Identity()
    own = lambda x: x + 1  # noqa: E731
    hooked.forward = own
    with decode_norm.swapped_forwards([(plain, lambda x: x * 2), (hooked, lambda x: x * 3)]):
        assert plain(torch.ones(1)).item() == 2 and hooked(torch.ones(1)).item() == 3
    assert "forward" not in vars(plain) and hooked.forward is own


def test_no_fused_norms_on_a_cpu_model():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    model = torch.nn.Sequential(DeepseekV2RMSNorm(64), DeepseekV2RMSNorm(64))
    assert decode_norm.fused_norm_pairs(model, torch.float32) == []


@pytest.mark.gpu
def test_fused_norm_formulas_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    scope: dict = {}
    exec(CASES, scope)
    scope["check"]("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe", "mixtral"])
def test_bf16_graph_decode_with_fused_norms(arch, ckpt_dir, monkeypatch):
    """bf16 graph decode with every RMSNorm fused gives the logits of graph decode without (the same tokens fed:
    teacher-forced; the sums of squares in another order may move a norm's value by one unit, rarely)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    import hybridmoe
    from hybridmoe.decode_graph import StaticDecoder

    model, _ = hybridmoe.load(ckpt_dir(arch), device="cuda", dtype="bfloat16", progress=False)
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    prompt = torch.arange(5, 25, device="cuda").unsqueeze(0)  # [1, 20]
    runs, tokens = {}, []
    for fused in (False, True):
        monkeypatch.setattr(decode_norm, "ENABLED", fused)
        dec = StaticDecoder(model, 64, torch.device("cuda"))
        logits = [dec.prefill(prompt)]
        for i, pos in enumerate(range(20, 28)):  # step 1 eager, step 2 captures, the rest replay
            if not fused:
                tokens.append(logits[-1].argmax(-1))
            logits.append(dec.step(tokens[i], pos))
        assert dec.mode == "cuda_graphs"
        assert len(dec.chain.fused) == (len(norms) if fused else 0)  # every norm of these models
        runs[fused] = torch.stack(logits).float()
        dec.close()
    rel = ((runs[True] - runs[False]).norm() / runs[False].norm()).item()
    assert rel < 1e-2, rel


def test_info_says_whether_decode_norms_are_fused(ckpt_dir):
    """`hybridmoe info`'s line: on the CPU the modules' own norms, and why."""
    import hybridmoe
    from hybridmoe.placement import format_report, placement_report

    model, _ = hybridmoe.load(ckpt_dir("deepseek_v2"), device="cpu", dtype="float32", progress=False)
    rep = placement_report(model)
    norms = sum("RMSNorm" in type(m).__name__ for m in model.modules())
    assert rep["decode_norms"] == {"norms": norms, "fused": 0, "why": "CUDA only"} and norms > 0
    assert "decode norms: the modules' own (CUDA only)" in format_report(rep)


@pytest.mark.gpu
def test_info_counts_the_fused_norms_on_cuda(ckpt_dir):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    import hybridmoe
    from hybridmoe.placement import placement_report

    model, _ = hybridmoe.load(ckpt_dir("deepseek_v2"), device="cuda", dtype="bfloat16", progress=False)
    rep = placement_report(model)["decode_norms"]
    assert rep["why"] is None and rep["fused"] == rep["norms"] > 0
