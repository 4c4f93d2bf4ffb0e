"""How a rank stops when told to: one line per rank, and never outliving its launcher.

SIGINT and SIGTERM become one `Interrupted` fault raised in the main thread, which the entry point
reports with what a rerun resumes from. Once a rank is leaving (that fault, or an error it is
reporting), further signals are ignored, so torchrun stopping the remaining ranks after one has
failed adds no second message. A rank started by torchrun asks the kernel for SIGTERM when its
launcher dies (prctl PR_SET_PDEATHSIG) and a watchdog thread checks the parent pid too, so a
SIGKILLed launcher leaves no orphan writing the output; a rank stuck in a collective is ended
after `pipeline.timeout_s`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

from nvfp4_pp.runtime import dist
from nvfp4_pp.errors import Interrupted

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_leaving = False
_deferred: list[int] | None = None
"""Inside `deferred()`: the signals that arrived, raised when the block ends."""
_parent = os.getppid()
_follows_launcher = False
"""Set once PR_SET_PDEATHSIG is armed: a SIGTERM may then mean the launcher is dying."""


def _launcher_gone(wait_s: float = 0.0) -> bool:
    """Whether the launcher has died, waiting up to `wait_s` for its death to show.

    The kernel sends the death signal when the launcher's *thread* that started this rank exits; a
    SIGKILLed multi-threaded torchrun can do that while its other threads still live, and this rank is
    then handed to one of them (same pid) for a few milliseconds. So a dying launcher shows as a new
    parent pid, a parent that is a zombie, or none at all.
    """
    deadline = time.monotonic() + wait_s
    while True:
        if os.getppid() != _parent or _dying(_parent):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _dying(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return sys.platform.startswith("linux")
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _raise_interrupted(signum: int, frame) -> None:
    if _leaving:
        return
    if _deferred is not None:
        _deferred.append(signum)
        return
    leaving()
    wait_s = 1.0 if _follows_launcher and signum == signal.SIGTERM else 0.0
    why = f" (its launcher, pid {_parent}, is gone)" if _launcher_gone(wait_s) else ""
    raise Interrupted(signal.Signals(signum).name, dist.current_phase(), why)


def install() -> None:
    """SIGINT and SIGTERM raise `Interrupted` from now on (main thread only, as Python delivers them)."""
    global _leaving
    _leaving = False
    for s in STOP_SIGNALS:
        signal.signal(s, _raise_interrupted)


def leaving() -> None:
    """This rank is on its way out: later SIGINT/SIGTERM are ignored rather than raised mid-report."""
    global _leaving
    _leaving = True


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM until the block is done (a few renames that must not stop half-way)."""
    global _deferred
    _deferred = []
    try:
        yield
    finally:
        arrived, _deferred = _deferred, None
        if arrived:
            _raise_interrupted(arrived[0], None)


def restore() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)


def follow_launcher(timeout_s: int, rank: int) -> None:
    """Under torchrun: SIGTERM when the launcher dies, and exit at the latest `timeout_s` after that."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    global _follows_launcher
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        _follows_launcher = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    threading.Thread(target=_watch_parent, args=(timeout_s, rank), name="launcher-watch", daemon=True).start()


def _watch_parent(timeout_s: int, rank: int) -> None:
    """Poll the parent pid (covers a launcher that died before prctl, and systems without it)."""
    while not _launcher_gone():
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(timeout_s + 10)  # the main thread leaves by itself unless a collective never returns
    print(f"nvfp4_pp: error (rank {rank}): its launcher (pid {_parent}) is gone and the rank did not stop "
          f"within pipeline.timeout_s={timeout_s} s; exiting", file=sys.stderr, flush=True)
    os._exit(1)
