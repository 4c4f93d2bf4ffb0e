"""Safetensors shards written under a temp name and renamed, capped in size."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 5 * 1024**3


class ExportWriteError(OSError):
    pass


class ShardWriter:
    """Collects tensors and writes `{prefix}-{k:05d}.safetensors` files of at most `max_bytes`."""

    def __init__(self, directory: Path, prefix: str, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory, self.prefix, self.max_bytes = Path(directory), prefix, max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self.shards: list[dict] = []
        """One entry per written file: {"file", "tensors": [names], "bytes"}."""

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
        try:
            save_file(self._buffer, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise ExportWriteError(
                    e.errno, f"disk full while writing {final} ({self._buffered / 1e9:.2f} GB); "
                    f"free space on {self.directory} and run again"
                ) from e
            raise ExportWriteError(e.errno, f"cannot write {final}: {e.strerror}") from e
        self.shards.append({"file": name, "tensors": sorted(self._buffer), "bytes": self._buffered})
        self._buffer, self._buffered = {}, 0
