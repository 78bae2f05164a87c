"""The compiled CPU expert kernel (moe_cpu.c) against the torch CPU path it replaces in inference, and against fp32
math.

The kernel rounds where the torch path rounds (bf16 GEMM inputs and outputs, int8 per-row scales), so the two agree
to fp32 summation order: fp32 weights ‖Δ‖/‖ref‖ ≤ 1e-5; bf16 and int8 ≤ 2e-3 (a rounding step can land on the other
side of a bf16 tie when the sum order changes; that is one bf16 ulp, 2^-8, on a few values). Odd sizes (H=40, I=24)
cover the masked tails of the vector loops; batches with repeated experts cover the grouped rows. For int8 at sizes
that are not multiples of 64 the torch path dequantizes to bf16 (see ``_int8pack_ok``): there 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridmoe.experts import ExpertsSpec, HybridExperts, cpu_kernel

from .helpers import silu_experts

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason=f"CPU kernel: {cpu_kernel.status()}")


@pytest.fixture(params=["avx512_bf16", "avx2"], autouse=True)
def isa(request):
    """Every test once per instruction set this CPU has (CI's CPU: AVX2; the GPU host's Xeon: both)."""
    if "subprocess" in request.node.keywords and request.param != cpu_kernel.isa():
        pytest.skip("runs once, in a fresh process")
    if request.param not in cpu_kernel.isas():
        pytest.skip(f"this CPU has no {request.param}")
    old = cpu_kernel.set_isa(request.param)
    yield request.param
    cpu_kernel.set_isa(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _inputs(t, e, h, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    return x, ids, torch.rand(t, k, generator=g)


def _both(m, x, ids, w):
    """(kernel output, torch-loop output), both [T, H] fp32."""
    outs = []
    for flag in (True, False):
        m.settings.cpu_kernel = flag  # the model's setting, read at each call
        out = torch.empty(x.shape)
        m.infer_cpu(x, ids, w, out)
        outs.append(out)
    m.settings.cpu_kernel = True
    return outs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3), (torch.int8, 2e-3)])
@pytest.mark.parametrize("shape", [(8, 40, 24), (16, 64, 32), (8, 64, 64)])
@pytest.mark.parametrize("t,k", [(1, 2), (1, 6), (5, 3), (32, 4)])
@pytest.mark.parametrize("lora", [True, False])
def test_kernel_matches_torch_path(dtype, tol, shape, t, k, lora):
    e, h, i = shape
    m = silu_experts(e, h, i, dtype, lora)
    x, ids, w = _inputs(t, e, h, k)
    got, ref = _both(m, x, ids, w)
    if dtype == torch.int8 and (h % 64 or i % 64):
        tol = 1e-2  # the torch path's int8 fallback for such shapes rounds the dequantized weights to bf16
    assert _rel(got, ref) <= tol


def test_kernel_against_fp32_math():
    """bf16 weights, no LoRA: the kernel against fp32 math on the same (rounded) weights, at V2-Lite's widths."""
    e, h, i, k = 8, 2048, 1408, 6
    m = silu_experts(e, h, i, torch.bfloat16, lora=False)
    x, ids, w = _inputs(3, e, h, k)
    ref = torch.zeros(3, h)
    for t in range(3):
        for j in range(k):
            ex = int(ids[t, j])
            g, u = (m.weights.gate_up[ex].float() @ x[t]).chunk(2)
            ref[t] += w[t, j] * (m.weights.down[ex].float() @ (nn.functional.silu(g) * u))
    out = torch.empty(3, h)
    m.infer_cpu(x, ids, w, out)
    assert _rel(out, ref) <= 1e-2  # bf16 rounding of x, gate/up, h and the outputs


def test_inference_forward_uses_kernel_and_matches_autograd_path():
    """Under no_grad the module's forward runs the kernel; with grad it runs the autograd path; same values."""
    m = silu_experts(8, 40, 24, torch.float32)
    x, ids, w = _inputs(4, 8, 40, 2)
    with torch.no_grad():
        fast = m(x, ids, w)
    slow = m(x, ids, w).detach()
    assert _rel(fast, slow) <= 1e-5


def test_nan_propagates():
    m = silu_experts(8, 40, 24, torch.bfloat16)
    m.lora["down_proj"].B[3].fill_(float("nan"))
    x, _, w = _inputs(1, 8, 40, 2)
    out = torch.empty(1, 40)
    m.infer_cpu(x, torch.tensor([[3, 1]]), w, out)
    assert torch.isnan(out).all()


def test_stats_count_the_calls_and_split_their_time():
    """cpu_kernel.stats(): the calls since the last reset, time before and in the two parallel regions, and the
    threads' busy fraction of each (in (0, 1]); reset zeroes them."""
    m = silu_experts(8, 64, 32, torch.bfloat16)
    x, ids, w = _inputs(3, 8, 64, 2)
    cpu_kernel.stats(reset=True)
    for _ in range(5):
        m.infer_cpu(x, ids, w, torch.empty(x.shape))
    st = cpu_kernel.stats()
    assert st["calls"] == 5 and st["kernel_threads"] == torch.get_num_threads()
    assert all(st[k] > 0 for k in ("prep_us", "region1_us", "region2_us"))
    assert 0 < st["busy1"] <= 1.0 and 0 < st["busy2"] <= 1.0
    assert cpu_kernel.stats(reset=True)["calls"] == 5 and cpu_kernel.stats()["calls"] == 0


