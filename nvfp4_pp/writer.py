"""Safetensors shards written under a temp name and renamed, capped in size."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 5 * 1024**3


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
    """Collects tensors and writes `{prefix}-{k:05d}.safetensors` files of at most `max_bytes`."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.prefix, self.max_bytes = Path(directory), prefix, max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self.shards: list[dict] = []
        """One entry per written file: {"file", "tensors": [names], "bytes"}."""
        self.write_seconds = 0.0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if self._buffer and self._buffered + nbytes > self.max_bytes:
                self.flush()
            self._buffer[name] = t.detach().to("cpu").contiguous()
            self._buffered += nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"{self.prefix}-{len(self.shards) + 1:05d}.safetensors"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        started = time.perf_counter()
        with write_errors_named(final, self._buffered):
            try:
                save_file(self._buffer, str(tmp), metadata={"format": "pt"})
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        self.write_seconds += time.perf_counter() - started
        self.shards.append({"file": name, "tensors": sorted(self._buffer), "bytes": self._buffered})
        self._buffer, self._buffered = {}, 0
