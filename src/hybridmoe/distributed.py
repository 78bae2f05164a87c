"""Data-parallel training on torch.distributed: one process per GPU, launched by torchrun.

What each rank holds, and what crosses ranks:

- GPU side (attention, routers, dense MLPs, shared experts, their Linear LoRA): one replica per rank; PyTorch's DDP
  all-reduces the Linear LoRA gradients (summed, see :func:`wrap_ddp`). Frozen weights are never communicated.
- Routed-expert weights: once per *host*, in a file under ``/dev/shm`` that every rank on the host maps with
  ``MAP_SHARED`` (:class:`HostSharedExperts`). Local rank 0 streams the checkpoint into it; the file is unlinked as
  soon as every local rank has mapped it, so no exit path (crash, SIGKILL) can leave it behind.
- Routed-expert LoRA (fp32 CPU tensors) and its AdamW state: one replica per rank, kept identical by summing the
  gradients over all ranks every step (:func:`all_reduce_cpu_grads`): through NCCL via the GPU when training on
  CUDA (NCCL reduces only GPU tensors), through gloo on the CPU otherwise.

The process group is ``cpu:gloo,cuda:nccl`` on CUDA (collectives dispatch on the tensor's device) and ``gloo`` on
the CPU. Its timeout (``ddp_timeout``) bounds every collective, so a stalled rank ends the job instead of hanging it;
a rank that exits non-zero is taken down with the others by torchrun.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import ConfigError, HybridMoEError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHM_PREFIX = "hybridmoe-experts-"
_ALIGN = 4096  # every expert tensor starts on a page: SIMD-aligned, and ready for huge pages / cudaHostRegister


class DistributedError(HybridMoEError):
    """A collective failed: another rank crashed or stalled (its own error is reported by that rank)."""


@dataclass
class DistContext:
    """This process's place in the job. ``world_size == 1`` is the single-process path: no group, no collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0  # torchrun's GROUP_RANK: which host
    device: torch.device | None = None  # this rank's compute device (cuda:LOCAL_RANK or cpu)
    timeout_s: float = 1800.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        return self.local_rank == 0

    # -- collectives (all on CPU tensors: gloo, with the group's timeout) ---------------------------------------
    def all_reduce_sum(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if self.enabled:
            with collective(self, what):
                dist.all_reduce(t)
        return t

    def barrier(self, what: str) -> None:
        # A tiny CPU all-reduce rather than dist.barrier(): on the mixed backend that would be an NCCL op on the GPU;
        # this one runs in gloo and honours the timeout.
        self.all_reduce_sum(torch.zeros(1), what)

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        if not self.enabled:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        with collective(self, what):
            dist.all_gather(out, t)
        return out

    def broadcast(self, t: torch.Tensor, what: str, src: int = 0) -> torch.Tensor:
        if self.enabled:
            with collective(self, what):
                dist.broadcast(t, src)
        return t


@contextmanager
def collective(ctx: DistContext, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one line that says which rank and what it was doing."""
    try:
        yield
    except RuntimeError as e:
        if not is_comm_error(e):
            raise
        raise DistributedError(comm_message(ctx, what, e)) from None


def is_comm_error(e: BaseException) -> bool:
    text = str(e)
    # gloo words a timed-out wait several ways ("Timed out waiting ...", "Application timeout caused pair closure")
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "NCCL", "Connection closed by peer", "Connection reset", "ProcessGroup",
                            "Timed out", "timeout caused pair closure"))


def comm_message(ctx: DistContext, what: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"{what} failed ({first[:200]}); another rank crashed or stalled (its error is "
            f"reported above), or a step takes longer than ddp_timeout={ctx.timeout_s:g}s")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None, timeout_s: float) -> DistContext:
    """Join the torchrun job (a no-op for a single process). Picks this rank's device and the backend."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(timeout_s=timeout_s)
    missing = [k for k in ENV_VARS if k not in env]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun "
                          "(or `hybridmoe train --nproc N`), which sets them")
    ctx = DistContext(rank=int(env["RANK"]), world_size=world, local_rank=int(env["LOCAL_RANK"]),
                      local_world_size=int(env["LOCAL_WORLD_SIZE"]), node_rank=int(env.get("GROUP_RANK", "0")),
                      timeout_s=timeout_s)
    ctx.device = _rank_device(device, ctx)
    backend = "gloo"
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
        backend = "cpu:gloo,cuda:nccl"  # CPU tensors (flags, barriers, gloo expert grads) go to gloo, GPU ones to NCCL
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return ctx


def _rank_device(device: str | None, ctx: DistContext) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ConfigError(f"device '{device}' with {ctx.world_size} ranks: use device=cuda (each rank takes "
                          "cuda:LOCAL_RANK) or device=cpu; choose GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use device=cpu")
    n = torch.cuda.device_count()
    if ctx.local_world_size > n:
        raise ConfigError(f"{ctx.local_world_size} ranks on this host but only {n} visible GPU(s); "
                          f"launch with --nproc-per-node {n} or fewer")
    return torch.device("cuda", ctx.local_rank)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------------
# GPU side: DDP over the Linear LoRA
# ------------------------------------------------------------------------------------------------------------------
def _sum_hook(group, bucket):
    """DDP's default hook averages; we sum, because each rank's loss is already divided by the *global* number of
    supervised tokens, so the sum over ranks is the exact gradient of the global-batch loss."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP over the trainable nn.Parameters (the Linear LoRA); the module itself when there are none.

    `model` must compute the whole training loss in its forward: DDP arms its gradient all-reduce in forward, so a
    loss computed around it (e.g. from the decoder's hidden states) would leave the gradients unreduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not ctx.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    # Frozen weights and buffers are identical on every rank (same checkpoint); syncing them (at start-up, buffers
    # before every forward) would send the whole GPU side of the model over the network for nothing.
    ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # find_unused_parameters=False: every LoRA Linear is used by every forward (attention, dense and shared MLPs).
    ddp = DDP(model, device_ids=ids, find_unused_parameters=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


# ------------------------------------------------------------------------------------------------------------------
# CPU side: expert-LoRA gradients
# ------------------------------------------------------------------------------------------------------------------
def expert_grad_device(ctx: DistContext, mode: str) -> torch.device:
    """Where expert-LoRA gradients are reduced. NCCL cannot reduce CPU tensors: on CUDA ('auto') each gradient is
    staged on the GPU and reduced by NCCL (NVLink / InfiniBand bandwidth); 'gloo' keeps them on the CPU (TCP)."""
    if mode == "auto" and ctx.device is not None and ctx.device.type == "cuda":
        return ctx.device
    return torch.device("cpu")


def all_reduce_cpu_grads(tensors: list[torch.Tensor], ctx: DistContext, via: torch.device) -> None:
    """Sum the gradients of the expert-LoRA tensors (outside DDP's reach) over all ranks, in place."""
    if not ctx.enabled:
        return
    grads = []
    for t in tensors:
        if t.grad is None:  # keep every rank's sequence of collectives identical
            t.grad = torch.zeros_like(t)
        grads.append(t.grad)
    with collective(ctx, "expert-LoRA gradient all-reduce"):
        works = []
        for g in grads:
            if g.is_cuda or via.type == "cpu":
                # Already on the GPU: NCCL; a CPU tensor with via=cpu: gloo, straight on it. Both asynchronous.
                works.append(dist.all_reduce(g, async_op=True))
                continue
            # Host->device copy (pageable, so synchronous), NCCL all-reduce, device->host copy back. One tensor at a
            # time: the GPU holds at most one expert-LoRA gradient (<= E·r·max(in, out)·4 bytes) beyond its own.
            staged = g.to(via)
            dist.all_reduce(staged)
            g.copy_(staged)
        for w in works:
            w.wait()


def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """An order-independent integer digest of the tensors' bits: ranks whose tensors are bitwise equal agree."""
    total = torch.zeros((), dtype=torch.int64)
    for t in tensors:
        bits = t.detach().contiguous().reshape(-1)
        bits = bits.view(torch.int32) if bits.element_size() == 4 else bits.view(torch.int16)
        total += bits.to(torch.int64).sum().cpu()  # int64 sums wrap identically on every rank
    return total


def check_consistent(tensors: list[torch.Tensor], ctx: DistContext, what: str) -> None:
    """Raise unless every rank holds bitwise the same `tensors` (LoRA weights, optimizer moments)."""
    if not ctx.enabled:
        return
    fp = fingerprint(tensors)
    lo_hi = torch.stack([-fp, fp])
    with collective(ctx, f"{what} consistency check"):
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
    if -lo_hi[0] != lo_hi[1]:
        raise DistributedError(f"{what} differ between ranks; the ranks diverged (different "
                               "checkpoint files or code versions on different hosts?)")


# ------------------------------------------------------------------------------------------------------------------
# Routed-expert weights: once per host
# ------------------------------------------------------------------------------------------------------------------
def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class HostSharedExperts:
    """Every routed-expert weight of the model in one ``MAP_SHARED`` file per host, mapped by all local ranks.

    Use :meth:`hold` around loading: local rank 0 fills the weights from the checkpoint, the other ranks skip the
    expert tensors and find them filled when ``hold`` returns.
    """

    def __init__(self, ctx: DistContext, directory: str | os.PathLike = "/dev/shm"):
        self.ctx = ctx
        self.directory = Path(directory)
        self.path: Path | None = None
        self.nbytes = 0

    @contextmanager
    def hold(self, experts: dict) -> Iterator[bool]:
        """Bind every ``HybridExperts``' weights (built on the meta device) to views of the shared file; yields
        whether this rank must fill them (the host's local rank 0)."""
        ctx = self.ctx
        layout, self.nbytes = self._layout(experts)
        token = ctx.broadcast(torch.randint(0, 2**62, (1,), dtype=torch.int64), "shared-experts setup")
        self.path = self.directory / f"{SHM_PREFIX}{int(token):016x}-node{ctx.node_rank}"
        with _sigterm_raises():  # torchrun stops ranks with SIGTERM: let the `finally` below still run
            fd = self._create() if ctx.is_local_leader else None
            try:
                ctx.barrier("shared-experts setup")  # the file exists (and has its size) on every host
                buf = torch.from_file(str(self.path), shared=True, size=self.nbytes, dtype=torch.uint8)  # MAP_SHARED
                ctx.barrier("shared-experts setup")  # every local rank has it mapped
            finally:
                if fd is not None:
                    self.path.unlink(missing_ok=True)  # the pages now live exactly as long as the mappings
        if fd is not None:
            self._reserve(fd)
        for ex, offsets in layout:
            # The one change to ExpertWeights: its storage is a view of the host-shared mapping instead of private
            # memory. Same dtypes, shapes and layout; nothing else about the experts changes.
            ex.weights.replace_host_tensors([buf[off : off + meta.nbytes].view(meta.dtype).view(meta.shape)
                                             for meta, off in zip(ex.weights.host_tensors(), offsets)])
        yield ctx.is_local_leader
        ctx.barrier("loading the shared experts")  # the leader has filled (and checked) every expert slice
        if not ctx.is_local_leader:
            for ex, _ in layout:
                for flags in ex.weights.loaded.values():
                    flags[:] = True

    @staticmethod
    def _layout(experts: dict) -> tuple[list, int]:
        """[(HybridExperts, byte offset of each of its host_tensors())], total bytes (int8 scales included)."""
        out, off = [], 0
        for ex in experts.values():
            offsets = []
            for meta in ex.weights.host_tensors():
                offsets.append(off)
                off = _aligned(off + meta.nbytes)
            out.append((ex, offsets))
        return out, off

    def _create(self) -> int:
        try:
            st = os.statvfs(self.directory)
        except OSError as e:
            raise ConfigError(f"expert_shm_dir '{self.directory}' is not usable ({e.strerror}); point it at a "
                              "tmpfs such as /dev/shm") from None
        free = st.f_bavail * st.f_frsize
        if free < self.nbytes:
            raise ConfigError(_no_room(self.directory, self.nbytes, free))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, self.nbytes)
        return fd

    def _reserve(self, fd: int) -> None:
        """Allocate every page now: a full tmpfs fails here with a clear error instead of a SIGBUS mid-load."""
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
        except OSError as e:
            st = os.statvfs(self.directory)
            raise ConfigError(_no_room(self.directory, self.nbytes, st.f_bavail * st.f_frsize, e.strerror)) from None
        finally:
            os.close(fd)


def _no_room(directory: Path, need: int, free: int, why: str = "") -> str:
    return (f"expert_shm_dir '{directory}' has {free / 2**30:.1f} GiB free{f' ({why})' if why else ''}, the routed "
            f"experts need {need / 2**30:.1f} GiB once per host; enlarge it (e.g. `mount -o remount,size=... "
            f"{directory}`, or docker --shm-size) or set expert_shm_dir to a larger tmpfs/hugetlbfs")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM's default action ends the process without running `finally` blocks; inside this block it raises
    SystemExit instead (once the main thread is back in Python), so the shared file is still unlinked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------------------------------------------
# Host memory, measured by the kernel
# ------------------------------------------------------------------------------------------------------------------
def process_memory() -> dict[str, int]:
    """This process's private bytes and the PSS of its shared-expert mapping, from /proc/self/smaps.

    Private (Private_Clean + Private_Dirty) is memory no other process shares: a private copy of the experts would
    show here. PSS divides each shared page by the number of processes mapping it, so summing the expert mapping's
    PSS over a host's ranks gives the bytes the experts occupy on the host, counted once.
    """
    private = shared_pss = 0
    in_shm = False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(maxsplit=1)[0]
                if not head.endswith(":"):  # a mapping header: "addr-addr perms offset dev inode [path]"
                    in_shm = SHM_PREFIX in line
                elif head in ("Private_Clean:", "Private_Dirty:"):
                    private += int(line.split()[1]) * 1024
                elif head == "Pss:" and in_shm:
                    shared_pss += int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return {"private": private, "shared_experts_pss": shared_pss}


def host_memory(ctx: DistContext) -> dict[str, float]:
    """Private and shared-expert memory summed over the ranks on rank 0's host (collective: call on every rank)."""
    m = process_memory()
    mine = torch.tensor([float(ctx.node_rank), float(m["private"]), float(m["shared_experts_pss"])],
                        dtype=torch.float64)
    rows = ctx.all_gather(mine, "memory report")
    host = [r for r in rows if r[0] == rows[0][0]]
    return {"host_private_gib": round(sum(float(r[1]) for r in host) / 2**30, 4),
            "host_shared_experts_gib": round(sum(float(r[2]) for r in host) / 2**30, 4),
            "ranks_on_host": len(host)}


def print_main(ctx: DistContext, *args) -> None:
    if ctx.is_main:
        print(*args, file=sys.stderr)
