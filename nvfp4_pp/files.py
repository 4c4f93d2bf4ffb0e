"""Files the run writes and trusts: atomic JSON, checksums, modes, and write failures as one line.

One writer for every JSON file (temp name, then rename: a reader never sees half a file), one
test for "this file is complete with the checksum it was written with", used by resume and by
every gather path, and one rule for file modes: the process umask, as any other tool honours it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

from nvfp4_pp.errors import NvFp4PpError


class WriteError(NvFp4PpError):
    """A file could not be written; a full disk is a fault (rerun resumes), anything else is not."""

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


@contextlib.contextmanager
def write_errors_named(path: Path, nbytes: int):
    """A failed write becomes one WriteError naming the file, the size and the fix."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # safetensors raises its own error type, with the OS message inside
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            raise WriteError(
                f"disk full while writing {path} ({nbytes / 1e9:.2f} GB); free space on "
                f"{path.parent} (or point 'output' elsewhere) and rerun the same command to resume",
                resumable=True) from None
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path}: {e.strerror}") from None
        raise


def process_umask() -> int:
    """The umask, read without changing it (os.umask sets it, which races the writer threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # no /proc: the only portable read sets it, so set it straight back
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file the mode a plain `open()` would: 0666 minus the umask. Some writers (safetensors)
    create private 0600 files, which another user's server then cannot read."""
    os.chmod(path, 0o666 & ~process_umask())


def write_json(path: Path, content: object) -> None:
    """Write `content` as indented JSON under a temp name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(content, indent=2) + "\n"
    with write_errors_named(path, len(text)):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    """Checksum of a written file (resume and transfers trust a shard only when it matches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024**2):
            h.update(block)
    return h.hexdigest()


def file_intact(path: Path, sha256: str, size: int | None = None) -> bool:
    """True when `path` exists (with `size` bytes, when given) and hashes to `sha256`."""
    path = Path(path)
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    return sha256_of(path) == sha256


class DiskSpaceError(NvFp4PpError):
    """Too little free space for what the run will write (found before calibrating, not 45 s into it)."""


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists: where a file at `path` would be created."""
    return next(p for p in [Path(path).absolute(), *Path(path).absolute().parents] if p.exists())


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem that holds (or would hold) `path`."""
    st = os.statvfs(nearest_existing(path))
    return st.f_bavail * st.f_frsize


def require_free(path: Path, need: int, what: str, fix: str) -> None:
    free = free_bytes(path)
    if free < need:
        raise DiskSpaceError(f"{what} needs about {need / 1e9:.2f} GB but {path}'s filesystem has {free / 1e9:.2f} GB "
                             f"free; {fix}")
