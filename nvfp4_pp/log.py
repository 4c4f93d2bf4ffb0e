"""Logging for every rank: dated lines with the stage, each rank's whole log in its own file, the
important lines of every rank on rank 0's console, and third-party output counted, not shown.

- Console: rank 0 at INFO; the other ranks print nothing below ERROR there, because what matters
  of theirs (progress, phase ends, warnings: records logged with `extra=RELAY` or at WARNING+)
  is relayed to rank 0 through the process group's key-value store, whatever host they run on.
  `NVFP4_PP_LOG=LEVEL` gives every rank its own console at that level instead (no relay).
- File: every rank logs at INFO into `<work_dir>/rank<r>/log.txt` (kept when a run fails or stops;
  removed with the work directory after a success). Lines before the work directory exists are
  held in memory and written when it opens, so a refused config leaves no directory behind.
- Third-party output (warnings from modelopt, transformers, torch; library `print`s on stdout) goes
  to that file only; `third_party_summary()` is the one line the console gets about it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

logger = logging.getLogger("nvfp4_pp")
RELAY = {"relay": True}
"""`extra=` for an INFO line every rank's reader wants on rank 0's console (progress, phase ends)."""
DATE = "%Y-%m-%d %H:%M:%S"
LOG_FILE = "log.txt"
_STORE_PREFIX = "nvfp4_pp/log"
_KNOWN = ("modelopt", "transformers", "torch", "accelerate", "datasets", "safetensors", "huggingface_hub")


class _ThirdParty(logging.Handler):
    """Counts third-party records by package and passes them to the rank's file."""

    def __init__(self, target: logging.Handler):
        super().__init__(logging.WARNING)
        self.target = target
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        package = record.name.split(".")[0]
        if package == "py":  # py.warnings: the package is in the warning's file path
            message = record.getMessage()
            package = next((k for k in _KNOWN if f"/{k}/" in message), "python")
        self.counts[package] += 1
        self.target.handle(record)


class _PrintedLines:
    """sys.stdout while a run is set up: library `print`s go to the rank's file, counted."""

    def __init__(self, handler: _ThirdParty, original):
        self.handler, self.original, self._partial = handler, original, ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                record = logging.LogRecord("stdout", logging.WARNING, "", 0, line, None, None)
                self.handler.counts["printed"] += 1
                self.handler.target.handle(record)
        return len(text)

    def flush(self) -> None:
        self.original.flush()

    def isatty(self) -> bool:
        return False


class _Relay(logging.Handler):
    """A non-zero rank's important lines, formatted, into the store under its own numbered keys."""

    def __init__(self, store, rank: int):
        super().__init__(logging.INFO)
        self.store, self.rank, self.sent = store, rank, 0  # emit runs under the handler's own lock

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not getattr(record, "relay", False):
            return
        try:
            self.store.set(f"{_STORE_PREFIX}/{self.rank}/{self.sent}", self.format(record))
            self.sent += 1
            self.store.set(f"{_STORE_PREFIX}/{self.rank}/count", str(self.sent))
        except Exception:  # rank 0 gone: its console no longer exists; the file still has the line
            pass


class _Listener:
    """Rank 0: prints the other ranks' relayed lines on its console as they arrive (polled)."""

    def __init__(self, store, world_size: int, console: logging.StreamHandler):
        self.store, self.console = store, console
        self.read = {r: 0 for r in range(1, world_size)}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nvfp4_pp-log-relay", daemon=True)
        self.thread.start()

    def poll(self) -> None:
        for r, done in self.read.items():
            key = f"{_STORE_PREFIX}/{r}/count"
            try:
                if not self.store.check([key]):
                    continue
                count = int(self.store.get(key))
                lines = [self.store.get(f"{_STORE_PREFIX}/{r}/{i}").decode() for i in range(done, count)]
            except Exception:  # the store is gone at shutdown
                return
            self.read[r] = count
            if lines:
                self.console.acquire()
                try:
                    self.console.stream.write("".join(line + "\n" for line in lines))
                    self.console.flush()
                finally:
                    self.console.release()

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.poll()


class _Setup:
    """What `setup` changed, so `teardown` can put it back (tests run `main` in-process)."""

    def __init__(self) -> None:
        self.memory: logging.handlers.MemoryHandler | None = None
        self.file: logging.FileHandler | None = None
        self.third_party: _ThirdParty | None = None
        self.listener: _Listener | None = None
        self.stdout: TextIO | None = None
        self.root_handlers: list[logging.Handler] = []
        self.root_level = logging.WARNING


_state: _Setup | None = None


def _formatter(rank: int) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s [stage {rank}] %(message)s", DATE)


