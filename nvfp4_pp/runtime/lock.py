"""One run per output: an exclusive flock in every work directory, and beside the output on rank 0.

Ranks of one run share their host's work-directory lock: the first to take it holds it for all,
the others find their run's token in it. A second run finds another token and refuses at once,
naming the holder. The kernel drops a flock when its process dies, so a lock file that still
names a holder but is free to take was left by a run that was killed: it is taken over with a
line saying so. A clean exit removes the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path

from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.log import logger

WORK_DIR_LOCK = ".nvfp4_pp-lock"


def output_lock_path(output: Path) -> Path:
    """Beside the output, not in it: the output is renamed into place whole at the end."""
    return output.parent / f".{output.name}.nvfp4_pp-lock"


class LockError(NvFp4PpError):
    """Another run holds the output or a work directory, or the lock file cannot be created."""


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock: the run (a token every rank of it shares) and the process that took it."""

    run: str
    host: str
    pid: int
    started: str

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _same_file(fd: int, path: Path) -> bool:
    """False when `path` was removed (or replaced) since `fd` was opened: that lock is no longer the lock."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(path: Path) -> Holder | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return Holder(**json.loads(path.read_text()))
    return None


class FileLock:
    """An exclusive, non-blocking flock on one file that records its holder."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self, me: Holder) -> bool:
        """True when this process now holds the lock, False when another process holds it."""
        for _ in range(20):  # the file can vanish between open and flock when its holder removes it
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                continue  # the directory was removed by a finishing run: create it again
            except OSError as e:
                raise LockError(f"cannot create the lock file {self.path} for {self.what}: {e.strerror}; "
                                "the directory must be writable (choose another 'output' or gather.work_dir)") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            previous = _read_holder(self.path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(dataclasses.asdict(me)).encode(), 0)
            self._fd = fd
            if previous is not None and previous.run != me.run:
                logger.warning("taking over the lock of %s from a run that is gone (%s): it was killed before "
                               "it could remove %s", self.what, previous.describe(), self.path)
            return True
        raise LockError(f"cannot take the lock file {self.path} for {self.what}: it keeps disappearing; is another "
                        "run starting and stopping there?")

    def refuse_unless_ours(self, me: Holder) -> None:
        """Called where `take` failed: fine when a rank of this run holds it, else a LockError naming the holder."""
        holder = _read_holder(self.path)
        for _ in range(10):  # its holder writes the record right after taking the flock
            if holder is not None:
                break
            time.sleep(0.2)
            holder = _read_holder(self.path)
        if holder is not None and holder.run == me.run:
            return
        who = holder.describe() if holder else "a process that left no record"
        other = "gather.work_dir" if self.what.startswith("work directory") else "'output'"
        raise LockError(f"{self.what} is in use by another nvfp4_pp run ({who}); wait for it to finish or stop it, "
                        f"or choose another {other}")

    def release(self) -> None:
        """Remove the file (while still holding it, so no one takes a stale inode) and unlock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None
