"""Progress of a long phase on one rank, as plain log lines: done / total, percentage, rate, ETA.

One line after the first step (the first estimate), then at most one every `every_s`, and one at
the end, so a log read under SLURM or from a file says the same as a terminal, without carriage
returns. Lines are relayed to rank 0's console (log.RELAY).
"""

from __future__ import annotations

import time

from nvfp4_pp.log import RELAY, logger


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """`advance(amount)` per step of a phase whose total `amount` is known up front.

    `unit` names the amount; `scale` divides it for display (1e9: GB); `steps` (optional) is the
    number of steps, counted and shown beside the amount (calibration: micro-batches and tokens).
    """

    def __init__(self, what: str, total: float, unit: str, scale: float = 1.0, steps: int | None = None,
                 step_unit: str = "", every_s: float = 10.0):
        self.what, self.total, self.unit, self.scale = what, total, unit, scale
        self.steps, self.step_unit, self.every_s = steps, step_unit, every_s
        self.done = 0.0
        self.steps_done = 0
        self.start = self._last = time.perf_counter()

    def _amount(self, value: float) -> str:
        return f"{value / self.scale:.2f}" if self.scale != 1 else f"{value:.0f}"

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        share = self.done / self.total if self.total else 1.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        counted = (f"{self.steps_done}/{self.steps} {self.step_unit}, " if self.steps is not None else "")
        eta = "done" if share >= 1 else ("ETA unknown" if left == float("inf") else f"ETA {duration(left)}")
        return (f"{self.what}: {counted}{self._amount(self.done)}/{self._amount(self.total)} {self.unit} "
                f"({100 * share:.0f}%), {self._amount(rate)} {self.unit}/s, {duration(elapsed)} elapsed, {eta}")

    def advance(self, amount: float = 1.0) -> None:
        self.done += amount
        self.steps_done += 1
        now = time.perf_counter()
        finished = self.done >= self.total or (self.steps is not None and self.steps_done >= self.steps)
        if self.steps_done == 1 or finished or now - self._last >= self.every_s:
            self._last = now
            logger.info("%s", self.line(now), extra=RELAY)
