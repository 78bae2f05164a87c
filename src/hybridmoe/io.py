"""Atomic file output: nothing half-written is ever left where a reader would find it.

Files are written into a temporary sibling directory, fsynced, then moved into place with ``os.replace`` (atomic on
POSIX within one filesystem). A crash, SIGKILL or full disk mid-write leaves the previous files intact and at most a
``.tmp-*`` directory, which the next write removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def _umask() -> int:
    """The process umask. Read from /proc where it is shown (no change to process state); elsewhere set and restored
    at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp create 0700/0600 (private while half-written); what gets published must have the
    permissions any file the user creates has, or a server running as another user (a vLLM container) cannot read
    the adapter."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cleanup_stale(parent: Path, stem: str) -> None:
    for p in parent.glob(f".tmp-{stem}-*"):
        shutil.rmtree(p, ignore_errors=True)


def atomic_write_dir(out_dir: Path, write: Callable[[Path], None], names: Iterable[str] | None = None) -> Path:
    """Call ``write(tmp)`` to produce files in a temp dir, then move each into `out_dir` atomically.

    names: the files to publish, in order (weights first, config last, so a reader never finds a new config beside
    old weights); None publishes every file ``write`` made, in the order it wrote them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=str(out_dir.parent)))
    try:
        write(tmp)
        if names is None:
            made = [p for p in tmp.iterdir() if p.is_file()]
            names = [p.name for p in sorted(made, key=lambda p: (p.stat().st_mtime_ns, p.name))]
        for name in names:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        for name in names:
            os.replace(tmp / name, out_dir / name)
        _fsync_dir(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def atomic_replace_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Build a whole directory in a temp sibling, then rename it to `final` (replacing an older one)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=str(final.parent)))
    try:
        write(tmp)
        _as_umask(tmp, directory=True)  # this directory becomes `final`
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.with_name(f".tmp-{final.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        _as_umask(Path(tmp), directory=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
