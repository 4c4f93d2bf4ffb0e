"""Freed host memory given back to the system layer by layer, so a rank's peak RSS follows what it holds.

glibc's malloc serves a block of at least its mmap threshold (128 KiB at first) from a mapping of its own,
returned when freed; but each such free raises the threshold to the freed block's size (up to 32 MiB),
after which blocks of that size come from malloc's heaps, which keep freed space for reuse. A rank
allocates and frees megabyte tensors all the time (activations, packing temporaries, the export thread's
copies), and the kept space grew layer after layer: a 24-layer CPU stage streaming its layers
(tests/test_streaming.py) peaked with 200-250 MB live in malloc's heaps and 380-440 MB freed but kept
there, above the resident stage's peak and the planner's prediction. `malloc_trim` after each exported
layer gives the free pages of every heap back (2-6 ms a call there). Fixing the threshold instead
(mallopt) did as well for memory but made every large temporary a fresh mapping: that stage's CPU
calibration and export ran 30-70% slower.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None = getattr(ctypes.CDLL(None), "malloc_trim", None)
"""glibc's; None under a C library without it."""


def give_back_freed_memory() -> None:
    """The free pages of every malloc heap returned to the system (a few ms: call it between layers)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
