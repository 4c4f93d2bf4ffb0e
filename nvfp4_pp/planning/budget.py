"""How much memory each rank may use: measured on the rank itself, capped by config.

Three kinds of rank, because they fail in different ways:

- `discrete`: a GPU with its own memory. The stage lives in CUDA memory, so the budget is what
  `torch.cuda.mem_get_info` reports free after the CUDA context exists; host RAM (baseline,
  export buffer) is a second, separate pool.
- `unified`: an integrated GPU sharing system memory (GB10 / DGX Spark, Jetson). CUDA's free
  figure there is not a separate memory (accelerate read it as a 5 TB GPU), so the budget is the
  host's available RAM from psutil minus `reserve_gb`: one pool for everything.
- `cpu`: the stage runs on the CPU; one pool, from psutil, like `unified`.

Ranks on one host share its RAM, so the psutil pool is divided among them. Facts are measured
per rank (`measure`) and turned into budgets by a pure function (`budgets`) once every rank's
facts are known.
"""

from __future__ import annotations

import dataclasses
import resource
from collections import Counter
from typing import Literal

import psutil
import torch

from nvfp4_pp.config import ConfigError
from nvfp4_pp.records import Memory

GB = 10**9
"""Sizes are reported and configured in decimal gigabytes (1e9 bytes)."""

Kind = Literal["cpu", "unified", "discrete"]
MemoryLimit = float | list[float] | dict[str, float] | None


@dataclasses.dataclass(frozen=True, slots=True)
class RankFacts:
    """What one rank measured about itself at start (plain data, all-gathered to every rank)."""

    rank: int
    host: str
    device: str
    kind: Kind
    device_free: int
    """Free CUDA memory in bytes (discrete GPUs only; 0 otherwise)."""
    host_available: int
    """psutil's available RAM on this host, in bytes."""
    baseline: int
    """This process's peak RSS so far: Python, torch, transformers, modelopt, calibration data."""


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """The most one rank may use, per pool, in bytes (its baseline included)."""

    rank: int
    host: str
    device: str
    kind: Kind
    pool: int
    """Stage-device pool: CUDA memory (discrete) or this rank's share of host RAM (cpu, unified)."""
    host_pool: int
    """This rank's share of host RAM; the same pool as `pool` unless the GPU is discrete."""
    baseline: int
    capped: bool
    """True when `pipeline.memory_limit_gb` lowered the measured figure."""

    @property
    def shared(self) -> bool:
        """Stage tensors and host-side buffers draw from one memory."""
        return self.kind != "discrete"


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measured_peak(kind: Kind) -> Memory:
    """This rank's measured peak bytes per pool, to set beside the plan's prediction."""
    host = peak_rss()
    if kind == "cpu":
        return Memory(host)
    device = torch.cuda.max_memory_allocated()
    return Memory(host + device) if kind == "unified" else Memory(host, device)


def device_kind(device: torch.device) -> Kind:
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return "unified" if getattr(props, "is_integrated", False) else "discrete"


def measure(rank: int, host: str, device: torch.device) -> RankFacts:
    """This rank's facts, measured after the libraries the run needs are imported (they are baseline)."""
    import modelopt.torch.export  # noqa: F401  (imported here so the baseline includes them)
    import modelopt.torch.quantization  # noqa: F401

    kind = device_kind(device)
    device_free = torch.cuda.mem_get_info(device)[0] if kind == "discrete" else 0
    return RankFacts(rank, host, str(device), kind, device_free, psutil.virtual_memory().available, peak_rss())


def _limit_of(limit: MemoryLimit, facts: RankFacts, world_size: int, ranks_on_host: int) -> int | None:
    """This rank's cap in bytes from `pipeline.memory_limit_gb`, or None when uncapped."""
    if limit is None:
        return None
    if isinstance(limit, list):
        if len(limit) != world_size:
            raise ConfigError(
                f"pipeline.memory_limit_gb has {len(limit)} entries but {world_size} ranks are running; "
                "give one number per rank, one number for all, or a mapping host -> GB"
            )
        return int(limit[facts.rank] * GB)
    if isinstance(limit, dict):
        if facts.host not in limit:
            raise ConfigError(
                f"pipeline.memory_limit_gb has no entry for host {facts.host!r} (it has {sorted(limit)}); "
                "add the host or use one number for every rank"
            )
        return int(limit[facts.host] * GB / ranks_on_host)
    return int(limit * GB)


def budgets(facts: list[RankFacts], memory_limit_gb: MemoryLimit = None, reserve_gb: float = 0.0) -> list[Budget]:
    """Every rank's budget from every rank's facts (pure: the same on all ranks).

    `memory_limit_gb` is a number (each rank), a per-rank list, or a mapping host -> GB (that
    host's total, shared evenly by its ranks). A limit only ever lowers the measured figure.
    """
    ranks_on_host = Counter(f.host for f in facts)
    available = {h: min(f.host_available for f in facts if f.host == h) for h in ranks_on_host}
    out = []
    for f in facts:
        share = max(0, available[f.host] - int(reserve_gb * GB)) // ranks_on_host[f.host]
        host_pool = f.baseline + share
        pool = f.device_free if f.kind == "discrete" else host_pool
        cap = _limit_of(memory_limit_gb, f, len(facts), ranks_on_host[f.host])
        capped = False
        if cap is not None and cap < pool:
            capped, pool = True, cap
            host_pool = host_pool if f.kind == "discrete" else cap
        out.append(Budget(f.rank, f.host, f.device, f.kind, pool, host_pool, f.baseline, capped))
    return out
