"""Getting every rank's exported shards to rank 0: shared filesystem, the process group, or rsync.

Each rank exports into a directory on its own host. Rank 0 first checks whether it can see the
other ranks' directories (each rank writes a marker file holding a per-run token); if it can,
nothing is copied. Otherwise rank 0 pulls what it lacks into its own work directory, either as
chunks over the process group that already joins the ranks, or with plain `rsync` from a
short-lived, password-protected daemon each sending rank serves.

Every received file is checked against the sender's sha256. A partially received file
(`.NAME.part`) continues where it stopped and a complete file with the right checksum is not sent
again, so a rerun after a broken gather resumes instead of starting over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import socket
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as tdist

from nvfp4_pp.runtime import dist
from nvfp4_pp.config import GatherConfig
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.files import file_intact
from nvfp4_pp.log import logger
from nvfp4_pp.progress import Progress
from nvfp4_pp.records import ShardRecord

MARKER = ".nvfp4_pp-marker"
CHUNK_BYTES = 64 * 1024**2
RSYNC_USER = "nvfp4_pp"
RSYNC_MODULE = "shards"


class GatherError(NvFp4PpError):
    """Rank 0 could not get every shard; the message names the rank, file and fix."""


@dataclasses.dataclass(slots=True)
class Gathered:
    """Where rank 0 finds each rank's shards, and what it took to get them there."""

    dirs: dict[int, Path]
    """rank -> directory on rank 0's host holding that rank's shard files (empty on other ranks)."""
    shared: bool
    received_bytes: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    """Files already complete on rank 0 with the right checksum (not sent again)."""
    resumed: list[str] = dataclasses.field(default_factory=list)
    """Files whose partial copy on rank 0 was continued."""


def gather(cfg: GatherConfig, info: dist.RankInfo, shard_dir: Path, shards: tuple[ShardRecord, ...],
           chunk_bytes: int = CHUNK_BYTES) -> Gathered:
    """Collective: every rank calls it with its own shard directory and the writer's record of each
    shard in it: the checksums taken when it was written, so no shard is read again before it is sent."""
    files = [s.file for s in shards]
    shard_dir = Path(shard_dir)
    if info.world_size == 1:
        return Gathered({0: shard_dir}, shared=True)
    token = dist.broadcast_object(secrets.token_hex(16) if info.is_first else None)
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / MARKER).write_text(token)
    ranks = dist.all_gather_objects((str(shard_dir), files), info.world_size)  # markers all written

    def decide() -> tuple[bool, str | None]:
        hidden = [r for r, (d, _) in enumerate(ranks) if not _marker_matches(Path(d), token)]
        if cfg.shared is True and hidden:
            return True, (f"gather.shared is true but rank 0 cannot see rank {hidden[0]}'s work directory "
                          f"{ranks[hidden[0]][0]}; set gather.shared: auto (or false) to copy the shards")
        return (not hidden) if cfg.shared == "auto" else cfg.shared, None

    shared, error = dist.broadcast_object(decide() if info.is_first else None)
    if error:
        raise GatherError(error)
    if shared:
        logger.info("gather: rank 0 sees every rank's work directory; nothing to copy")
        return Gathered({r: Path(d) for r, (d, _) in enumerate(ranks)} if info.is_first else {}, shared=True)

    digests = dist.all_gather_objects(
        [] if info.is_first else [(s.file, (shard_dir / s.file).stat().st_size, s.sha256) for s in shards],
        info.world_size,
    )
    result = Gathered({0: shard_dir} if info.is_first else {}, shared=False)
    if info.is_first:
        for r in range(1, info.world_size):
            result.dirs[r] = shard_dir.parent / f"rank{r}"
            result.dirs[r].mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pull = _pull_rsync if cfg.transfer == "rsync" else _pull_process_group
    pull(cfg, info, shard_dir, digests, result, chunk_bytes)
    if info.is_first:
        seconds = time.perf_counter() - t0
        logger.info("gather (%s): received %.2f GB in %.1f s (%.0f MB/s); %d files already present, %d resumed",
                    cfg.transfer, result.received_bytes / 1e9, seconds,
                    result.received_bytes / 1e6 / max(seconds, 1e-9), len(result.skipped), len(result.resumed))
    return result


