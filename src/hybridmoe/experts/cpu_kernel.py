"""The compiled CPU kernel for small batches of routed experts (decode): ``moe_cpu.c``, built on first use.

:func:`moe_forward` runs one MoE layer's selected experts for a few tokens in two OpenMP parallel regions (see the
header of ``moe_cpu.c``), instead of one torch call per expert and projection. It is used by
:meth:`HybridExperts.infer_cpu` (graph decode) and by the CPU path of inference forwards; the torch per-expert loop
stays as the fallback and as the path that trains (the kernel has no backward).

Building: the system C compiler (``$CC``, else ``cc``) compiles the source once per source version and compiler
into ``$HYBRIDMOE_CACHE`` (default ``~/.cache/hybridmoe``)/kernels/. The dot products use AVX-512 BF16 where the
CPU has it, else AVX2 + FMA (chosen at run time). A failed build or a CPU with neither leaves the torch path in
place, logged once at INFO. ``HYBRIDMOE_CPU_KERNEL=0`` turns the kernel off; ``HYBRIDMOE_CPU_KERNEL_LIB=/path/moe_cpu.so``
uses a library built elsewhere (a host without a compiler: it links only libc and libm, and picks its instruction
set at run time). ``HYBRIDMOE_CPU_PREFETCH`` (bytes), ``HYBRIDMOE_CPU_CHUNK`` (OpenMP work items per dynamic
chunk, 0 = static, -1 = guided) and ``HYBRIDMOE_CPU_ITEM_ROWS`` (weight rows per work item) override the measured
defaults, for benchmarks.

OpenMP: the library is linked without an OpenMP runtime. Before loading it, the runtime torch has already loaded
(libgomp, or libiomp5 which exports the same GOMP entry points) is made globally visible, so the kernel's parallel
regions use torch's thread pool and ``torch.set_num_threads``. Two runtimes in one process would each keep a pool
of spinning threads on the same cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["CHUNK", "ENV_ENABLED", "ITEM_ROWS", "MAX_TOKENS", "PREFETCH_BYTES", "available", "four_bit_dots", "isa",
           "isas", "moe_forward", "prepared", "read_all", "set_chunk", "set_isa", "set_item_rows", "set_prefetch",
           "stats", "status", "supports"]

_SOURCE = Path(__file__).with_name("moe_cpu.c")
_HEADER = Path(__file__).with_name("hm_common.h")  # included by every C source here
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.uint8: 3}  # uint8: 4-bit codes
# Software prefetch distance of the weight rows (bytes ahead; HYBRIDMOE_CPU_PREFETCH overrides), chosen by
# benchmarks/decode_gemv.py --prefetch (BENCHMARKS.md).
PREFETCH_BYTES = 4096
# The work split (HYBRIDMOE_CPU_CHUNK and HYBRIDMOE_CPU_ITEM_ROWS override): guided scheduling of 8-row work items,
# chosen by decode_gemv.py --chunk/--item-rows (BENCHMARKS.md, session 13: against dynamic chunks of 2 x 16 rows).
CHUNK = -1
ITEM_ROWS = 8
_lib: ctypes.CDLL | None = None
_tables: dict[str, torch.Tensor] = {}  # 4-bit value tables handed to the kernel, kept alive here
_state = "unloaded"  # "unloaded" -> "ready" | "unavailable: why"
# The default of ExpertSettings.cpu_kernel (per model: model.hybridmoe.settings.cpu_kernel turns it off for one model).
ENV_ENABLED = os.environ.get("HYBRIDMOE_CPU_KERNEL", "1") not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("HYBRIDMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hybridmoe")
    return Path(root) / "kernels"


def _openmp_runtime() -> str | None:
    """The path of the OpenMP runtime loaded in this process (torch's), from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if re.search(r"/lib(gomp|iomp5)[^/]*\.so", path):
            return path
    return None


def _build(source: Path = _SOURCE) -> Path:
    """Compile `source` (moe_cpu.c, or amx_gemm.c for :mod:`.amx`) once per source and compiler; the path of the
    shared library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(source.read_bytes() + _HEADER.read_bytes() + version.encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, renamed in: never half-written
        obj, lib = os.path.join(tmp, "lib.o"), os.path.join(tmp, "lib.so")
        for cmd in ([cc, "-O3", "-fPIC", "-fopenmp", "-c", str(source), "-o", obj],
                    [cc, "-shared", obj, "-o", lib, "-lm"]):  # no -lgomp: see the module docstring
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise RuntimeError(f"{' '.join(cmd[:2])} ... failed: {(r.stderr or r.stdout).strip()[:500]}")
        os.replace(lib, out)
    return out


def load_library(source: Path, prebuilt: str | None = None) -> ctypes.CDLL:
    """`source` compiled (:func:`_build`) or the library at `prebuilt`, loaded with torch's OpenMP runtime made
    globally visible first (the library's OpenMP symbols bind to it). Raises RuntimeError / OSError /
    SubprocessError when it cannot."""
    runtime = _openmp_runtime()
    if runtime is None:
        raise RuntimeError("torch has no OpenMP runtime loaded")
    ctypes.CDLL(runtime, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)  # already loaded: make its symbols global
    return ctypes.CDLL(prebuilt or str(_build(source)))


def _load() -> None:
    global _lib, _state
    if sys.platform != "linux":
        _state = "unavailable: only built on Linux"
        return
    try:
        lib = load_library(_SOURCE, os.environ.get("HYBRIDMOE_CPU_KERNEL_LIB"))
        for fn in (lib.hm_isa, lib.hm_set_isa, lib.hm_isa_in_use, lib.hm_q_vnni):
            fn.restype = ctypes.c_int
        if not lib.hm_set_isa(2):
            raise RuntimeError("this CPU has neither AVX2+FMA nor AVX-512")
        lib.hm_set_prefetch.argtypes = [ctypes.c_int64]
        lib.hm_set_chunk.argtypes = lib.hm_set_item_rows.argtypes = [ctypes.c_int]
        lib.hm_stats.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.hm_read.argtypes, lib.hm_read.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_uint64
        lib.hm_set_chunk(int(os.environ.get("HYBRIDMOE_CPU_CHUNK", CHUNK)))
        lib.hm_set_item_rows(int(os.environ.get("HYBRIDMOE_CPU_ITEM_ROWS", ITEM_ROWS)))
        lib.hm_set_prefetch(int(os.environ.get("HYBRIDMOE_CPU_PREFETCH", PREFETCH_BYTES)))
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        lib.hm_moe_forward.restype = lib.hm_moe_forward_packed.restype = ctypes.c_int
        lib.hm_moe_forward_packed.argtypes = [p, p]
        lib.hm_moe_forward.argtypes = [i64, i64, i64, i64, i64, p, p, p, ctypes.c_int, p, p, p, p, p, i64,
                                       ctypes.c_int, ctypes.c_int, f32, f32, p, p,
                                       i64, p, p, f32, i64, p, p, f32, p, ctypes.c_int, ctypes.c_int]
        _lib, _state = lib, "ready"
    except AttributeError as e:  # HYBRIDMOE_CPU_KERNEL_LIB built from another version of moe_cpu.c
        _state = f"unavailable: the library lacks a function this version calls ({e})"
        log.info("CPU expert kernel %s; the routed experts run through torch on the CPU", _state)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        _state = f"unavailable: {e}"
        log.info("CPU expert kernel %s; the routed experts run through torch on the CPU", _state)


ISAS = {2: "avx512_bf16", 1: "avx2"}


def isa() -> str | None:
    """The instruction set the kernel's dot products use ("avx512_bf16" or "avx2"); None if it is not loaded."""
    return ISAS.get(_lib.hm_isa_in_use()) if available() else None


def four_bit_dots() -> str | None:
    """The instructions of the 4-bit experts' integer dot products: "avx512_vnni" where the CPU has AVX-512 VNNI
    (with or without BF16) and no lower set was asked for (:func:`set_isa`), else "avx2"; None if the kernel is not
    loaded."""
    if not available():
        return None
    return "avx512_vnni" if _lib.hm_q_vnni() else "avx2"


def set_prefetch(nbytes: int) -> None:
    """Software-prefetch the weight rows this many bytes ahead of the loads (0: off; default PREFETCH_BYTES)."""
    if available():
        _lib.hm_set_prefetch(int(nbytes))


def set_chunk(items: int) -> None:
    """OpenMP work items per dynamic chunk (0: static scheduling, -1: guided; default CHUNK)."""
    if available():
        _lib.hm_set_chunk(int(items))


def set_item_rows(rows: int) -> None:
    """Weight rows per work item (a multiple of 4 in [4, 128]; default ITEM_ROWS)."""
    if available():
        _lib.hm_set_item_rows(int(rows))


_STAT_KEYS = ("calls", "prep_ns", "region1_ns", "region2_ns", "busy1_ns", "busy2_ns", "threads")


def stats(reset: bool = False) -> dict[str, float]:
    """Where the kernel's calls spent their time since the last reset (empty if it is not loaded): calls; per call,
    microseconds before the two parallel regions (``prep_us``) and in each (``region1_us``, ``region2_us``); and
    ``busy1``/``busy2``, the fraction of each region its threads spent in work items (the rest: the fork, the
    barriers, imbalance). ``reset`` zeroes the counters after reading them."""
    if not available():
        return {}
    raw = (ctypes.c_int64 * len(_STAT_KEYS))()
    _lib.hm_stats(raw, int(reset))
    c = dict(zip(_STAT_KEYS, raw))
    n = max(c["calls"], 1)
    return {"calls": c["calls"], "prep_us": c["prep_ns"] / n / 1e3, "region1_us": c["region1_ns"] / n / 1e3,
            "region2_us": c["region2_ns"] / n / 1e3, "kernel_threads": c["threads"] / n,
            "busy1": c["busy1_ns"] / max(c["region1_ns"] * c["threads"] / n, 1),
            "busy2": c["busy2_ns"] / max(c["region2_ns"] * c["threads"] / n, 1)}


def read_all(t: torch.Tensor) -> int:
    """Read a contiguous CPU tensor once with torch's threads, as the kernel reads weights (linear, 32-byte loads;
    every whole 128-byte block, a shorter tail is skipped), for measuring the host's read bandwidth
    (benchmarks/decode_gemv.py). Returns a checksum of what was read."""
    if not (t.device.type == "cpu" and t.is_contiguous()):
        raise ValueError("read_all: a contiguous CPU tensor")
    return _lib.hm_read(t.data_ptr(), t.nbytes, torch.get_num_threads()) if available() else 0


def isas() -> list[str]:
    """Every instruction set the kernel can use on this CPU, best first (empty if it is not loaded)."""
    return [ISAS[lvl] for lvl in (2, 1) if available() and lvl <= _lib.hm_isa()]


def set_isa(name: str) -> str:
    """Use a lower instruction set than the best this CPU has (tests run every one the CPU can); returns the one in
    use before."""
    old = isa()
    _lib.hm_set_isa({v: k for k, v in ISAS.items()}[name])
    return old


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    if _state == "unloaded":
        _load()
    return _lib is not None


def status() -> str:
    """"ready" or "unavailable: <why>"."""
    if _state == "unloaded":
        _load()
    return _state


# Calls of more tokens than this take torch's GEMMs (oneDNN; AMX on Sapphire Rapids): the kernel is a GEMV at heart,
# each weight row read once per expert but one dot product per token. Measured crossover: BENCHMARKS.md, session 4.
MAX_TOKENS = 64


def supports(module, tokens: int = 1) -> bool:
    """Whether :func:`moe_forward` runs this HybridExperts call (a gate the kernel has, see
    :attr:`ExpertMLP.kernel_gate`: SiLU-GLU or gpt-oss's; weights fp32/bf16/int8/4-bit in RAM, at most
    :data:`MAX_TOKENS` tokens)."""
    w = module.weights
    return (tokens <= MAX_TOKENS and available() and module.mlp.kernel_gate is not None
            and w.gate_up.dtype in _DTYPES
            and w.gate_up.device.type == "cpu" and w.gate_up.is_contiguous() and w.down.is_contiguous())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def moe_forward(module, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] fp32 = Σ_k w[t, k] · Expert_{ids[t, k]}(x[t]), for a :func:`supports`-ed HybridExperts.

    x [T, H] fp32, ids [T, K] int64, w [T, K] fp32, out [T, H] fp32: CPU, contiguous (checked)."""
    _check(_lib.hm_moe_forward(*_arguments(module, x, ids, w, out)), module)


def prepared(module, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
    """:func:`moe_forward` over these fixed buffers as a function of no arguments: the checks and the argument list
    are made once (graph decode's cuts call the kernel on the same page-locked buffers at every token; the per-call
    Python was ~90 µs a layer on the GPU host, S12-a), and the arguments are handed over packed in two arrays
    (``hm_moe_forward_packed``). For a module without expert LoRA (whose factors could be replaced between calls);
    the call refuses to run if its weights or LoRA changed since (a new call is needed)."""
    if module.lora:
        raise ValueError("prepared: a module with expert LoRA calls moe_forward each time")
    if not available():
        raise RuntimeError(f"prepared: the CPU kernel is {status()}")
    args, fn = _arguments(module, x, ids, w, out), _lib.hm_moe_forward_packed
    floats = (17, 18, 24, 28)  # alpha, limit and the two LoRA scales, in hm_moe_forward's argument order
    ints = (ctypes.c_int64 * 28)(*[int(a or 0) for i, a in enumerate(args) if i not in floats])
    fl = (ctypes.c_float * 4)(*[args[i] for i in floats])
    packed = (ctypes.addressof(ints), ctypes.addressof(fl))

    def named() -> tuple:  # what the argument list points into (kept alive with the call, checked at each call)
        weights = module.weights
        return (weights, weights.gate_up, weights.down, *(weights.scales or {}).values(),
                *(getattr(weights, "_bias_f32", None) or {}).values())

    keep = (x, ids, w, out, named(), ints, fl)

    def call() -> None:
        now = named()
        if module.lora or len(now) != len(keep[4]) or any(a is not b for a, b in zip(now, keep[4])):
            raise RuntimeError("prepared kernel call: the module's weights or LoRA changed since it was prepared")
        ints[26] = torch.get_num_threads()  # torch's setting at each call, as moe_forward reads it
        _check(fn(*packed), module)

    return call


def _arguments(module, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> tuple:
    """hm_moe_forward's arguments for this call, after checking what the C side trusts."""
    for name, t, dt in (("x", x, torch.float32), ("ids", ids, torch.int64), ("w", w, torch.float32),
                        ("out", out, torch.float32)):
        if t.device.type != "cpu" or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"moe_forward: {name} must be a contiguous CPU {dt} tensor, got {t.dtype} on {t.device}")
    weights, spec = module.weights, module.spec
    t_, k = ids.shape
    if x.shape != (t_, spec.hidden_dim) or w.shape != ids.shape or out.shape != x.shape:  # the C side trusts these
        raise ValueError(f"moe_forward: shapes x {tuple(x.shape)}, ids {tuple(ids.shape)}, w {tuple(w.shape)}, "
                         f"out {tuple(out.shape)} do not fit [T, {spec.hidden_dim}], [T, K], [T, K], [T, {spec.hidden_dim}]")
    scales = weights.scales or {}
    table, group, qact, e8m0 = None, 0, 0, 0
    if weights.packed is not None:
        group, qact = weights.packed.group, int(weights.packed.int8_activations)  # the torch path's rule too
        e8m0 = int(scales["gate_up_proj"].dtype == torch.uint8)  # MXFP4's exponents as shipped (one byte a scale)
        if any(s.dtype != (torch.uint8 if e8m0 else torch.bfloat16) or not s.is_contiguous() for s in scales.values()):
            raise ValueError("moe_forward: 4-bit scales must be contiguous, both bf16 or both uint8 (MXFP4)")
        if weights.packed.kind != "int4":  # int4's values (c - 8) are computed, not looked up
            if weights.packed.kind not in _tables:
                _tables[weights.packed.kind] = torch.tensor(weights.packed.values, dtype=torch.float32)  # [16]
            table = _tables[weights.packed.kind]
    act, alpha, limit = module.mlp.kernel_gate
    bias = weights.bias_f32()  # fp32 copies of the biases, made once ({} without biases)
    lora = []
    for proj in ("gate_up_proj", "down_proj"):
        lo = module.lora.get(proj)
        if lo is None:
            lora += [0, None, None, 0.0]
        else:
            a, b = lo.A.detach(), lo.B.detach()
            if a.dtype != torch.float32 or not (a.is_contiguous() and b.is_contiguous()):
                raise ValueError(f"moe_forward: {proj} LoRA factors must be contiguous fp32")
            lora += [lo.rank, a.data_ptr(), b.data_ptr(), float(lo.scale)]
    return (t_, k, spec.num_experts, spec.hidden_dim, spec.intermediate_dim, x.data_ptr(), ids.data_ptr(),
            w.data_ptr(), _DTYPES[weights.gate_up.dtype], weights.gate_up.data_ptr(), _ptr(scales.get("gate_up_proj")),
            weights.down.data_ptr(), _ptr(scales.get("down_proj")), _ptr(table), group, qact, act, alpha, limit,
            _ptr(bias.get("gate_up_proj")), _ptr(bias.get("down_proj")), *lora, out.data_ptr(),
            torch.get_num_threads(), e8m0)


def _check(rc: int, module) -> None:
    if rc == 1:
        raise ValueError(f"moe_forward: an expert id is outside [0, {module.spec.num_experts})")
    if rc == 2:
        raise MemoryError("moe_forward: out of host memory for the kernel's buffers")
    if rc == 4:
        raise ValueError(f"moe_forward: 4-bit group {module.weights.packed.group} does not fit the dims "
                         f"{module.spec.hidden_dim}, {module.spec.intermediate_dim} (or int8 activations asked for "
                         "other than int4 in groups of 64k, or e8m0 scales other than MXFP4's, or more than 1024 a row)")
    if rc:
        raise RuntimeError(f"moe_forward: the kernel returned {rc} (no instruction set selected)")
