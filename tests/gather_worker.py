"""Run under `torchrun --standalone --nproc-per-node 3`: gather scenarios on real gloo ranks.

Each rank plays a separate host with its own directory under BASE/host{rank}; rank 0 writes what
it observed to BASE/result.json for tests/test_gather.py to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nvfp4_pp.runtime import dist
from nvfp4_pp.checkpoint import gather as gather_module
from nvfp4_pp.config import GatherConfig
from nvfp4_pp.files import sha256_of
from nvfp4_pp.checkpoint.gather import GatherError, gather
from nvfp4_pp.records import ShardRecord

CHUNK = 1000
SIZES = {1: {"a.bin": 2500, "b.bin": 4100, "empty.bin": 0}, 2: {"c.bin": 3000, "d.bin": 999}}


def content(rank: int, name: str, size: int) -> bytes:
    seed = (rank * 7919 + sum(map(ord, name))) % 251
    return bytes((seed + i * 31) % 256 for i in range(size))


def main(base: Path) -> None:
    info = dist.init("gloo", "cpu", 120)
    observed = {}
    own = base / f"host{info.rank}" / "work" / f"rank{info.rank}"
    own.mkdir(parents=True)
    files = SIZES.get(info.rank, {})
    for name, size in files.items():
        (own / name).write_bytes(content(info.rank, name, size))
    shards = tuple(ShardRecord(n, (), 0, sha256_of(own / n)) for n in sorted(files))

    # Rank 0 already holds some of the files from an earlier, broken gather.
    if info.is_first:
        r1, r2 = own.parent / "rank1", own.parent / "rank2"
        r1.mkdir(), r2.mkdir()
        (r1 / "a.bin").write_bytes(content(1, "a.bin", 2500))                 # complete, right: skipped
        (r1 / ".b.bin.part").write_bytes(content(1, "b.bin", 4100)[:1500])    # partial: continues
        (r2 / ".c.bin.part").write_bytes(b"\0" * 1200)                         # corrupt partial: sent again whole
        (r2 / "d.bin").write_bytes(b"x" * 999)                                 # stale complete: sent again
    dist.barrier()

    for name, cfg in [("process_group", GatherConfig(shared=False)),
                      ("rsync", GatherConfig(shared=False, transfer="rsync", rsync_port=29650))]:
        if name == "rsync" and info.is_first:  # start over, with one stale file
            for r in (1, 2):
                for f in (own.parent / f"rank{r}").iterdir():
                    f.unlink()
            (own.parent / "rank2" / "d.bin").write_bytes(b"y" * 999)
        g = gather(cfg, info, own, shards)
        if info.is_first:
            observed[name] = {
                "received_bytes": g.received_bytes, "skipped": sorted(g.skipped), "resumed": sorted(g.resumed),
                "shared": g.shared,
                "files": {f"{r}/{f}": sha256_of(g.dirs[r] / f) == sha256_of(base / f"host{r}" / "work" / f"rank{r}" / f)
                          for r, fs in SIZES.items() for f in fs},
                "dirs": {r: str(d) for r, d in g.dirs.items()},
            }

    # The same work directory on every rank (one host, or a shared filesystem): nothing moves.
    g = gather(GatherConfig(), info, own, shards)
    if info.is_first:
        observed["auto"] = {"shared": g.shared, "dirs": {r: str(d) for r, d in g.dirs.items()}}

    # shared: true where rank 0 cannot see rank 2's directory (as on another host): one agreed error.
    seen_by_rank0 = gather_module._marker_matches
    gather_module._marker_matches = lambda d, token: "host2" not in str(d) and seen_by_rank0(d, token)
    try:
        gather(GatherConfig(shared=True), info, own, [])
        error = None
    except GatherError as e:
        error = str(e)
    errors = dist.all_gather_objects(error, info.world_size)
    if info.is_first:
        observed["forced_shared"] = errors
        (base / "result.json").write_text(json.dumps(observed, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
