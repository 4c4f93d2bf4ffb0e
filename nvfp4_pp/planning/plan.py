"""Who gets which decoder layers: contiguous stages in rank order, sized to each rank's memory.

Stage order is rank order (rank r feeds rank r+1, embeddings on rank 0), so a plan is a split
of the layers into world_size contiguous blocks, block r on rank r; the ranks' budgets are
caps in that same order. `auto` picks the split in two steps:

1. the smallest slowest stage T (a stage's compute is proportional to its layers' bytes) for
   which every rank's predicted peak fits its budget;
2. among splits with stages <= T, the smallest worst fill F (predicted peak / budget). This is
   what gives a small node a small slice wherever it sits in rank order: it moves layers off the
   ranks with the least room first, and evens out headroom among the others.

Both steps search over one feasibility test, a greedy walk in rank order that gives each rank
the longest block within (T, F) while leaving a layer for each later rank. For layers of equal
size (every dense model) it finds a split whenever one exists: a rank's peak only grows with its
block, so taking fewer layers never helps a later rank.

Pure functions of plain data (budget.Budget, memory.ModelSizes): testable without a process group.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.planning.budget import GB, Budget
from nvfp4_pp.planning.memory import STREAM_WINDOW, ModelSizes, Need, Workload, stage_need


class PlanError(NvFp4PpError):
    pass


Stream = Literal["auto", "never", "always", "layer-major"]
"""How a planning pass treats stages: resident only, streaming only, or (layer-major) each stage
resident where it fits and streaming where it does not."""


@dataclasses.dataclass(frozen=True, slots=True)
class StagePlan:
    """One rank's decoder layers [start, stop) and their predicted peak against its budget."""

    budget: Budget
    start: int
    stop: int
    need: Need
    streaming: bool = False
    """The stage's layers do not all fit: they are brought to the device a window at a time."""

    @property
    def layers(self) -> int:
        return self.stop - self.start

    @property
    def peak(self) -> int:
        """Predicted peak in the rank's main pool (see memory.Need.peak)."""
        return self.need.peak(self.budget.shared)

    @property
    def fill(self) -> float:
        return _fill(self.need, self.budget)

    def overflows(self) -> list[str]:
        """'N GB missing on <pool>' for each pool this stage does not fit in."""
        b, n = self.budget, self.need
        pools = [("memory" if b.kind == "cpu" else "unified memory", n.host, b.pool)] if b.shared else [
            (f"{b.device} memory", n.device, b.pool), ("host memory", n.host, b.host_pool)]
        return [f"{(need - have) / GB:.2f} GB missing on rank {b.rank} ({b.host}, {what}: needs "
                f"{need / GB:.2f} GB, budget {have / GB:.2f} GB)" for what, need, have in pools if need > have]


def _fill(need: Need, budget: Budget) -> float:
    if budget.shared:
        return need.host / max(budget.pool, 1)
    return max(need.device / max(budget.pool, 1), need.host / max(budget.host_pool, 1))


class _Problem:
    """Prefix sums and per-rank need for one planning problem."""

    def __init__(self, sizes: ModelSizes, budgets: list[Budget], workload: Workload, wire_on_host: bool,
                 stream: Stream = "never"):
        self.sizes, self.budgets, self.workload, self.wire_on_host = sizes, budgets, workload, wire_on_host
        self.stream = stream
        self.n, self.world = sizes.num_layers, len(budgets)
        self.prefix = [0]
        for b in sizes.layer_bytes:
            self.prefix.append(self.prefix[-1] + b)

    def compute(self, start: int, stop: int) -> int:
        return self.prefix[stop] - self.prefix[start]

    def stage(self, rank: int, start: int, stop: int) -> StagePlan:
        """The stage's plan: resident, or streaming where `stream` asks for it (`auto`: when resident
        does not fit)."""
        b = self.budgets[rank]

        def plan(streaming: bool) -> StagePlan:
            need = stage_need(self.sizes, b.kind, b.baseline, start, stop, first=rank == 0,
                              last=rank == self.world - 1, workload=self.workload,
                              wire_on_host=self.wire_on_host and b.kind != "cpu", streaming=streaming)
            return StagePlan(b, start, stop, need, streaming)

        if self.stream == "always":
            return plan(True)
        resident = plan(False)
        if self.stream == "never" or resident.fill <= 1.0:
            return resident
        streaming = plan(True)
        return streaming if streaming.fill < resident.fill else resident

    def greedy(self, max_compute: float, max_fill: float) -> list[StagePlan] | None:
        """The front-loaded split within (max_compute, max_fill), or None if there is none."""
        plans, start = [], 0
        for rank in range(self.world):
            last = rank == self.world - 1
            stop_max = self.n if last else self.n - (self.world - rank - 1)
            best = None
            for stop in range(start + 1, stop_max + 1):  # peaks grow with stop: stop at the first misfit
                plan = self.stage(rank, start, stop)
                if self.compute(start, stop) > max_compute or plan.fill > max_fill:
                    break
                best = plan
            if best is None or (last and best.stop != self.n):
                return None
            plans.append(best)
            start = best.stop
        return plans

    def smallest_fill(self, max_compute: float, high: float) -> float:
        """The least F (within 1e-4 relative) for which greedy(max_compute, F) succeeds."""
        low = 0.0
        while high - low > 1e-4 * high:
            mid = (low + high) / 2
            low, high = (low, mid) if self.greedy(max_compute, mid) is not None else (mid, high)
        return high


