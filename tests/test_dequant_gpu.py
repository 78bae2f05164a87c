"""The Triton dequantization of 4-bit experts (hybridmoe.experts.dequant_gpu) against the torch version, bit for bit:
on CUDA (the GPU host), and through Triton's interpreter on the CPU where Triton is installed (xgrammar brings it, CI included)."""

import importlib.util

import pytest
import torch

from hybridmoe.experts.packed import (
    PackedFormat,
    dequantize_packed,
    dequantize_packed_torch,
    quantize_int4,
    quantize_mxfp4,
)

from .helpers import run_in_triton_interpreter

CASES = """
import torch
from hybridmoe.experts import dequant_gpu
from hybridmoe.experts.packed import (PackedFormat, dequantize_packed_torch, mxfp4_scales, quantize_int4,
                                     quantize_mxfp4)

def cases(device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 256, generator=g) * 0.02
    out = [("int4", 64) + quantize_int4(w, 64), ("int4", 128) + quantize_int4(w, 128),
           ("mxfp4", 32) + quantize_mxfp4(w)]
    # every byte (two codes) under normal, large and subnormal scales; an odd number of rows
    codes = torch.arange(256, dtype=torch.uint8).repeat(5, 1)  # [5, 256]: 512 inputs
    scales = torch.tensor([1.0, 0.5, 3.0, 2.0 ** -127, 2.0 ** 100], dtype=torch.bfloat16)
    scales = scales.repeat_interleave(16).view(5, 16)
    out += [(kind, 32, codes, scales) for kind in ("int4", "mxfp4")]
    # MXFP4's scales as stored: e8m0 exponents (0 is the subnormal 2^-127; 255, e8m0's NaN, left out: 0 x inf is a
    # NaN whose sign bit differs between the two), against their bf16 values below
    exps = torch.tensor([0, 1, 126, 127, 128, 200, 253, 254], dtype=torch.uint8).repeat(5, 2)  # [5, 16]
    out += [("mxfp4", 32, codes, exps)]
    return [(k, grp, c.to(device), s.to(device)) for k, grp, c, s in out]

def check(device):
    for kind, group, codes, scales in cases(device):
        ref = dequantize_packed_torch(codes, scales, PackedFormat(kind, group), torch.bfloat16)
        got = dequant_gpu.dequantize_bf16(codes, scales, kind, group)
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), ref.view(torch.int16)), (kind, group)
        if scales.dtype == torch.uint8:  # the exponents mean their bf16 powers of two, bit for bit
            as_bf16 = dequant_gpu.dequantize_bf16(codes, mxfp4_scales(scales), kind, group)
            assert torch.equal(got.view(torch.int16), as_bf16.view(torch.int16)), "e8m0"
    # a slice of rows of every expert (read in place: Dequantized's parts), and a 2-D matrix
    for kind, group, codes, scales in cases(device)[:3]:
        fmt = PackedFormat(kind, group)
        part = dequant_gpu.dequantize_bf16(codes[:, 8:24], scales[:, 8:24], kind, group)
        whole = dequantize_packed_torch(codes, scales, fmt, torch.bfloat16)
        assert torch.equal(part.view(torch.int16), whole[:, 8:24].view(torch.int16)), (kind, group, "rows")
        one = dequant_gpu.dequantize_bf16(codes[1], scales[1], kind, group)
        assert torch.equal(one.view(torch.int16), whole[1].view(torch.int16)), (kind, group, "2-D")
    empty = torch.empty(0, 4, 16, dtype=torch.uint8, device=device)
    assert dequant_gpu.dequantize_bf16(empty, torch.empty(0, 4, 1, dtype=torch.bfloat16, device=device),
                                      "int4", 32).shape == (0, 4, 32)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_dequant_bitwise_on_cuda():
    from hybridmoe.experts import dequant_gpu

    assert dequant_gpu.available(torch.empty(1, dtype=torch.uint8, device="cuda"), torch.bfloat16)
    scope: dict = {}
    exec(CASES, scope)
    scope["check"]("cuda")
    # dequantize_packed routes CUDA bf16 there, and fp32 (exact) to torch
    for kind, group, codes, scales in scope["cases"]("cuda"):
        fmt = PackedFormat(kind, group)
        assert torch.equal(dequantize_packed(codes, scales, fmt, torch.bfloat16).view(torch.int16),
                           dequantize_packed_torch(codes, scales, fmt, torch.bfloat16).view(torch.int16))
        assert torch.equal(dequantize_packed(codes, scales, fmt), dequantize_packed_torch(codes, scales, fmt))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_dequant_bitwise_in_interpreter():
    """The same kernel run by Triton's interpreter on CPU tensors (TRITON_INTERPRET is read when the kernel is
    defined, so in a child process)."""
    run_in_triton_interpreter(CASES + "\ncheck('cpu')\nprint('ok')\n", timeout=300)


def test_dequantize_packed_on_cpu_is_the_torch_version():
    w = torch.randn(2, 8, 64) * 0.02
    for fmt, (codes, scales) in ((PackedFormat("int4", 32), quantize_int4(w, 32)),
                                 (PackedFormat("mxfp4", 32), quantize_mxfp4(w))):
        for dt in (torch.bfloat16, torch.float32):
            want = dequantize_packed_torch(codes, scales, fmt, dt)
            assert torch.equal(dequantize_packed(codes, scales, fmt, dt), want)
