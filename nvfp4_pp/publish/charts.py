"""The card's pictures, drawn from the run record with matplotlib (the optional `charts` extra).

- `pipeline-timeline.png`: per rank, its phases as bars over wall time, so a stage that waits is
  visible at a glance.
- `quantization-error.png`: per decoder layer, the relative weight error of each quantized Linear,
  and the range of the Linears' calibrated input amax.

Without matplotlib the run logs how to get them and the card is written without them.
"""

from __future__ import annotations

from pathlib import Path

from nvfp4_pp.log import logger
from nvfp4_pp.phases import Phase
from nvfp4_pp.records import Charts, LinearStats, PhaseSpan
from nvfp4_pp.publish.run_record import LAYER_INDEX, RunRecord

TIMELINE = "pipeline-timeline.png"
LAYERS = "quantization-error.png"
PHASE_COLORS: dict[str, str] = {Phase.START_UP: "#c7c7c7", Phase.LOAD: "#1f77b4", Phase.CALIBRATE: "#ff7f0e",
                                 Phase.EXPORT: "#2ca02c", Phase.GATHER: "#9467bd", Phase.ASSEMBLE: "#8c564b"}


def render_charts(directory: Path, record: RunRecord) -> Charts:
    """Write the pictures into `directory`; returns the files of those drawn."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("charts: matplotlib is not installed, so the card has no timeline or error chart; "
                    "`pip install 'nvfp4_pp[charts]'` adds them to the next run")
        return Charts()
    timeline = layers = None
    if any(r.spans for r in record.ranks):
        _timeline(Figure, record).savefig(Path(directory) / TIMELINE, dpi=110, metadata={"Software": None})
        timeline = TIMELINE
    linears = record.linears
    if any(LAYER_INDEX.search(name) for name in linears):
        _layers(Figure, linears).savefig(Path(directory) / LAYERS, dpi=110, metadata={"Software": None})
        layers = LAYERS
    return Charts(timeline, layers)


def _timeline(Figure, record: RunRecord):
    """Horizontal bars: one row per rank, one bar per phase, x = seconds since the first rank started."""
    ranks = record.ranks
    t0 = min(s.start for r in ranks for s in r.spans)
    fig = Figure(figsize=(9, 1.6 + 0.45 * len(ranks)), layout="constrained")
    ax = fig.subplots()
    seen = set()
    for r in ranks:
        spans = list(r.spans)
        if r.rank == 0 and spans:  # rank 0 then assembles and verifies (its wall time so far)
            end = max(s.end for s in spans)
            spans.append(PhaseSpan(Phase.ASSEMBLE, end, end + record.assemble_s))
        for s in spans:
            label = s.name if s.name not in seen else None
            seen.add(s.name)
            ax.barh(r.rank, s.end - s.start, left=s.start - t0, height=0.6,
                    color=PHASE_COLORS.get(s.name, "#17becf"), label=label)
    ax.set_yticks([r.rank for r in ranks], [f"rank {r.rank}  layers {r.layers[0]}-{r.layers[1] - 1}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("wall time since start (s)")
    ax.set_title(f"Pipeline timeline: {len(ranks)} rank(s), {record.wall_s:.0f} s")
    fig.legend(loc="outside lower center", ncols=len(seen), fontsize="small", frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _layers(Figure, linears: dict[str, LinearStats]):
    """Top: relative weight error per Linear, by decoder layer and Linear kind; bottom: input amax range."""
    by_kind: dict[str, list[tuple[int, float]]] = {}
    amax: dict[int, list[float]] = {}
    for name, stats in linears.items():
        match = LAYER_INDEX.search(name)
        if not match:
            continue
        layer = int(match.group(1))
        if stats.weight_error is not None:
            by_kind.setdefault(name.rpartition(".")[2], []).append((layer, 100 * stats.weight_error))
        if stats.input_amax is not None:
            amax.setdefault(layer, []).append(stats.input_amax)
    fig = Figure(figsize=(9, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for kind, points in sorted(by_kind.items()):
        layers, errors = zip(*sorted(points))
        top.plot(layers, errors, marker="o", markersize=3, linewidth=0.8, label=kind)
    top.set_ylabel("weight error (%)")
    top.set_title("Relative weight error per quantized Linear (decoded from the written tensors)")
    top.legend(ncols=4, fontsize="small", frameon=False)
    top.grid(alpha=0.3)
    if amax:
        indices = sorted(amax)
        low, high = [min(amax[i]) for i in indices], [max(amax[i]) for i in indices]
        bottom.vlines(indices, low, high, color="#1f77b4", linewidth=3)
        bottom.scatter(indices, high, s=8, color="#d62728", label="max")
        bottom.scatter(indices, low, s=8, color="#2ca02c", label="min")
        bottom.set_yscale("log")
        bottom.legend(fontsize="small", frameon=False)
    bottom.set_ylabel("input amax (log)")
    bottom.set_xlabel("decoder layer")
    bottom.set_title("Calibrated input amax of each layer's Linears (range)")
    bottom.grid(alpha=0.3)
    return fig
