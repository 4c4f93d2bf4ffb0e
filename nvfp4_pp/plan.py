"""Who gets which decoder layers: contiguous stages, checked before anything is loaded."""

from __future__ import annotations

from typing import Literal


class PlanError(ValueError):
    pass


def split_layers(num_layers: int, world_size: int, layers: Literal["auto"] | list[int]) -> list[tuple[int, int]]:
    """[start, stop) decoder-layer ranges, one per rank, covering every layer exactly once.

    `auto` spreads layers as evenly as counts allow; the first rank (which also holds the
    embeddings) gets no more than any other.
    """
    if world_size > num_layers:
        raise PlanError(
            f"{world_size} ranks but the model has only {num_layers} decoder layers; "
            f"use at most {num_layers} ranks"
        )
    if layers == "auto":
        base, extra = divmod(num_layers, world_size)
        counts = [base + (1 if r >= world_size - extra else 0) for r in range(world_size)]
    else:
        counts = list(layers)
        if len(counts) != world_size:
            raise PlanError(
                f"pipeline.layers has {len(counts)} entries but {world_size} ranks are running; "
                f"give one count per rank or use 'auto'"
            )
        if any(c < 1 for c in counts):
            raise PlanError(f"pipeline.layers = {counts}: every rank needs at least one layer")
        if sum(counts) != num_layers:
            raise PlanError(
                f"pipeline.layers = {counts} sums to {sum(counts)} but the model has "
                f"{num_layers} decoder layers; make the counts sum to {num_layers}"
            )
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def owner_of(tensor_name: str, arch, ranges: list[tuple[int, int]]) -> int:
    """Rank that exports a source tensor: its layer's rank, else first (embeddings) or last (norm, lm_head)."""
    layer = arch.layer_of(tensor_name)
    if layer is not None:
        for rank, (start, stop) in enumerate(ranges):
            if start <= layer < stop:
                return rank
        raise PlanError(f"{tensor_name!r} names layer {layer}, outside the model's layers")
    return len(ranges) - 1 if arch.on_last_stage(tensor_name) else 0
