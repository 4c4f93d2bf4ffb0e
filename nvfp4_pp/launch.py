"""`python -m nvfp4_pp.launch [torchrun options] -m nvfp4_pp.run CONFIG ...`: torchrun, with the run's own
line last.

Three things plain torchrun does not do:
- the command line and the config are checked here, before any rank starts: a typo is one line and
  exit status 2 at once, not a rank's line buried under torchrun's failure summary;
- a failed run ends with the ranks' error lines (the root cause first, the ranks torchrun stopped
  because of it left out), whatever fields torch's failure record has in the supported versions;
- Ctrl-C, SIGTERM and a second Ctrl-C end with one line of the launcher's own, never a traceback.
  torchrun's own log lines (workers being stopped, failure summaries) go to a file in the temp
  directory, named on the screen only when the run failed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from nvfp4_pp.errors import EXIT_BAD_INPUT, EXIT_FAULT, LAUNCHED, NvFp4PpError

RUN_MODULE = "nvfp4_pp.run"


def _torchrun_args(argv: list[str] | None):
    """torchrun's own parser, with a one-line error instead of its 40-line usage."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "python -m nvfp4_pp.launch"

    def error(message: str) -> NoReturn:
        print(f"nvfp4_pp: error: {message} (python -m nvfp4_pp.launch --help lists torchrun's options)",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def check_run_command(script: str, script_args: list[str], module: bool):
    """The run's command line and config, as every rank will read them; None when the launched program
    is not `nvfp4_pp.run` (then the launcher is plain torchrun). Exits with one line on bad input."""
    if not (module and script == RUN_MODULE):
        return None
    from nvfp4_pp.driver.command_line import parse_args
    from nvfp4_pp.config import load_config

    args = parse_args(script_args)  # one line and exit 2 on an unknown or malformed option
    try:
        return load_config(args.config, args.overrides)
    except NvFp4PpError as e:
        print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class _TorchLines(logging.Handler):
    """torchrun's log lines, kept until the run ends: written to a file if it failed, else dropped."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def save(self) -> str | None:
        """Write the lines to a file in the temp directory (nothing beside the user's output); its path."""
        if not self.lines:
            return None
        path = Path(tempfile.gettempdir()) / f"nvfp4_pp-launcher-{socket.gethostname()}-pid{os.getpid()}.log"
        try:
            path.write_text("\n".join(self.lines) + "\n")
        except OSError:
            return None
        return str(path)


def _quiet_torchrun() -> _TorchLines:
    """torchrun's loggers into the keeper, not onto the screen (they print per worker stopped)."""
    keeper = _TorchLines()
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        log = logging.getLogger(name)
        log.handlers = [keeper]
        log.propagate = False
        log.setLevel(logging.INFO)
    return keeper


def failure_lines(failures: Mapping[int, object], cfg) -> tuple[list[str], int]:
    """The lines that end a failed run and its exit status, from torchrun's failure records.

    A rank's own `nvfp4_pp: error` line is its record's message. Lines that only follow from another
    rank's failure (interrupted by the SIGTERM torchrun sends the others, stopped because a rank failed,
    lost a rank) are left out when the cause is named. A rank that died without a line (SIGKILL, the OOM
    killer, a crash in C++) is named from the record's exit code. Only the fields every supported torch
    has are read (the record's `rank` and `hostname` are gone in torch 2.13: the global rank is the key).
    """
    causes: list[tuple[str, int]] = []
    consequences: list[str] = []
    for rank, failure in sorted(failures.items()):
        message = getattr(failure, "message", None)
        exitcode = getattr(failure, "exitcode", EXIT_FAULT)
        if not (isinstance(message, str) and message.startswith("nvfp4_pp: error")):
            causes.append((_silent_line(rank, exitcode, cfg), EXIT_FAULT))
        elif any(mark in message for mark in CONSEQUENCES):
            consequences.append(message)
        else:
            causes.append((message, exitcode))
    if not causes:
        return list(dict.fromkeys(consequences)), EXIT_FAULT
    codes: dict[str, set[int]] = {}
    for line, exitcode in causes:  # one line from several ranks: one of them may be torchrun's SIGTERM victim
        codes.setdefault(line, set()).add(exitcode)
    code = EXIT_BAD_INPUT if all(EXIT_BAD_INPUT in c for c in codes.values()) else EXIT_FAULT
    return list(codes), code


CONSEQUENCES = ("interrupted by SIGTERM during", ": stopped because rank ", ": lost rank ")
"""Marks of a rank's line that only follows from another rank's failure."""


def _silent_line(rank: int, exitcode: int, cfg) -> str:
    if exitcode < 0:
        try:
            why = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            why = f"was killed by signal {-exitcode}"
        if exitcode == -signal.SIGKILL:
            why += " (from outside: the kernel's out-of-memory killer, scancel or kill -9)"
    else:
        why = f"exited with status {exitcode}"
    where = "<work dir>/rank{r}/"
    if cfg is not None:
        from nvfp4_pp.checkpoint.work_state import work_dir_of

        where = f"{work_dir_of(cfg)}/rank{rank}/"
    return (f"nvfp4_pp: error: rank {rank} {why} before it could say why; its log is in {where} (log.txt) on its "
            "host; rerun the same command to resume")


def main(argv: list[str] | None = None) -> int:
    args = _torchrun_args(argv)
    cfg = check_run_command(args.training_script, args.training_script_args, args.module)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    keeper = _quiet_torchrun()
    os.environ[LAUNCHED] = "1"
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        lines, code = failure_lines(e.failures, cfg)
    except SignalException as e:
        # A second Ctrl-C while torchrun stops the ranks lands here too: the ranks have the signal
        # already (the terminal sends it to the whole process group) and say what a rerun resumes.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        name = getattr(e.sigval, "name", str(e.sigval))
        lines, code = [f"nvfp4_pp: error: the launcher was stopped by {name}; each rank said above what it "
                       "saved; rerun the same command to resume"], EXIT_FAULT
    saved = keeper.save() if code != EXIT_BAD_INPUT else None
    if saved:
        lines[-1] += f" (torchrun's own lines: {saved})"
    print("\n".join(lines), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
