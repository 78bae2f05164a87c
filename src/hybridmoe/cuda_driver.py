"""The few CUDA driver calls graph decode needs that torch does not expose (through ctypes, ``libcuda.so.1``).

* Stream memory operations: a stream waits until a 32-bit word in page-locked host memory reaches a value
  (``cuStreamWaitValue32``), or writes one there in stream order (``cuStreamWriteValue32``). Graph decode queues the
  next stretch of GPU work behind such a wait before the CPU has computed the experts it needs, and the CPU's one
  store releases it (:class:`HostFlags`): the GPU starts within microseconds, with no launch in between.
* Host -> device copies of raw pointers (``cuMemcpyHtoDAsync``): a few microseconds each, where a ``copy_`` between
  tensors costs ~15 µs of host time in dispatch and page-lock bookkeeping (the GPU share's expert weights, S12-a).

:func:`driver` returns None where any of this is missing (no CUDA, no libcuda, a driver without stream memory
operations): callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import logging
import weakref

import torch

log = logging.getLogger(__name__)

__all__ = ["Driver", "HostFlags", "driver"]

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0, so the counters may wrap
_DEVICEMAP = 0x02  # CU_MEMHOSTALLOC_DEVICEMAP
_PORTABLE = 0x01  # CU_MEMHOSTALLOC_PORTABLE
_driver: Driver | None | bool = False  # False: not tried yet


class Driver:
    """The driver library's entry points, typed. Raises OSError at construction if one is missing."""

    def __init__(self, lib: ctypes.CDLL):
        u64, p, u32 = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint32
        self._lib = lib
        self._wait = self._fn(("cuStreamWaitValue32_v2", "cuStreamWaitValue32"), [p, u64, u32, ctypes.c_uint])
        self._write = self._fn(("cuStreamWriteValue32_v2", "cuStreamWriteValue32"), [p, u64, u32, ctypes.c_uint])
        self._htod = self._fn(("cuMemcpyHtoDAsync_v2",), [u64, p, ctypes.c_size_t, p])
        self._host_alloc = self._fn(("cuMemHostAlloc",), [ctypes.POINTER(p), ctypes.c_size_t, ctypes.c_uint])
        self._free_host = self._fn(("cuMemFreeHost",), [p])
        self._device_ptr = self._fn(("cuMemHostGetDevicePointer_v2",), [ctypes.POINTER(u64), p, ctypes.c_uint])
        self._error = self._fn(("cuGetErrorString",), [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])

    def _fn(self, names: tuple[str, ...], argtypes: list):
        for name in names:
            f = getattr(self._lib, name, None)
            if f is not None:
                f.argtypes, f.restype = argtypes, ctypes.c_int
                return f
        raise OSError(f"libcuda has no {names[0]}")

    def check(self, rc: int, what: str) -> None:
        if rc:
            msg = ctypes.c_char_p()
            self._error(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what}: CUDA driver error {rc} ({(msg.value or b'?').decode()})")

    def wait(self, stream: int, address: int, value: int) -> None:
        """Queue on ``stream``: wait until the 32-bit word at device address ``address`` is >= ``value`` (mod 2³²)."""
        self.check(self._wait(stream, address, value & 0xFFFFFFFF, _WAIT_GEQ), "cuStreamWaitValue32")

    def write(self, stream: int, address: int, value: int) -> None:
        """Queue on ``stream``: write ``value`` to the 32-bit word at device address ``address``."""
        self.check(self._write(stream, address, value & 0xFFFFFFFF, 0), "cuStreamWriteValue32")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue on ``stream`` a copy of ``nbytes`` from host address ``src`` (page-locked, or it runs synchronously)
        to device address ``dst``."""
        self.check(self._htod(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")


class HostFlags:
    """``n`` 32-bit counters in page-locked host memory that streams can wait on and write, and the host can set.

    ``host[i]`` is the host's view (a ctypes array: a plain store, no torch call), :meth:`address` the device's."""

    def __init__(self, drv: Driver, n: int):
        self.drv, self.n = drv, n
        ptr = ctypes.c_void_p()
        drv.check(drv._host_alloc(ctypes.byref(ptr), 4 * max(n, 1), _DEVICEMAP | _PORTABLE), "cuMemHostAlloc")
        self._ptr = ptr
        self.host = (ctypes.c_uint32 * max(n, 1)).from_address(ptr.value)
        for i in range(max(n, 1)):
            self.host[i] = 0
        # freed by close(), or when this object goes (errors ignored then: at exit the context may be gone)
        self._finalizer = weakref.finalize(self, drv._free_host, ptr)
        dev = ctypes.c_uint64()
        drv.check(drv._device_ptr(ctypes.byref(dev), ptr, 0), "cuMemHostGetDevicePointer")
        self._dev = dev.value

    def address(self, i: int) -> int:
        return self._dev + 4 * i

    def set_all(self, value: int) -> None:
        """Release every wait for ``value`` or less (the host's store)."""
        for i in range(self.n):
            self.host[i] = value & 0xFFFFFFFF

    def close(self) -> None:
        """Free the memory (the caller makes sure no queued wait or write still refers to it)."""
        self.host = None
        self._finalizer()


def driver(device: torch.device) -> Driver | None:
    """The driver's entry points if ``device`` is CUDA and its driver runs stream memory operations, else None
    (checked once per process, with one queued wait and write on a scratch stream)."""
    global _driver
    if device.type != "cuda":
        return None
    if _driver is False:
        _driver = None
        try:
            drv = Driver(ctypes.CDLL("libcuda.so.1"))
            flags = HostFlags(drv, 1)
            try:
                stream = torch.cuda.Stream(device)
                drv.write(stream.cuda_stream, flags.address(0), 7)
                drv.wait(stream.cuda_stream, flags.address(0), 7)
                stream.synchronize()
                if flags.host[0] != 7:
                    raise RuntimeError("a stream's write to page-locked host memory did not land")
            finally:
                flags.close()
            _driver = drv
        except (OSError, RuntimeError) as e:
            log.info("graph decode without stream memory operations (%s): each stretch is launched after the CPU's "
                     "experts", e)
    return _driver
