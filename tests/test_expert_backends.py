"""Every expert backend against the one reference formula (hybridmoe.experts.formula.reference_moe), for every
expert variant transformers has: the SiLU-GLU of most models, gpt-oss (biases, interleaved gate/up, clamped SwiGLU
with (up + 1)), DeepSeek-V4 (clamped SiLU-GLU), and Nemotron-H (non-gated relu²).

The variants' gate functions are transformers' own (each block's ``_apply_gate``), so "the reference" is the math
transformers computes. Backends: the per-expert CPU loop (fp32 and bf16 weights), int8 weights, the grouped GEMMs of
the streamed path (run on the CPU here, on CUDA with -m gpu), and the compiled CPU kernel (for the variant it
implements). Outputs and the gradients w.r.t. the hidden states, routing weights and both LoRA factors are compared.

Tolerance table (‖Δ‖/‖ref‖, reference in fp32 on the same stored weights):
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from hybridmoe.experts import ExpertsSpec, HybridExperts, cpu_kernel
from hybridmoe.experts.formula import ExpertMLP, reference_moe
from hybridmoe.experts.streaming import enable_streaming

from .conftest import DEVICES

# The CPU loop computes activations in fp32 (only the GEMM inputs are rounded to bf16); the grouped GEMMs keep bf16
# activations between the GEMMs, transformers' own bf16 precision, so their budget is larger.
TOLERANCE = {
    ("cpu-loop", torch.float32): 1e-5, ("cpu-loop", torch.bfloat16): 2e-2, ("cpu-loop", torch.int8): 2e-2,
    ("grouped", torch.float32): 1e-5, ("grouped", torch.bfloat16): 5e-2, ("grouped", torch.int8): 5e-2,
}
__doc__ += "".join(f"    {b:9s} {str(d).replace('torch.', ''):9s} {v:g}\n" for (b, d), v in TOLERANCE.items())

E, H, I = 6, 24, 16  # noqa: E741 - experts, hidden, intermediate (multiples of 8: grouped GEMMs need 16-byte rows)


def _block(variant: str):
    """A transformers experts block of the variant, on the meta device (only its layout flags and gate are used).
    Clamp limits sit in the tails of the test activations (std ~2): rounding must not move values across a clamp,
    where the gradient jumps between 0 and 1 (fp32 runs still cross it and match exactly)."""
    from transformers import AutoModelForCausalLM

    kw = {"gpt_oss": dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, head_dim=8),
          "deepseek_v4": dict(moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2, head_dim=16,
                              qk_rope_head_dim=8, q_lora_rank=16, swiglu_limit=6.0),
          "nemotron_h": dict(moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=2, n_shared_experts=1,
                             layers_block_type=["moe"], num_hidden_layers=1, head_dim=8, mamba_num_heads=4,
                             mamba_head_dim=8, ssm_state_size=8, n_groups=1),
          "qwen3_moe": dict(moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2, head_dim=8)}[variant]
    cfg = AutoConfig.for_model(variant, vocab_size=64, hidden_size=H, num_hidden_layers=kw.pop("num_hidden_layers", 1),
                               num_attention_heads=4, num_key_value_heads=2, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    from hybridmoe.experts import find_fused_experts

    return find_fused_experts(model)[0]


VARIANTS = ["qwen3_moe", "gpt_oss", "deepseek_v4", "nemotron_h"]


def _module(variant: str, dtype: torch.dtype, seed: int = 0) -> HybridExperts:
    from hybridmoe.experts import experts_spec

    name, block = _block(variant)
    spec = experts_spec(name, block)
    m = HybridExperts(spec, ExpertMLP.from_block(block, spec.gated), dtype)
    g = torch.Generator().manual_seed(seed)
    for p in ("gate_up_proj", "down_proj"):
        m.weights.write(p, torch.randn(spec.shape(p), generator=g) * 0.4)
        if m.weights.bias is not None:
            m.weights.write_bias(p, torch.randn(spec.shape(p)[:2], generator=g) * 0.4)
    for proj, r in (("gate_up_proj", 3), ("down_proj", 2)):
        lo = m.add_lora(proj, rank=r, alpha=2.0 * r)
        lo.A.copy_(torch.randn(lo.A.shape, generator=g) * 0.3)
        lo.B.copy_(torch.randn(lo.B.shape, generator=g) * 0.3)
        lo.requires_grad_(True)
    return m


def _reference(m: HybridExperts, x, ids, w):
    wt = m.weights
    bias = wt.bias or {}
    lora = {p: (lo.A, lo.B, lo.scale) for p, lo in m.lora.items()}
    return reference_moe(x, ids, w, wt.dequantized("gate_up_proj").float(), wt.dequantized("down_proj").float(),
                         m.mlp, bias.get("gate_up_proj"), bias.get("down_proj"), lora)


def _inputs(t: int, k: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)])
    return x, ids, torch.rand(t, k, generator=g)


def _run(fn, m: HybridExperts, x, ids, w, g_out):
    """(out, d/dx, d/dw, d/dA and d/dB of both LoRAs) of one call."""
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    for lo in m.lora.values():
        lo.A.grad = lo.B.grad = None
    out = fn(x, ids, w)
    out.backward(g_out)
    grads = [x.grad, w.grad] + [t.grad.clone() for lo in m.lora.values() for t in (lo.A, lo.B)]
    return [out.detach().float()] + grads


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("backend", ["cpu-loop", "grouped"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_backend_matches_reference(variant, dtype, backend, tokens):
    if backend == "grouped" and dtype == torch.int8 and tokens == 1:
        pytest.skip("covered by tokens=9")
    m = _module(variant, dtype)
    if backend == "grouped":
        enable_streaming(m, "cpu", 1)  # every call on the streamed path; on the CPU the slots are host copies
    x, ids, w = _inputs(tokens)
    g_out = torch.randn(tokens, H, generator=torch.Generator().manual_seed(7))
    got = _run(lambda x, i, w: m(x, i, w), m, x, ids, w, g_out)
    want = _run(lambda x, i, w: _reference(m, x, i, w), m, x, ids, w, g_out)
    tol = TOLERANCE[backend, dtype]
    names = ["out", "d_hidden", "d_weights", "d_A_gate_up", "d_B_gate_up", "d_A_down", "d_B_down"]
    for name, a, b in zip(names, got, want):
        assert _rel(a, b) <= tol, (name, _rel(a, b), tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_paths_match_reference(variant):
    """No-grad CPU inference (the compiled kernel where it runs this variant, else the loop) and infer_cpu (graph
    decode's entry) against the reference."""
    m = _module(variant, torch.bfloat16)
    x, ids, w = _inputs(4)
    with torch.no_grad():
        want = _reference(m, x, ids, w)
        got = m(x, ids, w)
        out = torch.empty(4, H)
        m.infer_cpu(x, ids, w, out)
    assert _rel(got, want) <= TOLERANCE["cpu-loop", torch.bfloat16] and _rel(out, want) <= TOLERANCE["cpu-loop", torch.bfloat16]
    # The compiled kernel runs exactly the variants it implements (SiLU-GLU; gpt-oss's clamped SwiGLU on interleaved
    # rows with biases) and no other; where it runs, it equals the torch loop to summation order.
    assert cpu_kernel.supports(m) == (cpu_kernel.available() and variant in ("qwen3_moe", "gpt_oss"))
    if cpu_kernel.supports(m):
        for dtype in (torch.bfloat16, torch.int8):
            m = _module(variant, dtype)
            kernel, loop = torch.empty(4, H), torch.empty(4, H)
            m.infer_cpu(x, ids, w, kernel)
            m.settings.cpu_kernel = False
            m.infer_cpu(x, ids, w, loop)
            # int8 at these sizes (not multiples of 64): the torch loop rounds the dequantized weights to bf16
            assert _rel(kernel, loop) <= (2e-3 if dtype == torch.bfloat16 else 1e-2), dtype


def test_dense_dispatch_equals_top_k():
    """Llama-4's dense dispatch ([E·T, H] rows, unselected zero, routing weight folded into the input) gives each
    selected copy's expert output and zero elsewhere: the same numbers as the top-k call with K=1."""
    spec = ExpertsSpec(E, H, I, dispatch="dense")
    m = HybridExperts(spec, torch.nn.SiLU(), torch.float32)
    g = torch.Generator().manual_seed(0)
    m.weights.write("gate_up_proj", torch.randn(spec.shape("gate_up_proj"), generator=g))
    m.weights.write("down_proj", torch.randn(spec.shape("down_proj"), generator=g))
    x, ids, w = _inputs(5)
    routed = torch.zeros(E, 5, H)
    for t in range(5):
        for k in range(2):
            routed[ids[t, k], t] = x[t] * w[t, k]
    out = m(routed.view(-1, H)).view(E, 5, H)
    for t in range(5):
        for e in range(E):
            picked = (ids[t] == e).nonzero()
            want = (_reference(m, (x[t] * w[t, picked[0, 0]])[None], torch.tensor([[e]]), torch.ones(1, 1))[0]
                    if len(picked) else torch.zeros(H))
            assert torch.allclose(out[e, t], want, atol=1e-5), (e, t)


@DEVICES
def test_grouped_backend_on_device(device):
    """The grouped GEMMs on the model device (CUDA on the GPU host) against the reference, gpt-oss variant."""
    m = _module("gpt_oss", torch.bfloat16)
    enable_streaming(m, device, 1)
    x, ids, w = _inputs(12)
    with torch.no_grad():
        got = m(x.to(device), ids.to(device), w.to(device)).cpu()
        want = _reference(m, x, ids, w)
    assert _rel(got, want) <= TOLERANCE["grouped", torch.bfloat16]