def _even_counts(num_layers: int, world_size: int) -> list[int]:
    base, extra = divmod(num_layers, world_size)
    return [base + (1 if r >= world_size - extra else 0) for r in range(world_size)]


def plan_stages(
    sizes: ModelSizes,
    budgets: list[Budget],
    layers: Literal["auto"] | list[int],
    workload: Workload,
    wire_on_host: bool = False,
    stream: Stream = "never",
) -> list[StagePlan]:
    """One StagePlan per rank, covering every layer once, each within its rank's budget.

    `stream` (pipeline.stream): `never` plans resident stages only; `auto` plans them first and,
    when they do not fit, plans again with every stage layer-major (all samples through a layer
    before the next, which a streaming stage needs), each stage streaming where it must;
    `always` streams every stage. Raises PlanError naming how many GB are missing on which rank
    when nothing fits, and when an explicit `pipeline.layers` list does not fit or does not match.
    """
    check_split(sizes.num_layers, len(budgets), layers)
    if stream == "auto":
        try:
            return plan_stages(sizes, budgets, layers, workload, wire_on_host, "never")
        except PlanError:
            layer_major = dataclasses.replace(workload, layer_major=True)
            return plan_stages(sizes, budgets, layers, layer_major, wire_on_host, "layer-major")
    if stream == "always":
        workload = dataclasses.replace(workload, layer_major=True)
    n = sizes.num_layers
    problem = _Problem(sizes, budgets, workload, wire_on_host, stream)
    if layers != "auto":
        plans = _explicit(problem, list(layers))
        missing = [m for p in plans for m in p.overflows()]
        if missing:
            hint = _auto_hint(problem)
            raise PlanError(f"pipeline.layers = {list(layers)} does not fit: " + "; ".join(missing) + hint)
        return plans
    if problem.greedy(float("inf"), 1.0) is None:
        raise PlanError(_does_not_fit(problem))
    sums = sorted({problem.compute(a, b) for a in range(n) for b in range(a + 1, n + 1)})
    lo, hi = 0, len(sums) - 1  # the smallest slowest stage: binary search over every block's compute
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if problem.greedy(sums[mid], 1.0) is not None else (mid + 1, hi)
    fill = problem.smallest_fill(sums[lo], 1.0)
    best = problem.greedy(sums[lo], fill)
    assert best is not None and all(p.fill <= 1.0 for p in best)
    return best


def check_split(num_layers: int, world_size: int, layers: Literal["auto"] | list[int]) -> None:
    """Refuse a split that cannot exist whatever the budgets; cheap, so runs check it before anything else."""
    n, world = num_layers, world_size
    if world > n:
        raise PlanError(f"{world} ranks but the model has only {n} decoder layers; use at most {n} ranks")
    if layers == "auto":
        return
    counts = list(layers)
    if len(counts) != world:
        raise PlanError(
            f"pipeline.layers has {len(counts)} entries but {world} ranks are running; "
            f"give one count per rank or use 'auto'"
        )
    if any(c < 1 for c in counts):
        raise PlanError(f"pipeline.layers = {counts}: every rank needs at least one layer")
    if sum(counts) != n:
        raise PlanError(
            f"pipeline.layers = {counts} sums to {sum(counts)} but the model has "
            f"{n} decoder layers; make the counts sum to {n}"
        )


def _explicit(problem: _Problem, counts: list[int]) -> list[StagePlan]:
    plans, start = [], 0
    for rank, c in enumerate(counts):
        plans.append(problem.stage(rank, start, start + c))
        start += c
    return plans


def _auto_hint(problem: _Problem) -> str:
    plans = problem.greedy(float("inf"), 1.0)
    if plans is None:
        return "; no split fits these budgets either"
    return f"; 'auto' would fit, e.g. [{', '.join(str(p.layers) for p in plans)}]"


def _does_not_fit(problem: _Problem) -> str:
    """Where the model overflows when load is spread to fill every rank equally."""
    even, start = [], 0
    for rank, c in enumerate(_even_counts(problem.n, problem.world)):
        even.append(problem.stage(rank, start, start + c))
        start += c
    fill = problem.smallest_fill(float("inf"), max(p.fill for p in even))
    plans = problem.greedy(float("inf"), fill) or even
    missing = [m for p in plans for m in p.overflows()]
    total = sum(max(0, p.need.host - p.budget.host_pool) + (0 if p.budget.shared else max(0, p.need.device - p.budget.pool))
                for p in plans)
    return (
        f"the model does not fit in these ranks' memory: {total / GB:.2f} GB missing in all. "
        f"The closest split [{', '.join(str(p.layers) for p in plans)}] leaves " + "; ".join(missing)
        + ". Add ranks or memory, raise pipeline.memory_limit_gb / lower pipeline.reserve_gb if they are "
        "set too tight, or lower calibration.max_length / batch_size"
    )


