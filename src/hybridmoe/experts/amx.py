"""bf16 GEMMs on Intel AMX tiles (``amx_gemm.c``, built on first use): the CPU share of a streamed prefill.

A streamed prefill may compute a share of each layer's experts on the CPU while the rest cross PCIe (:mod:`.split`).
With bf16 experts that share's GEMMs went through torch (oneDNN): 1-2 TFLOP/s on the GPU host's 16-core Xeon at
~100 tokens an expert, too slow for a useful share (BENCHMARKS.md, sessions 7 and 14). :func:`grouped_linear` runs
every CPU expert of a layer in one call on AMX tiles (3.6 TFLOP/s there at ~96 tokens an expert, 16 experts a call),
with the weights read as they are stored (no repacked copy of the experts) and the activations gathered and packed
once a call; :func:`linear` is one expert's. ``amx_gemm.c``'s header describes the blocking.

Where it runs: a CPU with AMX-BF16 (Intel Sapphire Rapids and later) on Linux, with a C compiler that knows AMX
(GCC >= 11, clang >= 12). Elsewhere :func:`available` is False and callers keep torch's GEMM; the reason is logged
once at INFO (:func:`status`). ``HYBRIDMOE_AMX=0`` turns it off; ``HYBRIDMOE_AMX_THREADS`` sets its threads
(default torch's). ``emulate=True`` runs the same blocking with the tile instructions written in C, on any x86-64
CPU, for tests.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from pathlib import Path

import torch

from . import cpu_kernel

log = logging.getLogger(__name__)

__all__ = ["EMULATE", "ENABLED", "THREADS", "VARIANT", "available", "grouped_linear", "linear", "scatter_rows",
           "set_variant", "stats", "status", "supports", "usable"]

_SOURCE = Path(__file__).with_name("amx_gemm.c")
_lib: ctypes.CDLL | None = None
_state = "unloaded"  # "unloaded" -> "ready" (the library built; AMX may still be absent) | "unavailable: why"
_ok: bool | None = None  # hm_amx_ok(), asked once
# Tests: callers (usable, linear) take the emulated tiles, so the CPU share's AMX path runs on any x86-64 CPU.
EMULATE = False
# Benchmarks: False leaves every GEMM to torch (usable() is False), for the side-by-side baseline.
ENABLED = True
# What the GEMM does beyond the tiles (amx_gemm.c: 1 prefetch the tiles two k-steps ahead, 2 prefetch the thread's
# next block of weight rows into L2), chosen by benchmarks/amx_gemm.py --variants; HYBRIDMOE_AMX_VARIANT overrides.
# S14-f/g: 1 (0.625 ms an expert at 96 tokens from RAM against 0.657 with none, 0.626 with 2, 0.632 with both).
VARIANT = int(os.environ.get("HYBRIDMOE_AMX_VARIANT", "1") or 0)
_scratch = threading.local()  # thread_buffer's buffers, kept per calling thread (fresh pages fault)
# OpenMP threads of a GEMM (HYBRIDMOE_AMX_THREADS; 0: torch.get_num_threads()).
THREADS = int(os.environ.get("HYBRIDMOE_AMX_THREADS", "0") or 0)


def _load() -> None:
    global _lib, _state
    if os.environ.get("HYBRIDMOE_AMX", "1") in ("0", "false", "no", "off"):
        _state = "unavailable: turned off by HYBRIDMOE_AMX=0"
        return
    try:
        lib = cpu_kernel.load_library(_SOURCE)
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.hm_amx_ok.restype = lib.hm_amx_gemm.restype = c_int
        lib.hm_amx_pack.argtypes = [p, c_int, i64, i64, p, p, p, i64, p, p, p, c_int]
        lib.hm_amx_gemm.argtypes = [p, p, i64, i64, i64, p, p, p, p, i64, p, i64, c_int, c_int, c_int]
        lib.hm_amx_stats.argtypes = [p, c_int]
        lib.hm_amx_set_variant.argtypes = [c_int]
        lib.hm_scatter_rows.argtypes = [p, i64, i64, p, p, p, p, c_int]
        lib.hm_amx_set_variant(VARIANT)
        _lib, _state = lib, "ready"
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        _state = f"unavailable: {e}"
        log.info("AMX GEMMs %s; the CPU share's bf16 GEMMs run through torch", _state)


def _library() -> ctypes.CDLL | None:
    if _state == "unloaded":
        _load()
    return _lib


def available() -> bool:
    """The AMX GEMMs run on this CPU (the library built, the CPU has AMX-BF16, Linux lent the tile state)."""
    global _ok
    if _ok is None:
        lib = _library()
        _ok = lib is not None and bool(lib.hm_amx_ok())
    return _ok


def status() -> str:
    """"ready", "no AMX on this CPU", or "unavailable: why" (the library did not build or is turned off)."""
    if _library() is None:
        return _state
    return "ready" if available() else "no AMX on this CPU"


def supports(w: torch.Tensor) -> bool:
    """:func:`linear` takes this weight: bf16 [M, K] on the CPU, rows contiguous, M % 16 == 0 and K % 32 == 0."""
    return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2 and w.stride(1) == 1
            and w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0)


def usable(w: torch.Tensor) -> bool:
    """:func:`linear` runs for this weight here: ENABLED, :func:`supports` it, and AMX :func:`available` (or
    EMULATE)."""
    return ENABLED and supports(w) and ((EMULATE and _library() is not None) or available())


def linear(x: torch.Tensor, w: torch.Tensor, emulate: bool | None = None,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x [n, K] (bf16, or fp32 rounded to bf16; CPU) times w [M, K] bf16 transposed -> [n, M]: fp32 sums, returned
    as fp32 or rounded to bf16 (``out_dtype``; as a bf16 linear rounds its output). Needs :func:`available` (or
    ``emulate``, default EMULATE) and :func:`supports`\\(w)."""
    return grouped_linear(x, w[None], [0], [x.shape[0]], emulate, out_dtype)


