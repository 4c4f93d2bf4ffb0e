"""The run's phases, named once: logs, fault messages, the run record's spans and timings, the
timeline chart and `--stop-after` all use these names."""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    """One phase of a run, in run order. The value is the name every message and record uses (a str
    enum written out by hand: `enum.StrEnum` needs Python 3.11, and 3.10 is supported)."""

    START_UP = "start-up"
    """Checks of the source, the split and the output, the locks and the calibration samples."""
    PLANNING = "planning"
    LOAD = "load"
    CALIBRATE = "calibrate"
    EXPORT = "export"
    GATHER = "gather"
    ASSEMBLE = "assemble"
    """Rank 0 assembles, verifies and writes the record and the card."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


RECORDED = (Phase.CALIBRATE, Phase.EXPORT)
"""Phases whose result the work directory keeps, in run order: a rerun continues after the last one
every rank finished, and `--stop-after` stops after one of them. Redoing one redoes every later one."""
