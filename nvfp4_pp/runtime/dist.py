"""Process group setup, rank facts, and point-to-point tensor transfer.

Only activations cross the wire. Where the receiver knows every shape in advance (the calibration
stream: every rank is told each micro-batch's lengths up front) payloads travel bare, and the next
one is received while the current one is computed, with no host synchronisation per step. Other
transfers (objects) carry a fixed-size int64 header (kind, dtype, shape) before each payload.

Every wait is bounded by the process group's timeout. A peer that dies or hangs surfaces as one
`PeerLost` error naming that rank, its host and the phase, never as a hang or a gloo traceback.

The default process group is always gloo, which every rank can join whatever its device: it
carries the small object collectives (budgets, manifests) and lets ranks agree on the wire for
hidden states. That wire is an NCCL group over CUDA tensors when every rank's stage is on CUDA,
else the gloo group over CPU tensors (a CUDA stage copies to and from the host around it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pickle
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from nvfp4_pp.errors import Fault, Interrupted, NvFp4PpError
from nvfp4_pp.phases import Phase

T = TypeVar("T")
_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32, torch.uint8]
_HEADER_LEN = 8
_KIND_END, _KIND_TENSOR = 0, 1


_phase = Phase.START_UP
_hosts: list[str] = []
_timeout_s = 0


def set_phase(phase: Phase) -> None:
    """Record what this rank is doing, for error messages about lost peers."""
    global _phase
    _phase = phase


def current_phase() -> Phase:
    return _phase


class PeerLost(Fault):
    """Another rank died, hung or was killed; the message names it, its host and the phase."""

    def __init__(self, peer: int | None, cause: BaseException):
        text = str(cause)
        if "Timed out" in text or "timeout" in text.lower():
            why = f"no answer within pipeline.timeout_s={_timeout_s} s (hung, or much slower than this rank)"
        else:
            why = "connection closed (the process died or was killed)"
        who = (f"rank {peer} on host {_hosts[peer]}" if peer is not None and peer < len(_hosts)
               else "a rank")
        super().__init__(
            f"lost {who} during {_phase}: {why}; check that rank's log, then rerun the same "
            "command to resume from the last completed phase"
        )
        self.peer = peer


_FAILED_KEY = "nvfp4_pp/failed/{rank}"


def announce_failure(rank: int, line: str) -> None:
    """Leave this rank's error line in the rendezvous store before it exits: the ranks that then lose
    it name its error instead of blaming the network (best effort: the store may be gone)."""
    with contextlib.suppress(Exception):
        from torch.distributed import distributed_c10d

        distributed_c10d._get_default_store().set(_FAILED_KEY.format(rank=rank), line)


def failure_of(peer: int | None, world_size: int) -> tuple[int, str] | None:
    """(rank, error line) a lost peer left before it exited (any rank's, when the peer is unknown)."""
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        for rank in [peer] if peer is not None else range(world_size):
            key = _FAILED_KEY.format(rank=rank)
            if store.check([key]):
                return rank, store.get(key).decode()
    except Exception:  # the store went with the launcher
        pass
    return None


@contextlib.contextmanager
def talking_to(peer: int | None):
    """Turn any torch.distributed failure inside the block into PeerLost(peer)."""
    try:
        yield
    except PeerLost:
        raise
    except RuntimeError as e:
        raise PeerLost(peer, e) from None


@dataclasses.dataclass(frozen=True, slots=True)
class RankInfo:
    """Who this process is in the pipeline."""

    rank: int
    world_size: int
    local_rank: int
    host: str
    device: torch.device
    """Where this rank's stage runs."""
    hosts: tuple[str, ...] = ()
    """Every rank's host name, in rank order."""
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


class DeviceError(NvFp4PpError):
    """A rank's device request cannot be met; the message says which rank and the fix."""


def requested_device(device: str | Sequence[str], rank: int, world_size: int) -> str:
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
            f"pipeline.device is 'cuda' but rank {os.environ.get('RANK', 0)} on host "
            f"{socket.gethostname()} sees no CUDA device; "
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


def init(backend: str, device_request: str | Sequence[str], timeout_s: int) -> RankInfo:
    """Join the process group torchrun describes (or act alone when started as one process).

    The group is joined before the device is checked, so a rank without its device fails together
    with the others instead of leaving them waiting for it.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    global _timeout_s
    _timeout_s = timeout_s
    host = socket.gethostname()
    if world_size == 1:
        _hosts[:] = [host]
        device = pick_device(requested_device(device_request, rank, world_size), local_rank)
        return RankInfo(rank, world_size, local_rank, host, device, (host,), wire_device=device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend="gloo", timeout=timeout)
    picked: torch.device | None = None
    error = None
    try:
        picked = pick_device(requested_device(device_request, rank, world_size), local_rank)
    except NvFp4PpError as e:
        error = (str(e), e.resumable)
    _share_errors(error, world_size)
    assert picked is not None  # _share_errors raised where it failed
    device = picked
    facts = all_gather_objects((host, device.type), world_size)
    hosts = tuple(h for h, _ in facts)
    _hosts[:] = hosts
    wire = wire_backend(backend, [t for _, t in facts])
    if wire == "nccl":
        with talking_to(None):
            group = dist.new_group(backend="nccl", timeout=timeout, device_id=device)
        return RankInfo(rank, world_size, local_rank, host, device, hosts,
                        wire_device=device, wire_group=group)
    return RankInfo(rank, world_size, local_rank, host, device, hosts)


def shutdown() -> None:
    """Destroy the process group if one exists (safe to call on any path out)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        with talking_to(None):
            dist.barrier()


def all_gather_objects(obj: object, world_size: int) -> list:
    """Every rank's `obj`, in rank order (the object alone when running as one process)."""
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    with talking_to(None):
        dist.all_gather_object(out, obj)
    return out


class Agreed(NvFp4PpError):
    """A problem every rank learned of together; rank 0 reports it, the others exit quietly."""

    def __init__(self, message: str, resumable: bool):
        super().__init__(message)
        self.resumable = resumable


def everywhere(info: RankInfo, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if any rank fails with a user-facing error, every rank raises it.

    An interrupt is not shared: every rank that gets one reports it itself.
    """
    result, error = _attempt(fn)
    _share_errors(error, info.world_size)
    return cast(T, result)  # fn returned on every rank (_share_errors raised otherwise); T may itself hold None


def _attempt(fn: Callable[[], T]) -> tuple[T | None, tuple[str, bool] | None]:
    """(fn's result, None), or (None, (message, resumable)) of the user-facing error it raised; an
    interrupt goes through (every rank that gets one reports it itself)."""
    try:
        return fn(), None
    except Interrupted:
        raise
    except NvFp4PpError as e:
        return None, (str(e), e.resumable)


def _share_errors(error: tuple[str, bool] | None, world_size: int) -> None:
    """Collective: every rank's (message, resumable) or None; any error becomes `Agreed` on every rank."""
    errors = all_gather_objects(error, world_size)
    failed = {e: r for r, e in reversed(list(enumerate(errors))) if e is not None}
    if failed:  # the same words on every rank (the launcher shows one of them): a rank's own says which rank
        everyone = len(failed) == 1 and all(e is not None for e in errors)
        raise Agreed("\n".join(text if everyone else f"rank {r}: {text}" for (text, _), r in failed.items()),
                     any(resumable for resumable in (e[1] for e in failed)))


def agreed(info: RankInfo, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result (or its error) to every rank."""
    result, error = broadcast_object(_attempt(fn) if info.is_first else None)
    if error is not None:
        raise Agreed(*error)
    return cast(T, result)  # fn returned on rank 0 (else its error was raised); T may itself hold None


def broadcast_object(obj: T | None, src: int = 0) -> T:
    """`obj` from rank `src` on every rank; the other ranks pass None (typed as the sender's value)."""
    if not dist.is_initialized():
        return cast(T, obj)  # one process: it is the sender
    box = [obj]
    with talking_to(src):
        dist.broadcast_object_list(box, src=src)
    return cast(T, box[0])


def gather_to_first(obj: object, info: RankInfo) -> list | None:
    """Every rank's `obj` on rank 0 by point-to-point, so a missing rank is known by number."""
    if info.world_size == 1:
        return [obj]
    if info.is_first:
        return [obj] + [recv_object(peer) for peer in range(1, info.world_size)]
    send_object(obj, 0)
    return None


def isend(tensor: torch.Tensor, peer: int, group=None) -> dist.Work:
    """torch's `isend`, whose None (this rank outside `group`) cannot happen: every group here holds both ends."""
    work = dist.isend(tensor, peer, group=group)
    assert work is not None
    return work


def irecv(tensor: torch.Tensor, peer: int, group=None) -> dist.Work:
    """torch's `irecv`, whose None (this rank outside `group`) cannot happen: every group here holds both ends."""
    work = dist.irecv(tensor, peer, group=group)
    assert work is not None
    return work


def send_object(obj: object, peer: int) -> None:
    """Pickled `obj` to `peer` over the default (gloo) group, so it travels as a CPU tensor."""
    sender = Sender(peer, torch.device("cpu"))
    sender.send(torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8))
    sender.close()


def recv_object(peer: int) -> Any:
    """The object `peer` sent with `send_object` (unpickled: its type is the sender's)."""
    payloads = list(Receiver(peer, torch.device("cpu")))
    return pickle.loads(payloads[0].numpy().tobytes())


class Sender:
    """Sends tensors to one peer without blocking compute; keeps at most `depth` sends in flight."""

    def __init__(self, peer: int, device: torch.device, group=None, depth: int = 2, headers: bool = True):
        """`headers=False`: the receiver knows every shape (a Receiver given `shapes`); payloads go bare."""
        self.peer, self.device, self.group, self.depth, self.headers = peer, device, group, depth, headers
        self._pending: deque[tuple[list[dist.Work], tuple[torch.Tensor, ...]]] = deque()
        self.bytes_sent = 0

    def _post(self, header: torch.Tensor | None, payload: torch.Tensor | None, keep: int) -> None:
        tensors = tuple(t for t in (header, payload) if t is not None)
        with talking_to(self.peer):
            works = [isend(t, self.peer, group=self.group) for t in tensors]
            self._pending.append((works, tensors))  # keep buffers alive until sent
            self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
            while len(self._pending) > keep:
                for w in self._pending.popleft()[0]:
                    w.wait()

    def send(self, tensor: torch.Tensor) -> None:
        if not self.headers:
            self._post(None, tensor.to(self.device).contiguous(), keep=self.depth)
            return
        if tensor.ndim > _HEADER_LEN - 3:
            raise ValueError(f"cannot send a {tensor.ndim}-d tensor; at most {_HEADER_LEN - 3} dims")
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        header[0], header[1], header[2] = _KIND_TENSOR, _DTYPES.index(tensor.dtype), tensor.ndim
        header[3 : 3 + tensor.ndim] = torch.tensor(tensor.shape)
        self._post(header.to(self.device), tensor.to(self.device).contiguous(), keep=self.depth)

    def close(self) -> None:
        """Tell the peer the stream ended (headered streams), then wait for every send to finish."""
        end = torch.zeros(_HEADER_LEN, dtype=torch.int64, device=self.device) if self.headers else None
        self._post(end, None, keep=0)


class Receiver:
    """Iterates over the tensors one peer sends until it closes its stream.

    Given `shapes` (and `dtype`), exactly those tensors arrive without headers, and receiving
    tensor i+1 is posted before tensor i is handed out, so the transfer overlaps the caller's
    compute and nothing waits on the host (NCCL waits are stream-ordered).
    """

    def __init__(self, peer: int, device: torch.device, group=None,
                 shapes: Sequence[tuple[int, ...]] | None = None, dtype: torch.dtype | None = None):
        self.peer, self.device, self.group = peer, device, group
        self.shapes, self.dtype = shapes, dtype
        self.bytes_received = 0

    def _post_payload(self, shape: tuple[int, ...]) -> tuple[dist.Work, torch.Tensor]:
        payload = torch.empty(shape, dtype=self.dtype, device=self.device)
        with talking_to(self.peer):
            return irecv(payload, self.peer, group=self.group), payload

    def _known_shapes(self):
        pending = self._post_payload(self.shapes[0]) if self.shapes else None
        for i in range(len(self.shapes)):
            work, payload = pending
            with talking_to(self.peer):
                work.wait()
            self.bytes_received += payload.numel() * payload.element_size()
            if i + 1 < len(self.shapes):
                pending = self._post_payload(self.shapes[i + 1])
            yield payload

    def _next(self, pending: tuple[dist.Work, torch.Tensor]) -> tuple[torch.Tensor | None, tuple]:
        work, header = pending
        with talking_to(self.peer):
            work.wait()
            h = header.tolist()
            if h[0] == _KIND_END:
                return None, ()
            payload = torch.empty(h[3 : 3 + h[2]], dtype=_DTYPES[h[1]], device=self.device)
            irecv(payload, self.peer, group=self.group).wait()
            self.bytes_received += payload.numel() * payload.element_size() + header.numel() * 8
            return payload, self._post_header()  # the next header arrives while we compute

    def _post_header(self) -> tuple[dist.Work, torch.Tensor]:
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        with talking_to(self.peer):
            return irecv(header, self.peer, group=self.group), header

    def __iter__(self):
        if self.shapes is not None:
            yield from self._known_shapes()
            return
        pending = self._post_header()
        while True:
            payload, pending = self._next(pending)
            if payload is None:
                return
            yield payload