def _marker_matches(directory: Path, token: str) -> bool:
    try:
        return (directory / MARKER).read_text() == token
    except OSError:
        return False


# ---- transfer over the process group ---------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Job:
    """One file to send from `offset` to its end; the receiver knows size and checksum in advance."""

    file: str
    offset: int
    size: int
    sha256: str

    def chunks(self, chunk_bytes: int) -> list[int]:
        left, out = self.size - self.offset, []
        while left > 0:
            out.append(min(chunk_bytes, left))
            left -= out[-1]
        return out


def _plan_requests(directory: Path, digests: list[tuple[str, int, str]], result: Gathered) -> list[_Job]:
    """Rank 0: which of one rank's files to ask for, and from which byte (resume a partial copy)."""
    jobs = []
    for file, size, digest in digests:
        final, part = directory / file, directory / f".{file}.part"
        if size == 0:
            final.write_bytes(b"")
            continue
        if file_intact(final, digest, size):
            result.skipped.append(file)
            continue
        offset = part.stat().st_size if part.is_file() else 0
        if offset >= size:
            part.unlink()
            offset = 0
        elif offset:
            result.resumed.append(file)
        jobs.append(_Job(file, offset, size, digest))
    return jobs


def _transfer_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


Digests = list[list[tuple[str, int, str]]]
"""Per rank: (file, size, sha256) of each shard it exported (empty for rank 0)."""


def _pull_process_group(cfg: GatherConfig, info: dist.RankInfo, shard_dir: Path, digests: Digests,
                        result: Gathered, chunk_bytes: int) -> None:
    """Round 1 sends what rank 0 lacks, round 2 re-sends files whose sha256 failed, then one outcome.

    Rank 0 decides each round and broadcasts (requests, error), so every rank leaves together.
    """
    device = _transfer_device()
    failed: dict[int, list[_Job]] = {}
    error = None
    for attempt in range(3):
        requests: dict[int, list[_Job]] = {}
        if info.is_first and error is None:
            if attempt == 0:
                requests = {r: _plan_requests(result.dirs[r], digests[r], result) for r in range(1, info.world_size)}
            elif attempt == 1:
                requests = failed
            elif any(failed.values()):
                r, jobs = next((r, j) for r, j in failed.items() if j)
                error = (f"rank {r}'s file {jobs[0].file} arrived twice with a wrong sha256; check the "
                         "network and disks of both hosts, then rerun (complete files are kept)")
        requests, error = dist.broadcast_object((requests, error) if info.is_first else None)
        if error or not any(requests.values()):
            break
        if info.is_first:
            failed, error = _receive(result, requests, device, chunk_bytes)
        elif requests.get(info.rank):
            _send(shard_dir, requests[info.rank], device, chunk_bytes)
    if error:
        raise GatherError(error)


def _send(shard_dir: Path, jobs: list[_Job], device: torch.device, chunk_bytes: int) -> None:
    """Stream the requested byte ranges to rank 0, at most two chunks in flight."""
    in_flight: deque[tuple[tdist.Work, torch.Tensor]] = deque()
    progress = Progress("gather: sending", sum(job.size - job.offset for job in jobs), "GB", scale=1e9)
    for job in jobs:
        with open(shard_dir / job.file, "rb") as f:
            f.seek(job.offset)
            for n in job.chunks(chunk_bytes):
                buf = bytearray(n)
                if f.readinto(buf) != n:
                    raise GatherError(f"{shard_dir / job.file} shrank while being sent; do not touch the work directory during a run")
                chunk = torch.frombuffer(buf, dtype=torch.uint8).to(device)
                in_flight.append((dist.isend(chunk, 0), chunk))
                while len(in_flight) > 2:
                    in_flight.popleft()[0].wait()
                progress.advance(n)
    while in_flight:
        in_flight.popleft()[0].wait()