H200_SOLVE = (20e-6, 0.6e-9, 6.4e-14, 0.1)
"""GPTQ's solve on one H200, fitted to benchmarks/gptq_solve.py (2026-12-04, INT4 and W4A16 NVFP4 alike
within 20%): seconds per column, per weight of a column, per in_features^3 of a damped inverse
(modelopt's `compute_hessian_inverse`), and per Linear group (checks, first block, graph recording)."""


def gptq_layer_solve_seconds(sizes: ModelSizes) -> float:
    """One decoder layer's GPTQ solve on an H200: q/k/v and gate/up each one stacked group with one
    inverse, o_proj and down_proj alone (3.6 s for Llama-70B against 3.65 s measured in a run)."""
    column, weight, inverse, group = H200_SOLVE
    q, kv = sizes.heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim
    groups = [(q + 2 * kv, sizes.hidden), (sizes.hidden, q), (2 * sizes.intermediate, sizes.hidden),
              (sizes.hidden, sizes.intermediate)]  # (rows, in_features)
    return sum(cols * (column + rows * weight) + inverse * cols ** 3 + group for rows, cols in groups)


def gptq_time_line(plans: list[StagePlan], sizes: ModelSizes, mode: str) -> str:
    """The plan's predicted GPTQ solve time: `mode` flat or parallel, every stage solves its layers at
    once (the largest stage sets the time); sequential, the stages take turns (their sum)."""
    per_layer = gptq_layer_solve_seconds(sizes)
    layers = [p.layers for p in plans]
    total = per_layer * (sum(layers) if mode == "sequential" else max(layers))
    if len(plans) == 1:
        how = "one stage"
    elif mode == "sequential":
        how = "the stages solve in turn: boundary sequential"
    else:
        how = f"the {len(plans)} stages solve at once, {mode}: {sum(layers) / max(layers):.1f}x sooner than in turn"
    return (f"GPTQ: solve predicted at {per_layer:.1f} s a layer on an H200 (measured rate; other devices differ), "
            f"{total:.{0 if total >= 10 else 1}f} s for this split ({how}); the Hessian passes come on top")


def describe(plans: list[StagePlan], sizes: ModelSizes | None = None, gptq: str | None = None) -> list[str]:
    """The plan as table lines: per rank host, device, budget, layers, shape, predicted peak; with
    `sizes`, when any stage streams, a line with what taking turns costs in time (the one part of
    streaming's time the plan can predict from sizes alone), and with `gptq` (flat, sequential or
    parallel) the predicted GPTQ solve time."""
    lines = [f"{'rank':<5} {'host':<14} {'device':<8} {'memory':<9} {'budget GB':>9} {'layers':>12} "
             f"{'shape':<9} {'peak GB':>8} {'fill':>5}  host RAM peak/budget GB"]
    for p in plans:
        b = p.budget
        host = "(same pool)" if b.shared else f"{p.need.host / GB:.2f}/{b.host_pool / GB:.2f}"
        cap = " (capped)" if b.capped else ""
        shape = "streaming" if p.streaming else "resident"
        lines.append(f"{b.rank:<5} {b.host[:14]:<14} {b.device:<8} {b.kind:<9} {b.pool / GB:>9.2f} "
                     f"{f'{p.start}-{p.stop - 1} ({p.layers})':>12} {shape:<9} {p.peak / GB:>8.2f} {p.fill:>5.0%}  "
                     f"{host}{cap}")
    if sizes is not None and any(p.streaming for p in plans):
        stages = [sum(sizes.layer_bytes[p.start:p.stop]) for p in plans]
        lines.append(f"layer-major: stages calibrate in turn, a streaming stage holding {STREAM_WINDOW} layers at a "
                     f"time; taking turns alone makes calibration {sum(stages) / max(stages):.1f}x as long as this "
                     "split's with every stage resident and all busy at once; a streaming layer's own costs (its "
                     "read, its export in the loop) come on top and are not predicted: each layer's log line "
                     "splits its time")
    if sizes is not None and gptq is not None:
        lines.append(gptq_time_line(plans, sizes, gptq))
    return lines


def owner_of(tensor_name: str, arch, ranges: list[tuple[int, int]]) -> int:
    """Rank that exports a source tensor: its layer's rank, else first (embeddings) or last (norm, lm_head)."""
    layer = arch.layer_of(tensor_name)
    if layer is not None:
        for rank, (start, stop) in enumerate(ranges):
            if start <= layer < stop:
                return rank
        raise PlanError(f"{tensor_name!r} names layer {layer}, outside the model's layers")
    return len(ranges) - 1 if arch.on_last_stage(tensor_name) else 0