def test_read_all_reads_every_128_byte_block():
    """The bandwidth probe's checksum: per 128-byte block the xor of its four 32-byte vectors, lanes 0 and 3 of that
    folded into the total (a tail of less than 128 bytes is not read)."""
    t = torch.randint(0, 256, (128 * 1000 + 77,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    u = t[: 128 * 1000].view(torch.int64).view(1000, 16)
    want = 0
    for col in (0, 4, 8, 12, 3, 7, 11, 15):
        for v in u[:, col].tolist():
            want ^= v & (2**64 - 1)
    assert cpu_kernel.read_all(t) == want
    with pytest.raises(ValueError, match="contiguous CPU"):
        cpu_kernel.read_all(t[::2])


def test_bad_expert_id_is_an_error():
    m = silu_experts(8, 40, 24, torch.float32)
    x, _, w = _inputs(1, 8, 40, 2)
    with pytest.raises(ValueError, match="outside"):
        cpu_kernel.moe_forward(m, x, torch.tensor([[0, 8]]), w, torch.empty(1, 40))


def test_wrong_input_dtype_is_an_error():
    m = silu_experts(8, 40, 24, torch.float32)
    x, ids, w = _inputs(1, 8, 40, 2)
    with pytest.raises(ValueError, match="x must be"):
        cpu_kernel.moe_forward(m, x.bfloat16(), ids, w, torch.empty(1, 40))


def test_mismatched_shapes_are_an_error():
    m = silu_experts(8, 40, 24, torch.float32)
    x, ids, w = _inputs(2, 8, 40, 2)
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernel.moe_forward(m, x[:1], ids, w, torch.empty(2, 40))
    with pytest.raises(ValueError, match="shapes"):
        cpu_kernel.moe_forward(m, x, ids, w, torch.empty(2, 39))


def test_prepared_call_matches_and_refuses_changed_weights():
    """The prepared call (graph decode's cuts: checks and arguments made once) gives moe_forward's output on the
    buffers' new contents at every call, and refuses to run once the weights it points into were replaced."""
    m = silu_experts(8, 40, 24, torch.bfloat16, lora=False, bias=True)
    x, ids, w = _inputs(1, 8, 40, 3)
    out = torch.empty(1, 40)
    call = cpu_kernel.prepared(m, x, ids, w, out)
    for seed in (2, 3):  # new contents in the same buffers, as each decode step writes them
        x2, ids2, w2 = _inputs(1, 8, 40, 3, seed=seed)
        x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
        call()
        ref = torch.empty(1, 40)
        cpu_kernel.moe_forward(m, x, ids, w, ref)
        assert torch.equal(out, ref)
    m.weights.write_bias("down_proj", torch.zeros(8, 40))  # drops the fp32 bias copy the call points into
    with pytest.raises(RuntimeError, match="changed"):
        call()


def test_buffers_are_reused_across_sizes_and_calling_threads():
    """The kernel's per-call buffers come from an arena per calling thread, grown to the largest call and reused:
    calls of growing and shrinking sizes, and calls from four Python threads at once (ctypes lets go of the GIL),
    give bit for bit what each call gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    m = silu_experts(8, 64, 32, torch.bfloat16, lora=False, bias=False)
    cases = [_inputs(t, 8, 64, k, seed=t) for t, k in ((1, 2), (32, 4), (3, 6), (1, 1), (16, 8), (2, 3))]

    def run(case):
        x, ids, w = case
        out = torch.full(x.shape, float("nan"))  # every value written by the call
        cpu_kernel.moe_forward(m, x, ids, w, out)
        return out

    alone = [run(c) for c in cases]
    again = [run(c) for c in reversed(cases)][::-1]  # the arena now holds the largest; sizes shrink and grow
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, cases * 4))
    for i, want in enumerate(alone):
        assert torch.equal(again[i], want)
        assert all(torch.equal(threaded[i + j * len(cases)], want) for j in range(4))


def test_decode_cut_prepares_the_call_once_and_honours_the_setting():
    """Graph decode's cut calls the kernel through one prepared call per (rows, experts a row), reading its buffers'
    new contents each time, and still follows ``settings.cpu_kernel`` at every call (off: the torch loop)."""
    from hybridmoe.decode_graph import _Cut

    m = silu_experts(8, 40, 24, torch.bfloat16, lora=False)
    x, ids, w = _inputs(1, 8, 40, 3)
    cut = _Cut(m, x, ids, pin=False)
    for seed in (2, 3):
        x2, ids2, w2 = _inputs(1, 8, 40, 3, seed=seed)
        cut.x.copy_(x2), cut.ids.copy_(ids2), cut.w.copy_(w2)
        cut.compute(None, None)
        ref = torch.empty(1, 40)
        cpu_kernel.moe_forward(m, x2, ids2, w2, ref)
        assert torch.equal(cut.out, ref)
    assert list(cut._kernel) == [(1, 3)]
    m.settings.cpu_kernel = False
    cpu_kernel.stats(reset=True)
    cut.compute(None, None)
    assert cpu_kernel.stats()["calls"] == 0  # the torch loop ran
    loop = torch.empty(1, 40)
    m.infer_cpu(cut.x, cut.ids, cut.w, loop)
    assert torch.equal(cut.out, loop)
    m.settings.cpu_kernel = True


def test_prepared_call_refuses_expert_lora():
    m = silu_experts(8, 40, 24, torch.float32)
    x, ids, w = _inputs(1, 8, 40, 2)
    with pytest.raises(ValueError, match="LoRA"):
        cpu_kernel.prepared(m, x, ids, w, torch.empty(1, 40))


def test_large_batches_take_torch():
    m = silu_experts(8, 40, 24, torch.float32)
    assert cpu_kernel.supports(m, cpu_kernel.MAX_TOKENS)
    assert not cpu_kernel.supports(m, cpu_kernel.MAX_TOKENS + 1)


def test_non_silu_activation_falls_back():
    m = HybridExperts(ExpertsSpec(4, 16, 8), nn.GELU(), torch.float32)
    assert not cpu_kernel.supports(m)


def _in_subprocess(env: dict, code: str) -> str:
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


_FALLBACK = """
import torch
from torch import nn
from hybridmoe.experts import ExpertsSpec, HybridExperts, cpu_kernel
m = HybridExperts(ExpertsSpec(4, 16, 8), nn.SiLU(), torch.float32)
m.weights.write("gate_up_proj", torch.randn(4, 16, 16))
m.weights.write("down_proj", torch.randn(4, 16, 8))
out = torch.empty(1, 16)
m.infer_cpu(torch.randn(1, 16), torch.tensor([[0, 2]]), torch.rand(1, 2), out)
from hybridmoe.experts.backends import choose_backend
print(cpu_kernel.status(), bool(torch.isfinite(out).all()), m.settings.cpu_kernel, choose_backend(m, 1, grad=False))
"""


@pytest.mark.subprocess
def test_without_a_compiler_the_torch_path_runs(tmp_path):
    """A host without a C compiler (or with a broken one): the kernel is unavailable, says why, and inference still
    runs through torch; nothing half-built is left in the cache."""
    out = _in_subprocess({"CC": "false", "HYBRIDMOE_CACHE": str(tmp_path)}, _FALLBACK)
    assert out.startswith("unavailable: ") and out.endswith("True True cpu"), out
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.subprocess
def test_a_library_from_another_version_falls_back(tmp_path):
    """HYBRIDMOE_CPU_KERNEL_LIB naming a library built from another version of moe_cpu.c (a function missing): the
    kernel is unavailable, says so, and inference runs through torch."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src, lib = tmp_path / "old.c", tmp_path / "old.so"
    src.write_text("int hm_isa(void) { return 1; }\nint hm_set_isa(int l) { return l; }\n")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, timeout=120)
    out = _in_subprocess({"HYBRIDMOE_CPU_KERNEL_LIB": str(lib), "HYBRIDMOE_CACHE": str(tmp_path)}, _FALLBACK)
    assert out.startswith("unavailable: the library lacks a function") and out.endswith("True True cpu"), out


@pytest.mark.subprocess
def test_switched_off_by_environment(tmp_path):
    """HYBRIDMOE_CPU_KERNEL=0 is the default of every model's settings.cpu_kernel: the torch loop runs."""
    out = _in_subprocess({"HYBRIDMOE_CPU_KERNEL": "0", "HYBRIDMOE_CACHE": str(tmp_path)}, _FALLBACK)
    assert out == "ready True False cpu", out


@pytest.mark.subprocess
def test_built_once_into_the_cache(tmp_path):
    code = "from hybridmoe.experts import cpu_kernel; print(cpu_kernel.status())"
    assert _in_subprocess({"HYBRIDMOE_CACHE": str(tmp_path)}, code) == "ready"
    libs = list(tmp_path.rglob("moe_cpu-*.so"))
    assert len(libs) == 1
    mtime = libs[0].stat().st_mtime_ns
    assert _in_subprocess({"HYBRIDMOE_CACHE": str(tmp_path)}, code) == "ready"
    assert libs[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_expert_weights_ask_for_huge_pages():
    """Large CPU tensors ask Linux for 2 MiB pages (the loader does it before the experts' first write); small tensors
    and meta tensors are left alone."""
    from pathlib import Path

    from hybridmoe.experts.cpu_experts import advise_huge_pages

    if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():  # a kernel with THP: madvise accepts it
        assert advise_huge_pages(torch.empty(8 << 20, dtype=torch.uint8))
    assert not advise_huge_pages(torch.empty(1024))
    assert not advise_huge_pages(torch.empty(8 << 20, device="meta"))
