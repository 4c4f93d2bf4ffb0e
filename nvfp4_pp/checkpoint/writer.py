"""Safetensors shards written under a temp name and renamed, capped in size."""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from nvfp4_pp.files import honour_umask, sha256_of, write_errors_named
from nvfp4_pp.records import ShardRecord
from nvfp4_pp.sizes import DEFAULT_SHARD_BYTES, WRITE_WORKERS


class ShardWriter:
    """Collects tensors and writes `{prefix}-{k:05d}.safetensors` files of at most `max_bytes`.

    Full shards are written and checksummed by `workers` background threads (safetensors and
    hashlib release the GIL), so the disk and the hash overlap the packing of the next Linears; at
    most `workers` full shards wait in memory besides the one being filled. `close()` waits for them
    and raises the first write error.
    """

    def __init__(self, directory: Path, prefix: str, max_bytes: int = DEFAULT_SHARD_BYTES,
                 workers: int = WRITE_WORKERS):
        self.directory, self.prefix, self.max_bytes = Path(directory), prefix, max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._count = 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="shard-writer")
        self._workers = workers
        self._pending: list[Future] = []
        self.shards: list[ShardRecord] = []
        """One record per written file; complete after close()."""
        self.write_seconds = 0.0
        """Seconds the writer threads spent writing and hashing (overlapping the caller's work)."""

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self._buffer and self._buffered + nbytes > self.max_bytes:
                self._submit()
            self._buffer[name] = t.detach().to("cpu").contiguous()
            self._buffered += nbytes

    def _submit(self) -> None:
        if not self._buffer:
            return
        while len(self._pending) >= self._workers:  # bounded memory: wait for the oldest shard
            self._collect(self._pending.pop(0))
        self._count += 1
        name = f"{self.prefix}-{self._count:05d}.safetensors"
        self._pending.append(self._pool.submit(self._write, name, self._buffer, self._buffered))
        self._buffer, self._buffered = {}, 0

    def _collect(self, future: Future) -> None:
        shard, seconds = future.result()
        self.shards.append(shard)
        self.write_seconds += seconds

    def _write(self, name: str, tensors: dict[str, torch.Tensor], nbytes: int) -> tuple[ShardRecord, float]:
        started = time.perf_counter()
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        with write_errors_named(final, nbytes):
            try:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
                honour_umask(tmp)  # safetensors creates 0600; assembly hard-links this very file
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        shard = ShardRecord(name, tuple(sorted(tensors)), nbytes, sha256_of(final))
        return shard, time.perf_counter() - started

    def close(self) -> None:
        """Write what is buffered and wait for every shard; the first failure is raised."""
        self._submit()
        try:
            while self._pending:
                self._collect(self._pending.pop(0))
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)
        self.shards.sort(key=lambda s: s.file)
