"""Gather throughput: rank 0 pulls every other rank's shards, over the process group and with rsync.

    torchrun --standalone --nproc-per-node 3 benchmarks/gather_throughput.py [MB_PER_RANK] [DIR]

Each rank writes MB_PER_RANK of random bytes in two files into its own directory (as on separate
hosts), then every transfer runs twice: once from nothing, once with everything already there (the
resume path: checksums only). Prints a table on rank 0. On one host this measures the copy and
checksum machinery, not a network; run it across nodes (launch/multinode.sh) for link numbers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nvfp4_pp.runtime import dist
from nvfp4_pp.config import GatherConfig
from nvfp4_pp.checkpoint.gather import gather


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    info = dist.init("gloo", "cpu", 600)
    base = Path(dist.broadcast_object(tempfile.mkdtemp(dir=sys.argv[2] if len(sys.argv) > 2 else None)
                                      if info.is_first else None))
    own = base / f"host{info.rank}" / "work" / f"rank{info.rank}"
    own.mkdir(parents=True)
    files = []
    if not info.is_first:
        for k, size in enumerate((mb * 3 // 4, mb - mb * 3 // 4)):
            files.append(f"rank{info.rank:03d}-{k:05d}.safetensors")
            (own / files[-1]).write_bytes(os.urandom(size * 1024**2))
    rows = []
    for transfer in ("process_group", "rsync"):
        for attempt in ("fresh", "already there"):
            dist.barrier()
            t0 = time.perf_counter()
            g = gather(GatherConfig(shared=False, transfer=transfer), info, own, files)
            dist.barrier()
            seconds = time.perf_counter() - t0
            if info.is_first:
                rows.append((transfer, attempt, g.received_bytes / 1e6, seconds, len(g.skipped)))
        if info.is_first:
            for r in range(1, info.world_size):
                shutil.rmtree(own.parent / f"rank{r}")
    if info.is_first:
        total = mb * (info.world_size - 1)
        print(f"\ngather of {info.world_size - 1} ranks x {mb} MB = {total} MB to rank 0 (one host, gloo)")
        print(f"{'transfer':<14} {'case':<14} {'received MB':>12} {'seconds':>8} {'MB/s':>8} {'skipped':>8}")
        for transfer, attempt, received, seconds, skipped in rows:
            print(f"{transfer:<14} {attempt:<14} {received:>12.1f} {seconds:>8.2f} {total / seconds:>8.0f} {skipped:>8}")
        shutil.rmtree(base)
    dist.shutdown()


if __name__ == "__main__":
    main()
