"""Atomic file output: nothing half-written is ever left where a reader would find it.

Files are written into a temporary sibling directory, fsynced, then moved into place with ``os.replace`` (atomic on
POSIX within one filesystem). A crash, SIGKILL or full disk mid-write leaves the previous files intact and at most a
``.tmp-*`` directory, which the next write removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import FileSystemError

# What to do about each filesystem errno a user can cause; the line names the path and the errno's meaning too.
_ADVICE = {
    errno.ENOSPC: "free space on that filesystem or choose another directory",
    errno.EDQUOT: "the disk quota is used up: free space or choose another directory",
    errno.EFBIG: "the file-size limit was reached (ulimit -f): raise it or choose another directory",
    errno.EROFS: "the filesystem is read-only: choose a writable directory",
    errno.EACCES: "check the permissions or choose another directory",
    errno.EPERM: "check the permissions or choose another directory",
    errno.EEXIST: "a file is in the way of a directory: remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "the path is a directory, not a file",
    errno.ENOENT: "the path (or its folder) does not exist or was removed while in use",
    errno.ELOOP: "the path is a loop of symbolic links",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: "the device reported an I/O error: check the disk",
}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O error


def errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one (its text ends in "(os error N)")."""
    if isinstance(exc, OSError):
        return exc.errno
    m = _OS_ERROR_IN_TEXT.search(str(exc))
    return int(m.group(1)) if m else None


def fs_error(exc: BaseException, what: str, path: str | os.PathLike) -> FileSystemError:
    """One line for a failed filesystem operation: what, the path, the errno's meaning and the fix."""
    code = errno_of(exc)
    meaning = os.strerror(code) if code else " ".join(str(exc).split())
    name = f" [{errno.errorcode.get(code, code)}]" if code else ""
    where = getattr(exc, "filename", None) or path
    if Path(where).name.startswith(".tmp-"):  # our own temp sibling: name what the user asked to write
        where = path
    advice = _ADVICE.get(code, "check the path")
    return FileSystemError(f"{what} '{where}': {meaning}{name}; {advice}")


@contextlib.contextmanager
def fs_errors(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError (or a safetensors I/O error) inside the block into one FileSystemError line."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as e:
        raise fs_error(e, what, path) from None
    except SafetensorError as e:
        if errno_of(e) is None:
            raise
        raise fs_error(e, what, path) from None


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
    recover_interrupted(parent, stem)


def _recover_one(parent: Path, p: Path) -> None:
    m = re.fullmatch(r"\.tmp-(.+)-old", p.name)
    if m and p.is_dir() and not (parent / m.group(1)).exists():
        os.replace(p, parent / m.group(1))  # killed between the two renames of atomic_replace_dir: put it back
    elif p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def recover_interrupted(parent: Path, stem: str | None = None) -> list[str]:
    """Undo what killed writes (of `stem`, or of anything) left in `parent`: a directory renamed aside
    (``.tmp-NAME-old``) whose replacement never arrived is put back, every other ``.tmp-*`` entry is removed.
    Returns the names found."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = sorted(parent.glob(f".tmp-{stem}-*" if stem else ".tmp-*"))
    for p in found:
        _recover_one(parent, p)
    return [p.name for p in found]


def atomic_write_dir(out_dir: Path, write: Callable[[Path], None], names: Iterable[str] | None = None) -> Path:
    """Call ``write(tmp)`` to produce files in a temp dir, then move each into `out_dir` atomically.

    names: the files to publish, in order (weights first, config last, so a reader never finds a new config beside
    old weights); None publishes every file ``write`` made, in the order it wrote them.
    """
    out_dir = Path(out_dir)
    with fs_errors("cannot write", out_dir):
        return _atomic_write_dir(out_dir, write, names)


def _atomic_write_dir(out_dir: Path, write: Callable[[Path], None], names: Iterable[str] | None) -> Path:
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
    with fs_errors("cannot write", final):
        return _atomic_replace_dir(final, write)


def _atomic_replace_dir(final: Path, write: Callable[[Path], None]) -> Path:
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
    with fs_errors("cannot write", path):
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
