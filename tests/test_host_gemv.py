"""The GPU's 4-bit expert GEMV that reads its weights from page-locked host memory (hybridmoe.experts.host_gemv)
against the streamed path's math (dequantized to bf16, times bf16 x, output rounded to bf16, + fp32 bias): in
Triton's interpreter on the CPU where Triton is installed (xgrammar brings it, CI included), on CUDA with the weights in
page-locked host memory (the GPU host, `pytest -m gpu`)."""

import importlib.util

import pytest
import torch

from .helpers import run_in_triton_interpreter

CASES = """
import torch
from hybridmoe.experts import host_gemv
from hybridmoe.experts.packed import PackedFormat, dequantize_packed_torch, quantize_int4, quantize_mxfp4

def reference(x, ids, slot0, codes, scales, bias, fmt, n):
    out = []
    for s in range(n):
        e = int(ids[slot0 + s])
        w = dequantize_packed_torch(codes[e].cpu(), scales[e].cpu(), fmt, torch.bfloat16).float()
        xs = x[s if x.shape[0] > 1 else 0].cpu().float()
        y = (w @ xs).to(torch.bfloat16).float()
        out.append(torch.stack([y, y if bias is None else y + bias[e].cpu()]))
    return torch.stack(out, 1)  # [2, n, rows]: before the bias, after

def check(device, pin):
    g = torch.Generator().manual_seed(0)
    # 5 experts, 40 rows (not a multiple of every tiling's rows), 960 inputs (30 groups of 32, 15 of 64: the last
    # step of the default tiling is partly masked)
    w = torch.randn(5, 40, 960, generator=g) * 0.02
    ids = torch.tensor([3, 0, 4, 1], dtype=torch.int64, device=device)
    worst = 0.0
    for kind, group, (codes, scales) in (("mxfp4", 32, quantize_mxfp4(w)), ("int4", 64, quantize_int4(w, 64)),
                                         ("int4", 32, quantize_int4(w, 32))):
        fmt = PackedFormat(kind, group)
        bias = torch.randn(5, 40, generator=g)
        for b in (None, bias):
            host = [t.contiguous() for t in ((codes, scales) if b is None else (codes, scales, b))]
            if pin:
                host = [t.pin_memory() for t in host]
            elif device != "cpu":
                host = [t.to(device) for t in host]
            c, s = host[0], host[1]
            bb = host[2] if b is not None else None
            for rows_x, slot0, n in ((1, 2, 2), (3, 1, 3)):
                x = (torch.randn(rows_x, 960, generator=g)).to(torch.bfloat16).to(device)
                out = torch.empty(n, 40, dtype=torch.float32, device=device)
                host_gemv.gemv4(x, ids, slot0, c, s, bb, kind, group, out)
                pre, ref = reference(x, ids.cpu(), slot0, codes, scales, b, fmt, n)
                # fp32 sums in another order, then rounded to bf16: a unit of bf16's last place apart at most (2^-7
                # of the sum before the bias, when the two sums straddle a rounding boundary), plus the sums' own
                # fp32 difference where an output nearly cancels (1e-4 of the largest output)
                diff = (out.cpu() - ref).abs()
                assert (diff <= 2 ** -7 * pre.abs() + 1e-4 * pre.abs().max()).all(), (kind, group, b is None, rows_x)
                worst = max(worst, (diff / pre.abs().max()).max().item())
    # the e8m0 exponents at their edges (0: the subnormal 2^-127) against their bf16 values
    from hybridmoe.experts.packed import mxfp4_scales
    codes = torch.randint(0, 256, (2, 8, 64), generator=g, dtype=torch.uint8)
    exps = torch.tensor([0, 1, 126, 127, 128, 130, 133, 127], dtype=torch.uint8)[None, :, None].repeat(2, 1, 4)
    x = torch.randn(1, 128, generator=g).to(torch.bfloat16).to(device)
    one = torch.tensor([1, 0], dtype=torch.int64, device=device)
    a = torch.empty(2, 8, dtype=torch.float32, device=device)
    b2 = torch.empty(2, 8, dtype=torch.float32, device=device)
    host_gemv.gemv4(x, one, 0, codes.to(device), exps.to(device), None, "mxfp4", 32, a)
    host_gemv.gemv4(x, one, 0, codes.to(device), mxfp4_scales(exps).to(device), None, "mxfp4", 32, b2)
    assert torch.equal(a, b2)
    return worst
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_host_gemv_in_interpreter():
    """CPU tensors through Triton's interpreter (read when the kernel is defined: a child process)."""
    run_in_triton_interpreter(CASES + "\nprint('worst', check('cpu', False))\nprint('ok')\n")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pin", [True, False], ids=["host", "device"])
def test_host_gemv_on_cuda(pin):
    scope: dict = {}
    exec(CASES, scope)
    scope["check"]("cuda", pin)


def test_host_gemv_refuses_what_it_does_not_compute():
    from hybridmoe.experts import host_gemv

    if not host_gemv.available():
        pytest.skip("Triton is not installed")
    codes = torch.zeros(1, 4, 32, dtype=torch.uint8)
    scales = torch.zeros(1, 4, 2, dtype=torch.bfloat16)
    ids = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="x bf16"):
        host_gemv.gemv4(torch.zeros(1, 64), ids, 0, codes, scales, None, "int4", 32, torch.empty(1, 4))
    with pytest.raises(ValueError, match="contiguous"):
        host_gemv.gemv4(torch.zeros(1, 64, dtype=torch.bfloat16), ids, 0, codes[:, ::2], scales[:, ::2], None,
                        "int4", 32, torch.empty(1, 2))
