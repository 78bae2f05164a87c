"""Routed experts whose weights live in CPU RAM.

``HybridExperts`` replaces a transformers fused experts block in the module tree. It keeps the forward signature
``(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``, so the MoE block around it (router,
shared experts, ``shared_expert_gate``) is transformers' own code, untouched.

One copy of every weight, in one place: the expert weights are held by an :class:`ExpertWeights` object that is
*not* an ``nn.Parameter`` or buffer. ``model.to()``, ``state_dict()``, PEFT and accelerate therefore cannot see,
move, wrap or empty them. The same holds for the expert LoRA (:class:`ExpertLoRA`, fp32 master weights on the CPU),
which the trainer collects explicitly (``hybridmoe.training.named_trainable``).

Where the math runs is chosen per call from the batch size (``HybridExperts.streams``):
- small batches (decode, short prompts) run on the CPU, next to the weights. Only activations cross devices: hidden
  states, top-k ids and top-k weights go to the CPU, the combined expert output comes back;
- large batches (training, long prefill) run on the GPU: the layer's weights are streamed into a two-slot GPU cache
  (:mod:`hybridmoe.experts.streaming`) and the LoRA factors are copied there; their gradients come back to the CPU
  masters.
The backward pass (``_ExpertsFn.backward``) computes the gradients with respect to the hidden states, the routing
weights and the expert LoRA factors from the per-slot pre-activations and outputs the forward kept (no GEMM is
recomputed; under gradient checkpointing they live for one layer at a time).
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading
import weakref

import torch
from torch import nn

from ..grad_clip import EARLY_ROW_NORMS
from . import cpu_kernel
from . import watch as _watch
from .backends import ExpertSettings, choose_backend
from .discovery import ExpertsSpec
from .expert_math import Dequantized, GroupedMath, LoopMath, LoRAFactors, SlotWeights, expert_groups, unsort_sum
from .formula import ExpertMLP
from .packed import PackedFormat, dequantize_packed, quantize_activations, quantize_int4, quantize_mxfp4
from .row_lora import RowLoRA

PROJECTIONS = ("gate_up_proj", "down_proj")


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: w [..., out, in] float -> (q int8 [..., out, in], scale
    [..., out] in `scale_dtype`) with w ≈ q · scale. The scale is rounded to its dtype before dividing, so q matches
    the stored scale."""
    w = w.float()  # one fp32 copy (a no-op for fp32 input)
    scale = (w.abs().amax(-1) / 127).clamp_min(1e-30).to(scale_dtype)
    q = torch.round(w / scale.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [..., out, in], scale bf16 [..., out] -> bf16 [..., out, in] (one rounding: bf16 ops compute in fp32).

    One elementwise pass: int8 * bf16 promotes to bf16 inside the kernel (int8 values are exact in bf16), the same
    bits as converting q first, without writing and re-reading a bf16 copy of q (on the GPU: a layer's weights at every
    streamed call of an int8 training step; S9-a's trace had the two passes at 285 ms of a 1.17 s step)."""
    return q * scale.unsqueeze(-1)


ExpertFormat = torch.dtype | PackedFormat  # how routed-expert weights are held in RAM


def format_name(fmt: ExpertFormat) -> str:
    """"bfloat16", "float32", "int8", "int4 (group 64)" or "mxfp4": for info and logs."""
    return str(fmt) if isinstance(fmt, PackedFormat) else str(fmt).replace("torch.", "")


class ExpertWeights:
    """The CPU home of one layer's routed-expert weights, in the canonical fused layout [E, out, in].

    gate_up: [E, U, H], U = 2I gate and up rows for gated experts (in the block's own order: concatenated or
             interleaved, which the gate function knows), U = I up rows for non-gated ones
    down:    [E, H, I]
    bias:    None, or {"gate_up_proj": [E, U], "down_proj": [E, H]} (fp32 unless the weights are bf16/fp32)
    ``fmt`` is bf16 or fp32; int8, quantized per output row as the weights load (``scales`` bf16 [E, U], [E, H]:
    w ≈ q · scale); or a 4-bit :class:`~hybridmoe.experts.packed.PackedFormat` (int4 quantized group-wise as they
    load, or MXFP4 as shipped): gate_up / down then hold uint8 codes [E, U, H/2], [E, H, I/2] and ``scales``
    [E, U, H/group], [E, H, I/group] (int4: bf16; MXFP4: its uint8 e8m0 exponents, as shipped). Never a zero-size
    placeholder.
    """

    def __init__(self, spec: ExpertsSpec, fmt: ExpertFormat, device: str = "cpu"):
        e = spec.num_experts
        self.fmt = fmt
        self.packed: PackedFormat | None = fmt if isinstance(fmt, PackedFormat) else None
        # Uninitialised on purpose: the loader fills every expert slice and checks that it did (see `loaded`).
        # device="meta" only for shape bookkeeping (export plans its merge without reserving host memory).
        shapes = {p: spec.shape(p) for p in PROJECTIONS}  # [E, out, in] each
        if self.packed is not None:
            for p, (_, _, n) in shapes.items():
                if not self.packed.fits(n):
                    raise ValueError(f"{self.packed} needs input dims divisible by {self.packed.group}; {p} has {n}")
            store = {p: (*s[:2], s[2] // 2) for p, s in shapes.items()}
            dtype = torch.uint8
        else:
            store, dtype = shapes, fmt
        self.gate_up = torch.empty(store["gate_up_proj"], dtype=dtype, device=device)  # [E, U, H] (packed: H/2)
        self.down = torch.empty(store["down_proj"], dtype=dtype, device=device)  # [E, H, I] (packed: I/2)
        for t in (self.gate_up, self.down):  # before the loader's first touch, which is when pages are chosen
            advise_huge_pages(t)
        self.scales: dict[str, torch.Tensor] | None = None
        if dtype == torch.int8:
            self.scales = {p: _ones_on_huge_pages(s[:2], device) for p, s in shapes.items()}  # [E, out]
        elif self.packed is not None:
            g = self.packed.group
            self.scales = {p: _ones_on_huge_pages((*s[:2], s[2] // g), device, self.packed.scale_dtype)
                           for p, s in shapes.items()}  # [E, out, in/group]
        self.bias: dict[str, torch.Tensor] | None = None
        if spec.has_bias:
            bias_dtype = dtype if dtype.is_floating_point else torch.float32
            self.bias = {p: torch.zeros(s[:2], dtype=bias_dtype, device=device) for p, s in shapes.items()}
        # Per (projection, expert, row-half) coverage, so a partially loaded checkpoint is caught, not computed on.
        self.loaded: dict[str, torch.Tensor] = {p: torch.zeros(e, 2, dtype=torch.bool) for p in PROJECTIONS}
        if spec.has_bias:
            self.loaded.update({f"{p}_bias": torch.zeros(e, 2, dtype=torch.bool) for p in PROJECTIONS})

    def tensor(self, proj: str) -> torch.Tensor:
        return self.gate_up if proj == "gate_up_proj" else self.down

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def format_name(self) -> str:
        return format_name(self.fmt)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype :meth:`to_float` gives: the weights' own for bf16/fp32, bf16 for int8 and 4-bit."""
        return torch.bfloat16 if self.quantized else self.gate_up.dtype

    def write(self, proj: str, value: torch.Tensor, expert: int | None = None, rows: slice = slice(None)) -> None:
        """Store float weights: the whole projection ([E, out, in], expert None) or rows of one expert; quantized on
        the way in when the weights are int8 or 4-bit."""
        dst = self.tensor(proj) if expert is None else self.tensor(proj)[expert, rows]
        if not self.quantized:
            dst.copy_(value)
            return
        if expert is None:  # one expert at a time: the fp32 temporaries stay one expert's size
            for e in range(value.shape[0]):
                self.write(proj, value[e], expert=e)
            return
        if self.packed is None:
            q, scale = quantize_rows(value)
        elif self.packed.kind == "int4":
            q, scale = quantize_int4(value, self.packed.group)
        else:
            q, scale = quantize_mxfp4(value)
        dst.copy_(q)
        self.scales[proj][expert, rows].copy_(scale)

    def write_packed(self, proj: str, codes: torch.Tensor, scales: torch.Tensor, expert: int | None = None,
                     rows: slice = slice(None)) -> None:
        """Store 4-bit weights already in this object's format (a checkpoint's MXFP4 or int4, byte for byte): codes
        uint8 [E, out, in/2] / scales [E, out, in/group] for the whole projection (expert None), or one expert's
        rows [out', in/2] / [out', in/group]."""
        dst = self.tensor(proj) if expert is None else self.tensor(proj)[expert, rows]
        sdst = self.scales[proj] if expert is None else self.scales[proj][expert, rows]
        if scales.dtype != sdst.dtype:  # a copy would convert values (2^-1 as an exponent byte: 0), not bits
            raise ValueError(f"{proj}: {self.packed} scales are {sdst.dtype}, got {scales.dtype}")
        if codes.shape != dst.shape or scales.shape != sdst.shape:
            raise ValueError(f"{proj}: packed codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not fit "
                             f"{tuple(dst.shape)} / {tuple(sdst.shape)}")
        dst.copy_(codes)
        sdst.copy_(scales)

    def write_bias(self, proj: str, value: torch.Tensor, expert: int | None = None) -> None:
        """Store a projection's biases: all experts ([E, out], expert None) or one expert's [out]."""
        dst = self.bias[proj] if expert is None else self.bias[proj][expert]
        dst.copy_(value)
        self._bias_f32 = None

    def bias_f32(self) -> dict[str, torch.Tensor]:
        """The biases as contiguous fp32 (the compiled kernel's form): the stored tensors when they are fp32, else
        copies made once (invalidated by :meth:`write_bias`); {} without biases."""
        if self.bias is None:
            return {}
        if getattr(self, "_bias_f32", None) is None:
            self._bias_f32 = {p: b.float().contiguous() for p, b in self.bias.items()}
        return self._bias_f32

    def dequantized(self, proj: str) -> torch.Tensor:
        """The projection's weights as floats, [E, out, in] (the stored tensor itself unless quantized; 4-bit: fp32)."""
        w = self.tensor(proj)
        if self.packed is not None:
            return dequantize_packed(w, self.scales[proj], self.packed)
        return dequantize_rows(w, self.scales[proj]) if self.quantized else w

    def to_float(self, w: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Weights stored in this object's format, anywhere (a GPU slot, a GPU share buffer), as floats [n, out, in]:
        the tensor itself for bf16/fp32; int8 and 4-bit dequantized to bf16 where they are."""
        if self.packed is not None:
            return dequantize_packed(w, scales, self.packed, torch.bfloat16)
        return w if scales is None else dequantize_rows(w, scales)

    # -- what the per-expert loop asks of any weights object (the format stays in here) --------------------------
    def linear(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] fp32 -> x W[e]^T (+ b[e]) [n, out] fp32, in the stored format: int8 with bf16 activations through
        torch's int8 GEMV (half the bytes); 4-bit as the kernel computes it (int4 in groups of a multiple of 64,
        and MXFP4: int8 activations per group, see PackedFormat.int8_activations; else bf16-rounded activations;
        times the exact fp32 weights, output rounded to bf16); bf16/fp32 through the weight dtype's GEMM (the bf16 cast of x is
        the only rounding added)."""
        w = self.tensor(proj)[e]
        if self.packed is not None:  # int4 (groups of 64k), MXFP4: int8 activations, as the kernel; else bf16
            xin = (quantize_activations(x, self.packed.group) if self.packed.int8_activations
                   else x.to(torch.bfloat16).float())
            y = nn.functional.linear(xin, self.matrix(proj, e)).to(torch.bfloat16)
        elif self.quantized and _int8pack_ok(w):
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), w, self.scales[proj][e])
        else:
            w = self.matrix(proj, e)
            y = nn.functional.linear(x.to(w.dtype), w)
        y = y.float()
        return y if self.bias is None else y + self.bias[proj][e].float()

    def matrix(self, proj: str, e: int) -> torch.Tensor:
        """Expert e's [out, in] matrix as floats (this expert only, for one GEMM): int8 as bf16, 4-bit as fp32 (exact)."""
        w = self.tensor(proj)[e]
        if self.packed is not None:
            return dequantize_packed(w, self.scales[proj][e], self.packed)
        return dequantize_rows(w, self.scales[proj][e]) if self.quantized else w

    def out_features(self, proj: str) -> int:
        return self.tensor(proj).shape[1]

    def in_features(self, proj: str) -> int:
        n = self.tensor(proj).shape[2]
        return 2 * n if self.packed is not None else n

    def host_tensors(self) -> list[torch.Tensor]:
        """Every tensor that makes up the weights, in streaming order: gate_up, down (+ their scales when int8 or
        4-bit, + their biases when the block has them)."""
        out = [self.gate_up, self.down]
        for extra in (self.scales, self.bias):
            if extra is not None:
                out += [extra[p] for p in PROJECTIONS]
        return out

    def unpack(self, tensors) -> tuple[torch.Tensor, torch.Tensor, dict | None, dict | None]:
        """(gate_up, down, scales, bias) from a list laid out like :meth:`host_tensors` (e.g. a streamed GPU slot)."""
        gate_up, down, *rest = tensors
        scales = dict(zip(PROJECTIONS, rest[:2])) if self.quantized else None
        bias = dict(zip(PROJECTIONS, rest[-2:])) if self.bias is not None else None
        return gate_up, down, scales, bias

    def replace_host_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rebind :meth:`host_tensors` (same order, shapes and dtypes) to other storage, e.g. views of a host-shared
        mapping."""
        self.gate_up, self.down, self.scales, self.bias = self.unpack(tensors)
        self._bias_f32 = None

    def pin(self) -> bool:
        """Page-lock the host tensors in place, so streaming them to the GPU is a full-speed asynchronous DMA."""
        return pin_host(self, self.host_tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.host_tensors())

    def missing(self) -> list[str]:
        """Human-readable list of expert slices never written by the loader."""
        out = []
        for proj, mask in self.loaded.items():
            for e in (~mask).any(dim=1).nonzero().flatten().tolist():
                out.append(f"{proj}[{e}]")
        return out


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _ones_on_huge_pages(shape, device, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Scales of 1 before the loader writes them (bf16 1.0, or the e8m0 exponent 127 for uint8), on 2 MiB pages where
    large: a 4-bit model's scales are an eighth (bf16) or a sixteenth (e8m0) of its codes' bytes (gpt-oss-120b:
    ~3.4 GB as shipped), read beside them at every decode step."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t.fill_(127 if dtype == torch.uint8 else 1.0)


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux for 2 MiB pages under a large CPU tensor (madvise MADV_HUGEPAGE on its 2 MiB-aligned interior).

    Called before the tensor is first written, so the pages are huge from the start. A decode step reads ~2.7 GB of
    expert rows scattered over the experts; with 4 KiB pages every 4 KiB row is a TLB miss and the hardware
    prefetchers stop at each page boundary. False off Linux, for small tensors, or where the kernel has no transparent
    huge pages; it has no effect where they are set to "never", and with "always" the kernel does it by itself."""
    if t.device.type != "cpu" or t.nbytes < 2 * _HUGE_PAGE or not sys.platform.startswith("linux"):
        return False
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    length = (t.data_ptr() + t.nbytes - start) // _HUGE_PAGE * _HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return length > 0 and libc.madvise(start, length, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def pin_host(owner: object, tensors: list[torch.Tensor]) -> bool:
    """Page-lock `tensors` (CPU, contiguous) in place for as long as `owner` lives; False if CUDA refuses.

    cudaHostRegister on the existing pages: unlike ``pin_memory=True`` (torch's caching host allocator rounds each
    block up to a power of two, +36% for a V2-Lite expert layer) it costs no extra host memory.
    """
    cudart = torch.cuda.cudart()
    pinned = []
    for t in tensors:
        try:
            torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
        except RuntimeError:
            _unregister(pinned)
            return False
        pinned.append(t.data_ptr())
    # Unregistered before the tensors are freed: weakref callbacks run before the instance dict is cleared.
    weakref.finalize(owner, _unregister, pinned)
    return True


def _unregister(ptrs: list[int]) -> None:
    cudart = torch.cuda.cudart()
    for ptr in ptrs:
        cudart.cudaHostUnregister(ptr)


class ExpertLoRA:
    """LoRA on one fused expert projection: per expert e, ΔW[e] = scale · B[e] @ A[e].

    A: [E, r, in]  fp32, cpu, leaf with requires_grad
    B: [E, out, r] fp32, cpu, leaf with requires_grad
    PEFT's ``target_parameters`` layout (lora_A [E·r, in] expert-major, lora_B [out, E·r] rank-major) is produced and
    read by :mod:`hybridmoe.adapters`; this internal layout keeps each expert's factors contiguous for the GEMMs.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, alpha: float):
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.A = torch.zeros(num_experts, rank, in_features, dtype=torch.float32)
        self.B = torch.zeros(num_experts, out_features, rank, dtype=torch.float32)

    # Set by hybridmoe.cpu_optim.OverlappedStep while an optimizer step updates these masters on its worker thread:
    # whatever reads the masters (the forward) or the gradients (the next backward's staging) waits for it first.
    update: threading.Event | None = None

    def wait_update(self) -> None:
        """Return once no optimizer step is updating these masters (at once when none is pending)."""
        ev = self.update
        if ev is not None:
            ev.wait()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=√5) per expert (bound 1/√in), B = 0, so ΔW starts at 0."""
        bound = 1.0 / math.sqrt(self.A.shape[-1])
        with torch.no_grad():
            self.A.uniform_(-bound, bound, generator=generator)
            self.B.zero_()

    def parameters(self) -> list[torch.Tensor]:
        return [self.A, self.B]

    def requires_grad_(self, flag: bool = True) -> None:
        self.A.requires_grad_(flag)
        self.B.requires_grad_(flag)

    def pinned_for_gpu(self) -> bool:
        """Page-lock A and B (once) so their per-layer copies to the GPU are asynchronous; False if not possible."""
        if not getattr(self, "_pinned", False) and all(t.is_contiguous() for t in (self.A, self.B)):
            self._pinned = pin_host(self, [self.A, self.B])
        return getattr(self, "_pinned", False)

    def factors_on(self, where: torch.device, dtype: torch.dtype, pad_rank: bool = False) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
        """(A [E, r', in], B [E, out, r']) on `where` in `dtype`, autograd-detached; r' = r zero-padded to a multiple
        of 16 bytes when `pad_rank` (grouped GEMMs; zero rows of A and columns of B add nothing).

        Frozen factors (an adapter being served or chatted with) keep their copies and reuse them while the masters
        are unchanged (same storage and in-place version counters): a server or decode step then copies an adapter's
        expert LoRA to the GPU once, not at every layer of every step. Trainable factors are copied at every call:
        the optimizer moves them (and may do so without a version bump, through ``.data``), and autograd runs
        backward without grad mode, so grad mode cannot tell training from inference."""
        self.wait_update()
        key = (where, dtype, pad_rank)
        state = (self.A.data_ptr(), self.A._version, self.B.data_ptr(), self.B._version)
        cache = not (self.A.requires_grad or self.B.requires_grad)
        copies = getattr(self, "_copies", None)
        if cache and copies is not None and key in copies and copies[key][0] == state:
            return copies[key][1]
        nb = where.type == "cuda" and self.pinned_for_gpu()  # async copy: no host sync in the streamed path
        a = self.A.detach().to(where, dtype, non_blocking=nb)  # [E, r, in]
        b = self.B.detach().to(where, dtype, non_blocking=nb)  # [E, out, r]
        step = 16 // a.element_size()
        if pad_rank and a.shape[1] % step:
            pad = step - a.shape[1] % step
            a = nn.functional.pad(a, (0, 0, 0, pad))  # [E, r+pad, in]
            b = nn.functional.pad(b, (0, pad))  # [E, out, r+pad]
        if cache:
            if copies is None:
                copies = self._copies = {}
            copies[key] = (state, (a, b))
        return a, b

    def grad_stage(self, which: int, busy: set[int]) -> torch.Tensor:
        """A page-locked host buffer for dA (which=0) or dB (1) coming back from the GPU without a host sync: one of
        this factor's buffers whose storage is not in `busy` (data pointers: the master's current .grad, buffers a
        backward pass has staged into and not yet added), a new one if all are. Two suffice for training: a landed
        gradient becomes .grad itself (no copy, and nothing freed by ``zero_grad``), the next pass fills the other."""
        bufs = self._grad_bufs()[which]
        for buf in bufs:
            if buf.data_ptr() not in busy:
                return buf
        master = (self.A, self.B)[which]
        bufs.append(torch.empty(master.shape, pin_memory=torch.cuda.is_available()))
        return bufs[-1]

    def _grad_bufs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if getattr(self, "_stage_bufs", None) is None:
            self._stage_bufs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        return self._stage_bufs


def _int8pack_ok(w: torch.Tensor) -> bool:
    """Whether torch._weight_int8pack_mm can take this [out, in] int8 matrix. Its AVX-512 kernel (torch 2.11,
    Sapphire Rapids) crashed on small odd shapes ([48, 40] and [40, 24] with a few rows); every released model's
    expert dims are multiples of 64, and other shapes take the dequantized bf16 GEMM."""
    return w.shape[0] % 64 == 0 and w.shape[1] % 64 == 0


class _ExpertsFn(torch.autograd.Function):
    """y = Σ_k w[t,k] · Expert_{ids[t,k]}(x[t]) with an exact hand-written backward, on the CPU or the GPU.

    Where it runs is chosen per call by :meth:`HybridExperts.streams` from the token count: small batches
    (decode) on the CPU next to the weights, one expert at a time (:class:`LoopMath`); large ones (training, long
    prefill) on the GPU with the layer's weights streamed in by
    :class:`~hybridmoe.experts.streaming.ExpertStreamer`, in grouped GEMMs (:class:`GroupedMath`).

    The T·K (token, k) slots are sorted by expert once; each expert then works on a contiguous row range of the
    sorted buffers, and one scatter + sum over k combines the results (no per-expert gathers or index_add).
    """

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, module, backend, prefetch, *lora_tensors):
        # hidden: [T, H] on the model device; top_k_index: [T, K] int; top_k_weights: [T, K] float.
        # backend: "cpu", "grouped" or "device-loop", from experts.backends.choose_backend; prefetch: a streamed call
        # starts the copy of the next layer (False for a small call on a resident layer: the next one runs on the CPU).
        device, out_dtype = hidden.device, hidden.dtype
        streamed = backend != "cpu"
        where = module.streamer.device if streamed else torch.device("cpu")
        # On the CPU path this is the one device->host copy of the forward: activations and routing, never weights.
        ids = top_k_index.detach().to(where, torch.int64)  # [T, K] int64
        w = top_k_weights.detach().to(where, torch.float32)  # [T, K] fp32
        ctx.module, ctx.where, ctx.backend, ctx.prefetch = module, where, backend, prefetch
        ctx.device, ctx.hidden_dtype, ctx.weight_dtype = device, out_dtype, top_k_weights.dtype
        t, k = ids.shape
        order, math = module.expert_math(ids, backend, prefetch)  # order: [S] slot ids sorted by expert
        x = hidden.detach().to(where, math.act_dtype)  # [T, H] (fp32 on the CPU path)
        _watch.note(module, _watch.FORWARD_INPUT, x)  # a device-side flag, no host sync (see watch.py)
        x_sorted = x[order // k]  # [S, H]
        # When a backward will follow, keep each slot's pre-activation and output instead of recomputing them: one
        # fewer pass over the expert weights per step. Under gradient checkpointing these live for one layer at a
        # time; without it, S·(2I+H) activations per MoE layer.
        keep = any(ctx.needs_input_grad)
        gu_sorted, y_sorted = math.forward(x_sorted, keep)  # [S, 2I] (empty unless kept), [S, H]; act dtype
        del x_sorted
        out = unsort_sum(y_sorted * w.view(-1)[order, None].to(x.dtype), order, t, k)  # [T, H] fp32
        # The LoRA factors this pass computed with (device copies on the GPU path) serve the backward too: no second
        # copy queued behind the next prefetch. Saved like the activations, so gradient checkpointing drops them
        # after the forward and keeps the recompute's (as ctx attributes every layer's would live until backward).
        ctx.lora_scales = {p: f.scale for p, f in math.lora.items()}
        ctx.save_for_backward(x, ids, w, gu_sorted, y_sorted if keep else y_sorted[:0],
                              *(factor for f in math.lora.values() for factor in (f.A, f.B)))
        _watch.note(module, _watch.FORWARD_OUTPUT, out)
        # Back to the model device (a no-op on the GPU path). non_blocking is unsafe: `out` is pageable, freed next.
        return out.to(device, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, ids, w, gu_sorted, y_sorted, *factors = ctx.saved_tensors
        lora = {p: LoRAFactors(factors[2 * i], factors[2 * i + 1], scale)
                for i, (p, scale) in enumerate(ctx.lora_scales.items())}
        module: HybridExperts = ctx.module
        _watch.note(module, _watch.BACKWARD_OUTPUT_GRAD, grad_out)
        t, k = ids.shape
        # Same sort; weights again (a cache hit); the forward's LoRA factors (no copy queued behind the prefetch).
        order, math = module.expert_math(ids, ctx.backend, ctx.prefetch, lora=lora)
        tok = order // k
        g_sorted = grad_out.detach().to(ctx.where, x.dtype)[tok]  # [S, H] dL/d(expert output · w), per slot
        grad_w = torch.empty_like(w).view(-1)  # [T*K] fp32
        grad_w[order] = (g_sorted * y_sorted).sum(-1, dtype=torch.float32)
        dy_sorted = g_sorted * w.view(-1)[order, None].to(x.dtype)  # [S, H]
        del g_sorted, y_sorted  # the largest buffers of a streamed layer's backward: freed as soon as they are used
        present = [p for p in PROJECTIONS if p in math.lora]  # same order as the *lora_tensors inputs
        # Only LoRA factors that need a gradient get a buffer (on `where`); others are skipped in the math.
        lora_grads = {}
        for i, p in enumerate(present):
            if any(ctx.needs_input_grad[_LORA_ARG + 2 * i : _LORA_ARG + 2 + 2 * i]):
                lora_grads[p] = (torch.zeros_like(math.lora[p].A, dtype=torch.float32),
                                 torch.zeros_like(math.lora[p].B, dtype=torch.float32))
        dx_sorted = math.backward(dy_sorted, x[tok], gu_sorted, lora_grads)  # [S, H]
        del dy_sorted

        lora_out = []
        for i, p in enumerate(present):
            ga, gb = lora_grads.get(p, (None, None))
            lo = module.lora[p]
            r = lo.rank  # drop the rows/columns of a padded rank
            ga = ga[:, :r] if ctx.needs_input_grad[_LORA_ARG + 2 * i] else None
            gb = gb[:, :, :r] if ctx.needs_input_grad[_LORA_ARG + 1 + 2 * i] else None
            if ctx.where.type == "cuda":
                # The masters live on the CPU. A synchronous .cpu() here would stall the host once per layer and
                # keep it from queueing the next layer's weight copy; the gradients go back asynchronously instead
                # and land in .grad when this backward pass ends (_land_staged_grads).
                _stage_grads(lo, (ga, gb))
                lora_out += [None, None]
            else:
                lora_out += [ga, gb]
        grad_hidden = unsort_sum(dx_sorted, order, t, k).to(ctx.device, ctx.hidden_dtype)
        _watch.note(module, _watch.BACKWARD_INPUT_GRAD, grad_hidden)
        grad_weights = grad_w.view_as(w).to(ctx.device, ctx.weight_dtype) if ctx.needs_input_grad[2] else None
        return (grad_hidden, None, grad_weights, None, None, None, *lora_out)


_LORA_ARG = 6  # index of the first LoRA tensor among _ExpertsFn.forward's inputs (after ctx)


class _Staged(threading.local):
    """Expert-LoRA gradients copied device->host during a backward pass, not yet added to the masters' .grad, by the
    autograd graph task (backward pass) that staged them. Per thread: autograd runs a backward pass (and its end-of-pass
    callbacks) on the thread that called backward(), so two backward passes on two threads never share them.

    By task, because a pass's gradients must be added when that pass ends and never otherwise: a pass that raised
    leaves its entries behind (never added: the next pass does not pick up a partial gradient), and a nested pass
    (reentrant gradient checkpointing) lands its own at its end while the enclosing pass keeps its own.
    """

    MAX_TASKS = 8  # dicts kept: those of passes that raised are dropped oldest first

    def __init__(self):
        # task id -> {id(master): [master, staged gradient, event after its copy]}
        self.by_task: dict[int, dict[int, list]] = {}


_STAGED = _Staged()


def _stage_grads(lo: ExpertLoRA, grads: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """Start the device->host copies of one LoRA's gradients (dA, dB) into page-locked buffers; they are added to the
    masters' .grad when this backward pass ends.

    Not earlier, as their copies finish: the host is on a streamed backward's critical path (S9-d's trace: the first
    layers of the backward issued each prefetch the moment the GPU could start it), and adding them during the pass
    measured slower (S9-e: 3376 against 3474 tok/s for V2-Lite bf16)."""
    st = _STAGED
    task = torch._C._current_graph_task_id()
    pending = st.by_task.get(task)
    if pending is None:  # the first staged gradient of this pass: land its gradients when it ends
        pending = st.by_task[task] = {}
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_land_staged_grads, task))
        while len(st.by_task) > _Staged.MAX_TASKS:
            del st.by_task[next(iter(st.by_task))]
    lo.wait_update()  # an optimizer step still reading last step's gradients (hybridmoe.cpu_optim) ends first
    for which, (master, g) in enumerate(zip((lo.A, lo.B), grads)):
        if g is None:
            continue
        if id(master) in pending:  # the same module twice in one pass: add the first before staging the second
            _land_staged_grads(task)
            pending = st.by_task[task] = {}
        busy = {e[1].data_ptr() for other in st.by_task.values() if (e := other.get(id(master))) is not None}
        if master.grad is not None:
            busy.add(master.grad.data_ptr())
        stage = lo.grad_stage(which, busy)
        stage.copy_(g, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        pending[id(master)] = [master, stage, ev]
        EARLY_ROW_NORMS.submit(stage, ev)  # the clip's CPU norm of it, taken while the backward goes on


def _land_staged_grads(task: int) -> None:
    """Add the gradients pass `task` staged to the masters' .grad (run by autograd when that pass ends). A master
    without a gradient takes the staged buffer itself as its .grad (see :meth:`ExpertLoRA.grad_stage`)."""
    for master, staged, ev in _STAGED.by_task.pop(task, {}).values():
        ev.synchronize()
        if master.grad is None:
            master.grad = staged
        else:
            master.grad += staged


class HybridExperts(nn.Module):
    """Drop-in replacement for a transformers fused experts block; weights in CPU RAM, computed on CPU or GPU.

    Holds no parameters or buffers: the weights (:class:`ExpertWeights`) and LoRA (:class:`ExpertLoRA`) are plain
    attributes, invisible to ``model.to()``, ``state_dict()`` and PEFT.
    """

    def __init__(self, spec: ExpertsSpec, mlp: ExpertMLP | nn.Module, weight_dtype: torch.dtype, source_class: str = "",
                 device: str = "cpu", settings: ExpertSettings | None = None):
        super().__init__()
        self.settings = settings if settings is not None else ExpertSettings()  # the model's, shared by its blocks
        self.spec = spec
        self.num_experts = spec.num_experts
        # What the expert computes between its projections; an activation module alone means the plain gated MLP.
        self.mlp = mlp if isinstance(mlp, ExpertMLP) else ExpertMLP(mlp, spec.gated)
        self.source_class = source_class
        self.weights = ExpertWeights(spec, weight_dtype, device)
        self.lora: dict[str, ExpertLoRA] = {}
        # Set by streaming.enable_streaming: large batches then run on the GPU with this layer's weights streamed in.
        self.streamer = None
        self.stream_index = -1
        self.watch = None  # set by watch.NonFiniteWatch.attach (training): where NaN/Inf first appeared
        # Set by hybridmoe.decode_graph while it runs a decode step: the call is handed to it (the step is cut into
        # CUDA graphs at this layer's routed experts), instead of running here.
        self.decode_hook = None
        # Set by the server for one inference forward whose batch rows use different adapters (or none): each row's
        # expert LoRA (hybridmoe.experts.row_lora). None: every token uses self.lora.
        self.row_lora: RowLoRA | None = None
        # The batched graph decoder's expert LoRA of resident layers: (an adapter's {projection: ExpertLoRA}, its static
        # row mask on the device) per adapter (hybridmoe.serve.adapters.AdapterSet.use_static; decode_graph).
        self.graph_lora: list[tuple[dict, torch.Tensor]] | None = None

    # -- LoRA -------------------------------------------------------------------------------------------------
    def add_lora(self, proj: str, rank: int, alpha: float) -> ExpertLoRA:
        e, out_f, in_f = self.spec.shape(proj)
        lo = ExpertLoRA(e, in_f, out_f, rank, alpha)
        self.lora[proj] = lo
        return lo

    def lora_tensors(self) -> list[torch.Tensor]:
        out = []
        for proj in PROJECTIONS:
            if proj in self.lora:
                out.extend(self.lora[proj].parameters())
        return out

    # -- compute ----------------------------------------------------------------------------------------------
    def expert_math(self, ids: torch.Tensor, backend: str, prefetch: bool = True, cpu_experts: int = 0,
                    prefetch_cpu_experts: int | None = None, slots: int | None = None,
                    lora: dict[str, LoRAFactors] | None = None) -> tuple[torch.Tensor, LoopMath | GroupedMath]:
        """Sort the flattened [T*K] (token, k) slots by expert; (order [S], the math over the sorted rows).

        "grouped": grouped GEMMs on the device, group ends as a device tensor (no host sync); "cpu" and "device-loop":
        the per-expert loop over the host weights or the streamed slot. cpu_experts: c > 0 computes experts [0, E - c)
        only (their weights and LoRA; :mod:`hybridmoe.experts.split` gives the others to the CPU), over the first
        `slots` sorted slots (those routed to them, counted on the host); prefetch_cpu_experts: the c of the next
        layer's prefetch (:meth:`ExpertStreamer.acquire`). lora: the factors an earlier call of this pass made
        (the backward reuses its forward's: no second copy), else made here.
        """
        flat = ids.view(-1)  # [T*K]
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, deterministic
        if slots is not None:
            order = order[:slots]  # [S]
        first = self.num_experts - cpu_experts
        grouped = backend == "grouped"
        if lora is None:
            # Before weights_on: that queues the next layer's prefetch, and host->device copies run in issue order on
            # the copy engine whatever their stream, so these few MB issued after it would wait the whole ~20 ms
            # layer copy and the compute with them (S9-a: no overlap of copies and kernels in a training step).
            lora = self.lora_on(ids.device, self.weights.compute_dtype if grouped else torch.float32, pad_rank=grouped)
        w_gu, w_d, bias = self.weights_on(backend != "cpu", prefetch, cpu_experts, prefetch_cpu_experts, lazy=grouped)
        if cpu_experts:
            lora = {p: LoRAFactors(f.A[:first], f.B[:first], f.scale) for p, f in lora.items()}
        if grouped:
            # Group ends by binary search in the sorted ids: unlike bincount on CUDA, no host sync.
            sorted_ids = flat[order]  # [S]
            experts = torch.arange(first, device=flat.device)
            offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)  # [E - c]
            row_bias = None if bias is None else {p: b[sorted_ids].to(w_gu.dtype) for p, b in bias.items()}  # [S, out]
            return order, GroupedMath(w_gu, w_d, lora, self.mlp, offs, row_bias)
        counts = torch.bincount(flat if slots is None else flat[order], minlength=first).tolist()
        weights = self.weights if backend == "cpu" else SlotWeights(w_gu, w_d, bias)
        return order, LoopMath(weights, lora, self.mlp, expert_groups(counts, range(first)))

    def weights_on(self, on_device: bool, prefetch: bool = True, cpu_experts: int = 0,
                   prefetch_cpu_experts: int | None = None, lazy: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          dict | None]:
        """(gate_up [E, U, H], down [E, H, I], bias or None): the host tensors, or this layer's streamed slot on the
        device (int8 and 4-bit dequantized there to bf16: the compact format crossed the bus, a half or a quarter of
        the bytes; the grouped GEMMs want bf16). prefetch: also start copying the next layer; cpu_experts,
        prefetch_cpu_experts: as :meth:`ExpertStreamer.acquire` takes them (the first E - c experts only). lazy:
        compact weights come as :class:`Dequantized` (made when a GEMM takes them; for :class:`GroupedMath`)."""
        if on_device:
            gate_up, down, scales, bias = self.weights.unpack(self.streamer.acquire(
                self.stream_index, cpu_experts, prefetch_cpu_experts, prefetch=prefetch))
            if scales is not None:
                gu_s, d_s, to_float = scales["gate_up_proj"], scales["down_proj"], self.weights.to_float
                if lazy:  # made part by part of output rows when a GEMM takes them (a row slice: no copy)
                    dt, per_byte = self.weights.compute_dtype, 2 if self.weights.packed is not None else 1
                    shape = lambda w: (*w.shape[:2], w.shape[2] * per_byte)  # noqa: E731  [E, out, in] in floats
                    return (Dequantized(lambda rows: to_float(gate_up[:, rows], gu_s[:, rows]), dt, shape(gate_up)),
                            Dequantized(lambda rows: to_float(down[:, rows], d_s[:, rows]), dt, shape(down)), bias)
                gate_up, down = to_float(gate_up, gu_s), to_float(down, d_s)
            return gate_up, down, bias
        return self.weights.gate_up, self.weights.down, self.weights.bias

    def lora_on(self, where: torch.device, dtype: torch.dtype, pad_rank: bool = False) -> dict[str, LoRAFactors]:
        """The LoRA factors on `where` in `dtype`: the fp32 CPU masters themselves, or (autograd-detached) copies.

        pad_rank: zero-pad r so a rank row is a multiple of 16 bytes, as grouped GEMMs require (r=4 in bf16 is 8
        bytes). Zero rows of A and columns of B add nothing to the product; their gradients are dropped.
        """
        out = {}
        for p, lo in self.lora.items():
            a, b = lo.factors_on(where, dtype, pad_rank)
            out[p] = LoRAFactors(a, b, lo.scale)
        return out

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        # top_k dispatch: hidden_states [T, H] on the model device -> [T, H] on the same device and dtype.
        # dense dispatch (Llama-4): routed_in [E·T, H] -> [E·T, H].
        for lo in self.lora.values():  # the previous optimizer step's update of this layer, if still running
            lo.wait_update()
        if self.spec.dispatch == "dense":
            return self._dense_forward(hidden_states)
        return self._topk_forward(hidden_states, top_k_index, top_k_weights)

    def _topk_forward(self, hidden_states, top_k_index, top_k_weights, token_groups=None):
        if self.decode_hook is not None:
            return self.decode_hook(self, hidden_states, top_k_index, top_k_weights)
        if self.row_lora is not None:  # rows of several adapters: the call below once per adapter's tokens
            return self.row_lora.forward(self, hidden_states, top_k_index, top_k_weights, token_groups,
                                         self._one_lora_forward)
        return self._one_lora_forward(hidden_states, top_k_index, top_k_weights)

    def _one_lora_forward(self, hidden_states, top_k_index, top_k_weights, whole: int | None = None):
        """[T, H] -> [T, H]: every token with ``self.lora``. ``whole``: the tokens of the whole call when this is one
        adapter's part of it; if the whole call streams the layer's weights to the device, so does each part (the
        later parts find them in the slot cache), rather than small parts falling back to the CPU."""
        grad = torch.is_grad_enabled()
        tokens = hidden_states.shape[0] if whole is None else whole
        backend = choose_backend(self, hidden_states.shape[0], grad=grad)
        if whole is not None and backend in ("kernel", "cpu"):
            streamed = choose_backend(self, whole, grad=grad)
            backend = streamed if streamed in ("grouped", "device-loop") else backend
        # A call of streaming size prefetches the next layer; a small one on a resident layer must not (the next
        # layer then runs on the CPU: a copy per decode step for nothing).
        prefetch = self.streamer is not None and tokens >= self.streamer.min_tokens
        if backend == "kernel":
            # Inference on the CPU path (eager decode, short prompts, the server): the compiled kernel, no autograd.
            # One copy each to the CPU, already in the kernel's dtypes.
            out = torch.empty(hidden_states.shape, dtype=torch.float32)  # [T, H] cpu
            cpu_kernel.moe_forward(self, hidden_states.to("cpu", torch.float32).contiguous(),
                                   top_k_index.to("cpu", torch.int64).contiguous(),
                                   top_k_weights.to("cpu", torch.float32).contiguous(), out)
            return out.to(hidden_states.device, hidden_states.dtype)
        if backend in ("grouped", "device-loop") and not grad and prefetch:
            # a streaming-size inference call: a share of the experts may run on the CPU meanwhile
            from . import split  # (it builds on this module)

            out = split.forward(self, hidden_states, top_k_index, top_k_weights, backend)
            if out is not None:
                return out
        return _ExpertsFn.apply(hidden_states, top_k_index, top_k_weights, self, backend, prefetch,
                                *self.lora_tensors())

    def _dense_forward(self, routed_in: torch.Tensor) -> torch.Tensor:
        """Dense dispatch (Llama-4): routed_in [E·T, H] holds every expert's copy of every token, scaled by its
        routing weight, zero where the router did not pick the expert; returns each copy's expert output [E·T, H].

        Only the non-zero rows are computed, as one slot each (K = 1, weight 1). That is exact, not an approximation:
        without expert biases an expert maps a zero row to exactly zero, with a zero gradient (act(0)·0 = 0 and
        d[act(g)·u] = act'(0)·u·dg + act(0)·du = 0 at g = u = 0), which is what transformers' dense bmm computes."""
        e, h = self.num_experts, routed_in.shape[-1]
        rows = routed_in.view(e, -1, h)  # [E, T, H]
        picked = (rows != 0).any(-1).nonzero()  # [S, 2] (expert, token); a host sync, like the CPU path's copies
        x = rows[picked[:, 0], picked[:, 1]]  # [S, H]
        ids = picked[:, :1]  # [S, 1]
        w = torch.ones(ids.shape, dtype=routed_in.dtype, device=routed_in.device)  # [S, 1]
        groups = None  # per-row LoRA: the group of each picked (expert, token) is its token's
        if self.row_lora is not None:
            groups = self.row_lora.token_groups(rows.shape[1])[picked[:, 1].cpu()]  # [S]
        y = self._topk_forward(x, ids, w, groups)  # [S, H]
        out = routed_in.new_zeros(rows.shape)  # [E, T, H]
        out = out.index_put((picked[:, 0], picked[:, 1]), y.to(out.dtype))
        return out.view(-1, h)

    @torch.no_grad()
    def infer_cpu(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  out: torch.Tensor) -> None:
        """Inference on the CPU path, no autograd: ``out`` [T, H] fp32 (CPU) = Σ_k w[t,k] · Expert_{ids[t,k]}(x[t]).

        hidden [T, H] (any float dtype), top_k_index [T, K] int64, top_k_weights [T, K] fp32, all on the CPU; out
        contiguous. The same math and rounding as the CPU path of :meth:`forward` (fp32 activations, GEMMs in the
        weight dtype): the compiled kernel (:mod:`hybridmoe.experts.cpu_kernel`) where it runs, else the torch loop.
        """
        if choose_backend(self, hidden.shape[0], grad=False, stream=False) == "kernel":  # same rounding as the loop
            cpu_kernel.moe_forward(self, hidden.float().contiguous(), top_k_index.contiguous(),
                                   top_k_weights.contiguous(), out)
            return
        t, k = top_k_index.shape
        order, math = self.expert_math(top_k_index, "cpu")  # order: [S] slots sorted by expert
        x_sorted = hidden.float()[order // k]  # [S, H] fp32
        y_sorted = math.forward(x_sorted, keep=False)[1]  # [S, H] fp32
        out.copy_(unsort_sum(y_sorted * top_k_weights.reshape(-1)[order, None], order, t, k))

    def merged_weight(self, proj: str) -> torch.Tensor:
        """W + ΔW for one projection, in fp32 on the CPU: [E, out, in]. Used by export and --merge."""
        w = self.weights.dequantized(proj).float()
        lo = self.lora.get(proj)
        if lo is not None:
            w = w + lo.scale * torch.bmm(lo.B.detach(), lo.A.detach())
        return w

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"experts={s.num_experts}, hidden={s.hidden_dim}, intermediate={s.intermediate_dim}, "
            f"format={self.weights.format_name}, device=cpu, streamed={self.streamer is not None}, lora={sorted(self.lora)}"
        )