def thread_buffer(name: str, elements: int, dtype: torch.dtype, least: int = 0) -> torch.Tensor:
    """`elements` of this thread's buffer `name` (1-D, `dtype`), kept for its later calls: grown when short (to at
    least `least` elements), never shrunk. For the large scratch of the CPU's GEMMs: memory allocated anew at each call
    came back from the OS fresh and page-faulted inside the parallel regions (S15-f)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < elements or buf.dtype != dtype:
        buf = torch.empty(max(elements, least), dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:elements]


def grouped_linear(x: torch.Tensor, w: torch.Tensor, experts, counts, emulate: bool | None = None,
                   out_dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert's GEMM of a layer in one call: the activations (rows sorted by expert: ``counts[j]`` rows of
    expert ``experts[j]``, in order) against w [E, M, K] bf16 (each expert's matrix rows contiguous) -> y [S, M],
    row i = x_i · w[expert of row i]^T: fp32 sums, fp32 or rounded to bf16 (``out_dtype``). The activations: x
    [S, K] itself, or with ``rows`` [S] (int64) the rows x[rows[i]] of an unsorted x [T, K], gathered while packing;
    bf16, or fp32 rounded to bf16 while packing. One parallel region for all of them: the work items are every
    expert's 32-row blocks. ``out``: a contiguous [S, M] tensor of ``out_dtype`` to write y into (a caller's reused
    buffer: memory the OS hands out fresh faults on first touch, page by page, inside the parallel region)."""
    emulate = EMULATE if emulate is None else emulate
    lib = _library()
    if lib is None:
        raise RuntimeError(f"AMX GEMMs {_state}")
    if not supports(w[0]) or w.stride(0) < w.shape[1] * w.stride(1):
        raise ValueError(f"AMX linear: weight {tuple(w.shape)} {w.dtype} does not tile (bf16, M % 16, K % 32)")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"AMX linear: out_dtype fp32 or bf16, not {out_dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        x = x.float().cpu()
    if x.stride(1) != 1:
        x = x.contiguous()
    k, m = x.shape[1], w.shape[1]
    if k != w.shape[2]:
        raise ValueError(f"AMX linear: x has {k} inputs, the weight {w.shape[2]}")
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if len(rows) and not (int(rows.min()) >= 0 and int(rows.max()) < x.shape[0]):
            raise ValueError(f"AMX linear: rows outside x's {x.shape[0]}")
    s_rows = x.shape[0] if rows is None else len(rows)
    cnt = torch.as_tensor(counts, dtype=torch.int64)
    if int(cnt.sum()) != s_rows or bool((cnt < 0).any()):
        raise ValueError(f"AMX linear: group counts {cnt.tolist()} do not partition {s_rows} rows")
    keep = cnt > 0  # experts without rows are skipped
    off = (torch.cumsum(cnt, 0) - cnt)[keep].contiguous()  # first sorted row of each group
    cnt = cnt[keep].contiguous()
    ids = torch.as_tensor(experts, dtype=torch.int64)[keep]
    if len(ids) and not (int(ids.min()) >= 0 and int(ids.max()) < w.shape[0]):
        raise ValueError(f"AMX linear: experts {ids.tolist()} outside the weight's {w.shape[0]}")
    padded = (cnt + 15) // 16 * 16
    xpo = ((torch.cumsum(padded, 0) - padded) * k).contiguous()  # each group's packed activations (elements)
    wo = (ids * w.stride(0)).contiguous()  # each group's matrix (elements from w[0])
    g = len(cnt)
    threads = THREADS or torch.get_num_threads()
    xp = thread_buffer("xp", int(padded.sum()) * k, torch.bfloat16, 1 << 20)  # the B operand, tile by tile
    tiles0 = torch.empty(g + 1, dtype=torch.int64)
    if out is not None and (out.shape != (s_rows, m) or out.dtype != out_dtype or not out.is_contiguous()
                            or out.device.type != "cpu"):
        raise ValueError(f"AMX linear: out must be a contiguous CPU [{s_rows}, {m}] {out_dtype} tensor, not "
                         f"{tuple(out.shape)} {out.dtype}")
    y = torch.empty(s_rows, m, dtype=out_dtype) if out is None else out  # [S, M]
    if g == 0:
        return y
    lib.hm_amx_pack(x.data_ptr(), int(x.dtype == torch.float32), x.stride(0), k,
                    None if rows is None else rows.data_ptr(), off.data_ptr(), cnt.data_ptr(), g, xp.data_ptr(),
                    xpo.data_ptr(), tiles0.data_ptr(), threads)
    rc = lib.hm_amx_gemm(w.data_ptr(), wo.data_ptr(), w.stride(1), m, k, xp.data_ptr(), xpo.data_ptr(),
                         off.data_ptr(), cnt.data_ptr(), g, y.data_ptr(), m, int(out_dtype == torch.bfloat16),
                         int(emulate), threads)
    if rc:
        raise RuntimeError({1: "AMX is not usable on this CPU", 3: "out of memory"}.get(rc, f"AMX GEMM failed ({rc})"))
    return y


