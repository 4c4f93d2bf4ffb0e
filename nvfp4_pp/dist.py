"""Process group setup, rank facts, and point-to-point tensor transfer with shape headers.

Only activations cross the wire: a fixed-size int64 header (kind, dtype, shape) followed by the
payload, so variable sequence lengths need no prior agreement between stages.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from collections import deque

import torch
import torch.distributed as dist

_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32]
_HEADER_LEN = 8
_KIND_END, _KIND_TENSOR = 0, 1


@dataclasses.dataclass(frozen=True, slots=True)
class RankInfo:
    """Who this process is in the pipeline."""

    rank: int
    world_size: int
    local_rank: int
    host: str
    device: torch.device

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    """The device this rank's stage runs on: cuda:LOCAL_RANK when available, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "pipeline.device is 'cuda' but this rank sees no CUDA device; "
            "set pipeline.device: cpu (or auto) for CPU-only ranks"
        )
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} has no CUDA device: this host has "
            f"{torch.cuda.device_count()}; use --nproc-per-node <= {torch.cuda.device_count()}"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(backend: str, device_request: str, timeout_s: int) -> RankInfo:
    """Join the process group torchrun describes (or act alone when started as one process)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_request, local_rank)
    if world_size > 1:
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return RankInfo(rank, world_size, local_rank, socket.gethostname(), device)


def shutdown() -> None:
    """Destroy the process group if one exists (safe to call on any path out)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: object, world_size: int) -> list:
    """Every rank's `obj`, in rank order (the object alone when running as one process)."""
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """`obj` from rank `src` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Sender:
    """Sends tensors to one peer without blocking compute; keeps at most `depth` sends in flight."""

    def __init__(self, peer: int, device: torch.device, depth: int = 2):
        self.peer, self.device, self.depth = peer, device, depth
        self._pending: deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = deque()
        self.bytes_sent = 0

    def _post(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        tensors = (header,) if payload is None else (header, payload)
        works = [dist.isend(t, self.peer) for t in tensors]
        self._pending.append((works, tensors))  # keep buffers alive until sent
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        while len(self._pending) > self.depth:
            for w in self._pending.popleft()[0]:
                w.wait()

    def send(self, tensor: torch.Tensor) -> None:
        if tensor.ndim > _HEADER_LEN - 3:
            raise ValueError(f"cannot send a {tensor.ndim}-d tensor; at most {_HEADER_LEN - 3} dims")
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        header[0], header[1], header[2] = _KIND_TENSOR, _DTYPES.index(tensor.dtype), tensor.ndim
        header[3 : 3 + tensor.ndim] = torch.tensor(tensor.shape)
        self._post(header.to(self.device), tensor.contiguous())

    def close(self) -> None:
        """Tell the peer the stream ended, then wait for every send to finish."""
        self._post(torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self.device), None)
        while self._pending:
            for w in self._pending.popleft()[0]:
                w.wait()


class Receiver:
    """Iterates over the tensors one peer sends until it closes its stream."""

    def __init__(self, peer: int, device: torch.device):
        self.peer, self.device = peer, device
        self.bytes_received = 0

    def __iter__(self):
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        work = dist.irecv(header, self.peer)
        while True:
            work.wait()
            h = header.tolist()
            if h[0] == _KIND_END:
                return
            shape = h[3 : 3 + h[2]]
            payload = torch.empty(shape, dtype=_DTYPES[h[1]], device=self.device)
            dist.recv(payload, self.peer)
            self.bytes_received += payload.numel() * payload.element_size() + header.numel() * 8
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
            work = dist.irecv(header, self.peer)  # the next header arrives while we compute
            yield payload
