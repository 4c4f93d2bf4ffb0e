"""Logging with a stage prefix; the first rank speaks at INFO, the others only warn unless asked."""

from __future__ import annotations

import logging
import os
import sys
import time

logger = logging.getLogger("nvfp4_pp")


def setup(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [stage {rank}] %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    wanted = os.environ.get("NVFP4_PP_LOG", "").upper()
    logger.setLevel(wanted if wanted else (logging.INFO if rank == 0 else logging.WARNING))


class Progress:
    """Throttled progress lines for long loops: count, tokens and tokens/s."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.done = self.tokens = 0
        self.start = self._last = time.perf_counter()

    def step(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        now = time.perf_counter()
        logger.debug("%s micro-batch %d/%d done", self.what, self.done, self.total)
        if now - self._last >= self.every_s or self.done == self.total:
            self._last = now
            logger.info(
                "%s %d/%d micro-batches, %d tokens, %.0f tokens/s",
                self.what, self.done, self.total, self.tokens, self.tokens / max(now - self.start, 1e-9),
            )