_STAT_KEYS = ("calls", "pack_x_ns", "region_ns", "rows_ns", "tiles_ns", "write_ns")


def stats(reset: bool = False) -> dict[str, float]:
    """Where :func:`linear`'s calls spent their time since the last reset, in microseconds a call (empty if the
    library is not loaded): ``pack_x_us`` packing the activations, ``region_us`` the GEMM's parallel region, and
    per thread of it ``rows_us`` copying W's rows into tile order, ``tiles_us`` in the tile instructions,
    ``write_us`` writing y. ``reset`` zeroes the counters after reading them."""
    lib = _library()
    if lib is None:
        return {}
    raw = (ctypes.c_int64 * len(_STAT_KEYS))()
    lib.hm_amx_stats(raw, int(reset))
    c = dict(zip(_STAT_KEYS, raw))
    n = max(c["calls"], 1)
    threads = THREADS or torch.get_num_threads()
    out = {"calls": c["calls"], "pack_x_us": c["pack_x_ns"] / n / 1e3, "region_us": c["region_ns"] / n / 1e3}
    out.update({k.replace("_ns", "_us"): c[k] / n / threads / 1e3 for k in ("rows_ns", "tiles_ns", "write_ns")})
    return out


def scatter_rows(y: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, tokens: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """out [tokens, H] fp32: row t = the sum, in slot order, of w[i] * y[i] over the slots i with tok[i] == t (zero
    rows for tokens with none). y [S, H] fp32, tok [S] int64, w [S] fp32; out: a contiguous CPU fp32 tensor to
    write into (e.g. page-locked). Bitwise ``y * w[:, None]`` index-added into zeros, as the split's other maths
    sum, in one parallel pass over the output's rows (amx_gemm.c's ``hm_scatter_rows``; index_add_ is serial)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"AMX library {_state}")
    s, h = y.shape
    if y.dtype != torch.float32 or w.dtype != torch.float32 or tok.shape != (s,) or w.shape != (s,):
        raise ValueError(f"scatter_rows: y [S, H] fp32, tok [S], w [S] fp32; got {tuple(y.shape)} {y.dtype}, "
                         f"{tuple(tok.shape)}, {tuple(w.shape)} {w.dtype}")
    if out is None:
        out = torch.empty(tokens, h, dtype=torch.float32)
    if out.shape != (tokens, h) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"scatter_rows: out must be a contiguous [{tokens}, {h}] fp32 tensor")
    tok = tok.to(torch.int64)
    if s and not (int(tok.min()) >= 0 and int(tok.max()) < tokens):
        raise ValueError(f"scatter_rows: tokens outside [0, {tokens})")
    y, w = y.contiguous(), w.contiguous()
    by_tok = torch.argsort(tok, stable=True)  # [S]: slot order kept within a token
    starts = torch.zeros(tokens + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(tok, minlength=tokens), 0, out=starts[1:])
    lib.hm_scatter_rows(out.data_ptr(), tokens, h, y.data_ptr(), by_tok.data_ptr(), starts.data_ptr(), w.data_ptr(),
                        THREADS or torch.get_num_threads())
    return out


def set_variant(v: int) -> None:
    """The GEMM's prefetches (VARIANT's bits), for benchmarks."""
    lib = _library()
    if lib is not None:
        lib.hm_amx_set_variant(int(v))
