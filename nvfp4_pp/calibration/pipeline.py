"""The calibration schedule: micro-batches stream rank to rank, every stage busy at once.

The first rank feeds micro-batches; every other rank receives hidden states from its
predecessor. Sends are asynchronous, so a stage computes micro-batch i+1 while i is still on
the wire; results equal batch-by-batch processing because each micro-batch is independent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from nvfp4_pp.runtime import dist
from nvfp4_pp.calibration.calibrate import ValidTokens
from nvfp4_pp.data.samples import MicroBatch, valid_mask
from nvfp4_pp.log import logger
from nvfp4_pp.progress import Progress
from nvfp4_pp.records import Traffic

if TYPE_CHECKING:
    from nvfp4_pp.model.stage import Stage


def run_pipeline(
    stage: Stage,
    info: dist.RankInfo,
    batches: list[MicroBatch] | None,
    lengths: list[tuple[int, ...]],
    valid: ValidTokens,
) -> Traffic:
    """This rank's side of one pass over the calibration set; returns what it computed and moved.

    Every rank knows each micro-batch's real lengths (`lengths`, shared up front, no text), so
    each stage masks the same pad positions out of its statistics, and knows the shape of every
    hidden state it receives: they travel without headers, the next one arriving during compute.
    """
    wire = info.wire_device  # CPU when gloo carries the stream, even for a CUDA stage
    dtype = next(stage.parameters()).dtype
    shapes: list[tuple[int, ...]] = [(len(real), max(real), stage.hf_config.hidden_size) for real in lengths]
    receiver = None
    if info.is_first:
        assert batches is not None  # the first rank feeds the micro-batches
        inputs: Iterable[torch.Tensor] = (b.ids for b in batches)
    else:
        inputs = receiver = dist.Receiver(info.rank - 1, wire, info.wire_group, shapes=shapes, dtype=dtype)
    sender = None if info.is_last else dist.Sender(info.rank + 1, wire, info.wire_group, headers=False)
    progress = Progress("calibration", sum(map(sum, lengths)), "tokens", steps=len(lengths), step_unit="micro-batches")
    with torch.no_grad():
        for x, real, shape in zip(inputs, lengths, shapes, strict=True):
            valid.set(valid_mask(real, x.shape[1]))
            hidden = stage(x.to(info.device))
            if sender is not None:
                if tuple(hidden.shape) != shape or hidden.dtype != dtype:
                    raise RuntimeError(f"stage output {hidden.dtype}{tuple(hidden.shape)}, the next rank expects "
                                       f"{dtype}{shape}")
                sender.send(hidden.to(wire))
            progress.advance(sum(real))
            logger.debug("calibration micro-batch %d/%d done", progress.steps_done, len(lengths))
        valid.set(None)
        if sender is not None:
            sender.close()
    return Traffic(int(progress.done), sender.bytes_sent if sender else 0, 0 if receiver is None else receiver.bytes_received)
