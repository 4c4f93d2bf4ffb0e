"""The one base class of every error a user sees as a single line (never a traceback).

Two kinds, because the fix differs: bad input (a config key, a source file, a plan that cannot
fit) is fixed by changing something, and rerunning unchanged would fail the same way; a fault (a
lost rank, a signal, a full disk) is fixed by rerunning the same command, which resumes from the
work directory. The entry points catch `NvFp4PpError` alone.
"""

from __future__ import annotations


class NvFp4PpError(Exception):
    """A problem the user must fix; the message names it and the fix. Rerunning unchanged cannot help."""

    resumable = False


class CalibrationError(NvFp4PpError):
    """The calibration set cannot give the statistics the recipe needs (padding it cannot skip, a
    quantizer that saw no data): change the data or its batching."""


class Fault(NvFp4PpError):
    """A fault outside the input (lost rank, signal, disk full): rerunning the same command resumes."""

    resumable = True


class Interrupted(Fault):
    """SIGINT (Ctrl-C) or SIGTERM (the launcher, SLURM, or the launcher's death) stopped this rank."""

    def __init__(self, signal_name: str, phase: str, why: str = ""):
        super().__init__(f"interrupted by {signal_name}{why} during {phase}")
        self.signal_name = signal_name


EXIT_FAULT, EXIT_BAD_INPUT = 1, 2
"""Exit statuses of a failed run: rerun the same command (it resumes), or fix the input first."""


def exit_status(error: NvFp4PpError) -> int:
    return EXIT_FAULT if error.resumable else EXIT_BAD_INPUT


LAUNCHED = "NVFP4_PP_LAUNCHER"
"""Set to "1" by `python -m nvfp4_pp.launch` for its ranks: it prints their error lines itself, last."""