class _Sink:
    """Rank 0's side of one sender: appends chunks to `.NAME.part`, checks sha256, renames when whole."""

    def __init__(self, directory: Path, jobs: list[_Job]):
        self.directory, self.jobs = directory, deque(jobs)
        self.failed: list[_Job] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()  # started again for each file
        self._pos = 0

    def _open(self, job: _Job) -> None:
        part = self.directory / f".{job.file}.part"
        self._hash = hashlib.sha256()
        if job.offset:
            with open(part, "rb") as f:
                while block := f.read(8 * 1024**2):
                    self._hash.update(block)
        self._file = open(part, "r+b" if job.offset else "wb")
        self._file.truncate(job.offset)
        self._file.seek(job.offset)
        self._pos = job.offset

    def write(self, data: memoryview) -> None:
        job = self.jobs[0]
        if self._file is None:
            self._open(job)
        assert self._file is not None  # _open opened it
        self._file.write(data)
        self._hash.update(data)
        self._pos += len(data)
        if self._pos == job.size:
            self._file.close()
            self._file = None
            self.jobs.popleft()
            part = self.directory / f".{job.file}.part"
            if self._hash.hexdigest() == job.sha256:
                os.replace(part, self.directory / job.file)
            else:
                part.unlink()
                self.failed.append(dataclasses.replace(job, offset=0))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _receive(result: Gathered, requests: dict[int, list[_Job]], device: torch.device,
             chunk_bytes: int) -> tuple[dict[int, list[_Job]], str | None]:
    """Take chunks from every sender in turn, one receive always posted ahead per sender.

    Senders stream concurrently, so none waits longer than a round of chunks for its turn. A local
    write error stops writing but not receiving: every sender finishes, then all ranks fail together.
    """
    sinks = {r: _Sink(result.dirs[r], jobs) for r, jobs in requests.items() if jobs}
    plans = {r: deque(n for job in jobs for n in job.chunks(chunk_bytes)) for r, jobs in requests.items() if jobs}
    pending: dict[int, tuple[tdist.Work, torch.Tensor]] = {}
    error = None
    progress = Progress("gather: receiving", sum(sum(p) for p in plans.values()), "GB", scale=1e9)

    def post(r: int) -> None:
        if plans[r]:
            buf = torch.empty(plans[r].popleft(), dtype=torch.uint8, device=device)
            pending[r] = (dist.irecv(buf, r), buf)

    for r in plans:
        post(r)
    try:
        while pending:
            for r in list(pending):
                work, buf = pending.pop(r)
                work.wait()
                post(r)
                result.received_bytes += buf.numel()
                progress.advance(buf.numel())
                if error is None:
                    try:
                        sinks[r].write(buf.cpu().numpy().data)
                    except OSError as e:
                        error = f"rank 0 cannot write rank {r}'s shard into {result.dirs[r]}: {e}; free space there and rerun"
    finally:
        for sink in sinks.values():
            sink.close()
    return {r: sink.failed for r, sink in sinks.items()}, error


# ---- transfer with rsync ---------------------------------------------------------------------


def reachable_address() -> str:
    """This host's address on the route to the rendezvous host (a UDP connect sends no packet)."""
    target = os.environ.get("MASTER_ADDR", "127.0.0.1")
    family, _, _, _, sockaddr = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


