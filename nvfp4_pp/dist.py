"""Process group setup, rank facts, and point-to-point tensor transfer with shape headers.

Only activations cross the wire: a fixed-size int64 header (kind, dtype, shape) followed by the
payload, so variable sequence lengths need no prior agreement between stages.

The default process group is always gloo, which every rank can join whatever its device: it
carries the small object collectives (budgets, manifests) and lets ranks agree on the wire for
hidden states. That wire is an NCCL group over CUDA tensors when every rank's stage is on CUDA,
else the gloo group over CPU tensors (a CUDA stage copies to and from the host around it).
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
    """Where this rank's stage runs."""
    wire_device: torch.device = torch.device("cpu")
    """Where hidden states sent to and received from neighbours live (CPU for gloo)."""
    wire_group: dist.ProcessGroup | None = None
    """Process group of the hidden-state stream (None: the default gloo group)."""

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1


class DeviceError(RuntimeError):
    """A rank's device request cannot be met; the message says which rank and the fix."""


def requested_device(device: str | list[str], rank: int, world_size: int) -> str:
    """This rank's entry of `pipeline.device` (one value for all ranks, or one per rank)."""
    if isinstance(device, str):
        return device
    if len(device) != world_size:
        raise DeviceError(
            f"pipeline.device has {len(device)} entries but {world_size} ranks are running; "
            "give one per rank or a single value for all"
        )
    return device[rank]


def pick_device(requested: str, local_rank: int) -> torch.device:
    """The device this rank's stage runs on: cuda:LOCAL_RANK when available, else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            "pipeline.device is 'cuda' but this rank sees no CUDA device; "
            "set pipeline.device: cpu (or auto) for CPU-only ranks"
        )
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(
            f"LOCAL_RANK {local_rank} has no CUDA device: this host has "
            f"{torch.cuda.device_count()}; use --nproc-per-node <= {torch.cuda.device_count()}"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def wire_backend(requested: str, device_types: list[str]) -> str:
    """The hidden-state backend every rank agrees on, from every rank's stage device type."""
    on_cpu = [r for r, t in enumerate(device_types) if t != "cuda"]
    if requested == "nccl" and on_cpu:
        raise DeviceError(
            f"pipeline.backend is 'nccl' but rank(s) {on_cpu} run on CPU; "
            "use backend: auto (gloo for mixed ranks) or put every stage on CUDA"
        )
    if requested == "auto":
        return "gloo" if on_cpu else "nccl"
    return requested


def init(backend: str, device_request: str | list[str], timeout_s: int) -> RankInfo:
    """Join the process group torchrun describes (or act alone when started as one process)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device(device_request, rank, world_size), local_rank)
    host = socket.gethostname()
    if world_size == 1:
        return RankInfo(rank, world_size, local_rank, host, device, wire_device=device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="gloo", timeout=timeout)
    wire = wire_backend(backend, all_gather_objects(device.type, world_size))
    if wire == "nccl":
        group = dist.new_group(backend="nccl", timeout=timeout, device_id=device)
        return RankInfo(rank, world_size, local_rank, host, device, wire_device=device, wire_group=group)
    return RankInfo(rank, world_size, local_rank, host, device)


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

    def __init__(self, peer: int, device: torch.device, group=None, depth: int = 2):
        self.peer, self.device, self.group, self.depth = peer, device, group, depth
        self._pending: deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = deque()
        self.bytes_sent = 0

    def _post(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        tensors = (header,) if payload is None else (header, payload)
        works = [dist.isend(t, self.peer, group=self.group) for t in tensors]
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

    def __init__(self, peer: int, device: torch.device, group=None):
        self.peer, self.device, self.group = peer, device, group
        self.bytes_received = 0

    def __iter__(self):
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        work = dist.irecv(header, self.peer, group=self.group)
        while True:
            work.wait()
            h = header.tolist()
            if h[0] == _KIND_END:
                return
            shape = h[3 : 3 + h[2]]
            payload = torch.empty(shape, dtype=_DTYPES[h[1]], device=self.device)
            dist.recv(payload, self.peer, group=self.group)
            self.bytes_received += payload.numel() * payload.element_size() + header.numel() * 8
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
            work = dist.irecv(header, self.peer, group=self.group)  # the next header arrives while we compute
            yield payload
