"""Safetensors shards written under a temp name and renamed, capped in size."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 2 * 1024**3
"""Small enough that hashing and writing overlap packing; vLLM loads any number of shards."""
WRITE_WORKERS = 2


def sha256_of(path: Path) -> str:
    """Checksum of a written file (resume and transfers trust a shard only when it matches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024**2):
            h.update(block)
    return h.hexdigest()


class ExportWriteError(OSError):
    pass


@contextlib.contextmanager
def write_errors_named(path: Path, nbytes: int):
    """A failed write becomes one ExportWriteError naming the file, the size and the fix."""
    try:
        yield
    except ExportWriteError:
        raise
    except Exception as e:  # safetensors raises its own error type, with the OS message inside
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            raise ExportWriteError(
                errno.ENOSPC, f"disk full while writing {path} ({nbytes / 1e9:.2f} GB); free space on "
                f"{path.parent} (or point 'output' elsewhere) and rerun the same command to resume"
            ) from None
        if isinstance(e, OSError):
            raise ExportWriteError(e.errno, f"cannot write {path}: {e.strerror}") from None
        raise


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
        self.shards: list[dict] = []
        """One entry per written file: {"file", "tensors": [names], "bytes", "sha256"}; complete after close()."""
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

    def _write(self, name: str, tensors: dict[str, torch.Tensor], nbytes: int) -> tuple[dict, float]:
        started = time.perf_counter()
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        with write_errors_named(final, nbytes):
            try:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        shard = {"file": name, "tensors": sorted(tensors), "bytes": nbytes, "sha256": sha256_of(final)}
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
        self.shards.sort(key=lambda s: s["file"])