class _RsyncDaemon:
    """`rsync --daemon` serving one directory read-only to a user holding this run's secret."""

    def __init__(self, directory: Path, address: str, port: int, secret: str):
        self.scratch = Path(tempfile.mkdtemp(prefix="nvfp4_pp-rsyncd-"))
        secrets_file = self.scratch / "secrets"
        secrets_file.write_text(f"{RSYNC_USER}:{secret}\n")
        secrets_file.chmod(0o600)
        (self.scratch / "rsyncd.conf").write_text(
            f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
            f"[{RSYNC_MODULE}]\npath = {directory}\nread only = yes\n"
            f"auth users = {RSYNC_USER}\nsecrets file = {secrets_file}\n"
        )
        self.address, self.port = address, port
        self.log = self.scratch / "rsyncd.log"
        self.process = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={self.scratch / 'rsyncd.conf'}",
             f"--address={address}", f"--port={port}", f"--log-file={self.log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 20.0) -> str | None:
        """None once the port accepts connections, else why not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log.read_text()[-500:] if self.log.is_file() else ""
                return f"rsync daemon on {self.address}:{self.port} exited ({log.strip()}); set gather.rsync_port to a free port"
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return None
            except OSError:
                time.sleep(0.1)
        return f"rsync daemon on {self.address}:{self.port} did not start within {timeout_s:.0f} s"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for f in self.scratch.iterdir():
            f.unlink()
        self.scratch.rmdir()


def _pull_rsync(cfg: GatherConfig, info: dist.RankInfo, shard_dir: Path, digests: Digests,
                result: Gathered, chunk_bytes: int) -> None:
    """Each sending rank serves its directory; rank 0 pulls all of them at once, then checks sha256.

    rsync picks its own block sizes (`chunk_bytes` is for the process-group transfer only).
    """
    secret = dist.broadcast_object(secrets.token_hex(24) if info.is_first else None)
    daemon, problem, endpoint = None, None, None
    if not info.is_first and digests[info.rank]:
        try:
            daemon = _RsyncDaemon(shard_dir, reachable_address(), cfg.rsync_port + info.local_rank, secret)
            problem = daemon.wait_ready()
            endpoint = (daemon.address, daemon.port)
        except OSError as e:
            problem = f"cannot start `rsync --daemon` on {info.host}: {e}; install rsync on every host"
    served = dist.all_gather_objects((endpoint, problem), info.world_size)
    error = next((f"rank {r}: {p}" for r, (_, p) in enumerate(served) if p), None)
    try:
        if info.is_first and error is None:
            error = _rsync_all(served, digests, result, secret)
        error = dist.broadcast_object(error if info.is_first else None)
    finally:
        if daemon is not None:
            daemon.stop()
    if error:
        raise GatherError(error)


def _rsync_all(served: list, digests: Digests, result: Gathered, secret: str) -> str | None:
    """Rank 0: one `rsync` per sending rank, all at once; the first problem as a message, else None."""
    env = {**os.environ, "RSYNC_PASSWORD": secret}
    runs = {}
    for r in range(1, len(served)):
        wanted = []
        for file, size, digest in digests[r]:
            final = result.dirs[r] / file
            if file_intact(final, digest, size):
                result.skipped.append(file)
            else:
                wanted.append(file)
        if not wanted:
            continue
        address, port = served[r][0]
        host = f"[{address}]" if ":" in address else address
        before = {f: (result.dirs[r] / ".rsync-partial" / f) for f in wanted}
        result.resumed += [f for f, p in before.items() if p.is_file()]
        list_file = result.dirs[r] / ".rsync-files"
        list_file.write_text("".join(f + "\n" for f in wanted))
        runs[r] = subprocess.Popen(
            ["rsync", "-a", "--ignore-times", "--partial", "--partial-dir=.rsync-partial", "--stats", f"--files-from={list_file}",
             "--contimeout=30", "--timeout=600",
             f"rsync://{RSYNC_USER}@{host}:{port}/{RSYNC_MODULE}/", f"{result.dirs[r]}/"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    error = None
    for r, proc in runs.items():
        out, _ = proc.communicate()
        (result.dirs[r] / ".rsync-files").unlink()
        if proc.returncode != 0:
            error = error or f"rsync from rank {r} failed (exit {proc.returncode}): {out.strip()[-800:]}"
            continue
        for line in out.splitlines():
            if line.startswith("Total bytes received:"):
                result.received_bytes += int(line.split(":")[1].strip().replace(",", ""))
    if error:
        return error
    for r in range(1, len(served)):
        for file, size, digest in digests[r]:
            if file not in result.skipped and not file_intact(result.dirs[r] / file, digest):
                return f"rank {r}'s file {file} arrived by rsync with a wrong sha256; delete {result.dirs[r]} and rerun"
    return None
