"""Streaming stages: decoder layers brought to the device a window at a time, for stages larger than memory.

A streaming stage is built with its layers on the meta device. Layer-major calibration (layerwise.py)
asks for layer k right before calibrating it; the next layer is already being read from the
source shards in a background thread while layer k computes, so the transfer hides behind the
compute (a layer's compute on the whole calibration set dwarfs its read). Once layer k is
calibrated, the export thread (export.StageExporter) packs it while layer k+1 calibrates and frees
it; layer k+2 comes onto the device only after that, so the device holds at most two layers' weights
(one being calibrated, one being packed or read), the calibration set's hidden states and the export
buffers. On a discrete GPU layer k+2 is read from disk into pinned host memory before then, while k
is packed: only its copy to the device waits for the room (on the H200 the read had waited behind the
packing, 0.19 s a layer against 0.22 s of calibration).
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from nvfp4_pp.planning.budget import device_kind
from nvfp4_pp.planning.memory import STREAM_WINDOW
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import Stage, drop_weights


class LayerStream:
    """Loads a streaming stage's layers in order, one ahead; frees each when asked.

    On a discrete GPU the read thread stages each tensor in pinned host memory and copies it on a
    CUDA stream of its own, so the copy overlaps the calibration kernels on the compute stream (a
    read straight to the device would copy from pageable memory on the default stream, in line with
    the compute); the compute stream waits for the copy's event before it uses the layer. CPU and
    unified-memory ranks read straight onto their device, as before.
    """

    def __init__(self, stage: Stage, source: SourceCheckpoint, device: torch.device):
        self.stage, self.source, self.device = stage, source, device
        self.order = [index for index, _ in stage.layers()]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layer-stream")
        self._pending: dict[int, Future] = {}
        # unified memory (one pool for host and device): staging would be a second copy in that pool
        self._copies = torch.cuda.Stream(device) if device_kind(device) == "discrete" else None
        self.wait_seconds = 0.0
        """Time calibration waited for a layer that was not read yet (the transfer not hidden)."""
        self.read_parts: list[tuple[float, float, float]] = []
        """Per layer read, seconds: into pinned memory (discrete GPU), waiting for room on the device, onto it."""
        self._slots = threading.Semaphore(STREAM_WINDOW)
        """Layers on the device at once: a read takes a slot, `unload` gives it back."""
        self._freed: collections.deque[torch.cuda.Event | None] = collections.deque()
        self._closed = False

    def _names(self, index: int) -> list[str]:
        prefix = f"{self.stage.layer_prefix(index)}."
        return [n for n in self.source.weight_map if n.startswith(prefix)]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """One pinned host tensor to the device, queued on the copy stream (the caching host allocator
        keeps the pinned block until the copy is done)."""
        return tensor.to(self.device, non_blocking=True)

    def _read(self, index: int) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
        """Layer `index`'s tensors on the device, and on a GPU the event recorded after their copies.
        Waits for a slot in the window (an earlier layer unloaded, its last kernels done) before its
        tensors come onto the device; on a discrete GPU they are read into pinned memory first."""
        names = self._names(index)
        t0 = time.perf_counter()
        staged = self.source.read_stored(names, torch.Tensor.pin_memory) if self._copies is not None else None
        t1 = time.perf_counter()
        self._slots.acquire()
        if self._closed:
            return {}, None
        if self._freed:
            packed = self._freed.popleft()
            if packed is not None:
                packed.synchronize()
        t2 = time.perf_counter()
        if self._copies is None:
            tensors, copied = self.source.load(names, self.device), None
        else:
            with torch.cuda.stream(self._copies):
                tensors = self.source.load(names, self.device, transfer=self._to_device, stored=staged)
                copied = torch.cuda.Event()
                copied.record(self._copies)
            copied.synchronize()  # the read counts as done (the consumer's wait) once its bytes are there
        self.read_parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        return tensors, copied

    def prefetch(self, index: int) -> None:
        """Start reading layer `index` in the background (the first one while the stage gets ready)."""
        if index not in self._pending:
            self._pending[index] = self._pool.submit(self._read, index)

    def load(self, index: int, layer: nn.Module) -> None:
        """Layer `index`'s tensors into `layer` (waiting for the read if needed); the next read starts."""
        self.prefetch(index)
        t0 = time.perf_counter()
        tensors, copied = self._pending.pop(index).result()
        self.wait_seconds += time.perf_counter() - t0
        if copied is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(copied)
            for tensor in tensors.values():
                # allocated on the copy stream: not reused by a later copy while the compute still reads it
                tensor.record_stream(compute)
        position = self.order.index(index)
        if position + 1 < len(self.order):
            self.prefetch(self.order[position + 1])
        prefix = f"{self.stage.layer_prefix(index)}."
        local = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
        result = layer.load_state_dict(local, strict=False, assign=True)
        if result.unexpected_keys:
            raise RuntimeError(f"layer {index}: unexpected tensors {result.unexpected_keys[:3]}")

    def unload(self, layer: nn.Module, packed: torch.cuda.Event | None = None) -> None:
        """Free an exported layer: its parameters go back to the meta device (quantizer state stays), and
        its slot in the window to the next read, which first waits for `packed` (the event after the
        last kernels reading it). Called from the export thread."""
        drop_weights(layer)
        self._freed.append(packed)
        self._slots.release()

    def close(self) -> None:
        """Stop reading (a read waiting for a slot returns nothing) and wait for the read thread."""
        self._closed = True
        for _ in range(STREAM_WINDOW + 1):
            self._slots.release()
        self._pool.shutdown(wait=True, cancel_futures=True)