def setup(rank: int, world_size: int = 1) -> None:
    """Console, relay, in-memory file buffer and third-party capture for this rank."""
    global _state
    teardown()
    _state = state = _Setup()
    wanted = os.environ.get("NVFP4_PP_LOG", "").upper()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_formatter(rank))
    console.setLevel(wanted or (logging.INFO if rank == 0 else logging.ERROR))
    state.memory = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
    state.memory.setFormatter(_formatter(rank))
    handlers: list[logging.Handler] = [console, state.memory]
    store = _store() if world_size > 1 and not wanted else None
    if store is not None and rank > 0:
        relay = _Relay(store, rank)
        relay.setFormatter(_formatter(rank))
        handlers.append(relay)
    elif store is not None:
        state.listener = _Listener(store, world_size, console)
    logger.handlers[:] = handlers
    logger.propagate = False
    logger.setLevel(min(logging.INFO, console.level))
    # Third-party: warnings and library loggers to the file (counted), library prints likewise.
    state.third_party = _ThirdParty(state.memory)
    root = logging.getLogger()
    state.root_handlers, state.root_level = root.handlers[:], root.level
    root.handlers[:] = [state.third_party]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    _quiet_transformers()
    for progress_bars_off in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # bars: third-party output too
        os.environ.setdefault(progress_bars_off, "1")
    state.stdout = sys.stdout
    sys.stdout = _PrintedLines(state.third_party, sys.stdout)
    console.stream = state.stdout


def _store():
    """The process group's key-value store (the one torchrun's rendezvous made), or None."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def _quiet_transformers() -> None:
    """transformers logs through its own stderr handler: hand its records to the root logger instead."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()


def attach_file(directory: Path) -> Path:
    """Start this rank's log file in `directory` (appending on a rerun) with every line held so far."""
    path = Path(directory) / LOG_FILE
    if _state is None or _state.memory is None:
        return path
    file = logging.FileHandler(path, encoding="utf-8")
    file.setFormatter(_state.memory.formatter)
    file.setLevel(logging.INFO)
    assert file.stream is not None  # opened by the constructor (not delayed)
    file.stream.write(f"---- {time.strftime(DATE)} run started (pid {os.getpid()})\n")
    _state.memory.setTarget(file)
    _state.memory.flush()
    handlers = [h for h in logger.handlers if h is not _state.memory] + [file]
    logger.handlers[:] = handlers
    assert _state.third_party is not None  # setup sets it with the memory buffer
    _state.third_party.target = file
    _state.file, _state.memory = file, None
    return path


def third_party_summary(finished: bool = False) -> str | None:
    """One line about the third-party output this rank kept off the console, or None if there was none.
    A finished run has removed its work directory, and the log file with it: the line says so."""
    if _state is None or _state.third_party is None or not _state.third_party.counts:
        return None
    counts = _state.third_party.counts
    parts = ", ".join(f"{n} {'printed line(s)' if k == 'printed' else 'warning(s) from ' + k}"
                      for k, n in counts.most_common())
    if finished:
        where = "not kept (the log went with the work directory)"
    elif _state.file is not None:
        where = f"in {_state.file.baseFilename} (kept when a run fails or stops)"
    else:
        where = "not kept (the run stopped before it had a work directory)"
    return f"third-party output kept off the console: {parts}; {where}; NVFP4_PP_LOG=INFO shows it"


def end_of_run(line: str) -> None:
    """Rank 0's last lines: what the others relayed so far, the third-party summary, then `line`."""
    if _state is not None and _state.listener is not None:
        _state.listener.poll()
    summary = third_party_summary(finished=True)
    if summary:
        logger.info("%s", summary)
    logger.info("%s", line)


def report_error(line: str, shown: bool = True) -> None:
    """A failing rank's last line: on stderr, in its log file, and in torchrun's error file, so the
    launcher's failure summary names it instead of "To enable traceback see ...". torchrun prints
    that summary after every rank has exited, so no rank can print after it; `python -m nvfp4_pp.launch`
    (torchrun's own launcher, run in-process) ends a failed run with this line instead."""
    summary = third_party_summary()
    if summary:
        logger.info("%s", summary)
    if _state is not None and _state.file is not None:
        _state.file.handle(logging.LogRecord("nvfp4_pp", logging.ERROR, "", 0, line, None, None))
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass
    if shown:
        print(line, file=sys.stderr, flush=True)


def teardown() -> None:
    """Undo `setup`: stop the relay, close the file, restore stdout, warnings and the root logger."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    if state.listener is not None:
        state.listener.close()
    if state.stdout is not None:
        sys.stdout = state.stdout
    logging.captureWarnings(False)
    root = logging.getLogger()
    root.handlers[:], root.level = state.root_handlers, state.root_level
    for handler in logger.handlers:
        handler.flush()
        if handler is state.file:
            handler.close()
    logger.handlers[:] = []


def keep_traceback(rank: int) -> Path:
    """The exception being handled, with its traceback, where it outlives the run: this rank's log file
    once it has one (a failed run keeps its work directory), else a file in the temp directory."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    if _state is not None and _state.file is not None:
        _state.file.handle(logging.LogRecord("nvfp4_pp", logging.ERROR, "", 0, text.rstrip(), None, None))
        return Path(_state.file.baseFilename)
    path = Path(tempfile.gettempdir()) / f"nvfp4_pp-rank{rank}-pid{os.getpid()}-traceback.txt"
    path.write_text(text)
    return path
