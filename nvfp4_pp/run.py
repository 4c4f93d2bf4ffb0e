"""Entry point: `torchrun ... -m nvfp4_pp.run CONFIG.yaml [--set key=value ...] [--overwrite] [--plan]`.

Phases: budgets -> plan -> load stage -> calibrate (pipeline) -> export -> assemble (rank 0) -> report.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import budget, dist
from .arch import UnsupportedArchitecture, architecture_of
from .calib import CalibrationDataError, load_samples, micro_batches
from .config import ConfigError, RunConfig, load_config
from .export import export_stage
from .formats import get_format
from .log import logger, setup
from .memory import ModelSizes, Workload
from .merge import AssembleError, assemble
from .pipeline import run_pipeline
from .plan import PlanError, StagePlan, describe, owner_of, plan_stages
from .quantize import calibrate, calibration_health
from .source import SourceCheckpoint, SourceError
from .stage import build_stage
from .writer import ExportWriteError, ShardWriter

USER_ERRORS = (ConfigError, SourceError, PlanError, UnsupportedArchitecture, CalibrationDataError,
               AssembleError, ExportWriteError, dist.DeviceError)


class RunError(RuntimeError):
    """A problem every rank agreed on (raised identically everywhere, so no rank waits forever)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.run", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.samples=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--plan", action="store_true",
                   help="measure every rank's memory, print the stage plan and exit without loading weights")
    return p.parse_args(argv)


def agreed(info: dist.RankInfo, fn):
    """Run `fn` on rank 0 only and hand its result (or its error message) to every rank."""
    result, error = None, None
    if info.is_first:
        try:
            result = fn()
        except USER_ERRORS as e:
            error = str(e)
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise RunError(error)
    return result


def work_dir_of(output: Path) -> Path:
    return output.parent / f"{output.name}.nvfp4_pp-work"


def measured_peak(kind: str) -> dict[str, int]:
    """This rank's measured peak bytes per pool, to set beside the plan's prediction."""
    host = budget.peak_rss()
    if kind == "cpu":
        return {"host": host}
    device = torch.cuda.max_memory_allocated()
    return {"host": host + device} if kind == "unified" else {"device": device, "host": host}


def plan_run(cfg: RunConfig, info: dist.RankInfo, source: SourceCheckpoint, arch) -> list[StagePlan]:
    """Every rank measures its budget, all share them, and each computes the same plan."""
    facts = budget.measure(info.rank, info.host, info.device)
    budgets = budget.budgets(dist.all_gather_objects(facts, info.world_size),
                             cfg.pipeline.memory_limit_gb, cfg.pipeline.reserve_gb)
    workload = Workload(cfg.calibration.batch_size, cfg.calibration.max_length)
    wire_on_host = info.wire_device.type == "cpu"
    return plan_stages(ModelSizes.from_source(source, arch), budgets, cfg.pipeline.layers, workload, wire_on_host)


def excluded_modules(stage: nn.Module, quantized: list[str], lm_head: str, is_last: bool) -> list[str]:
    """Linears and embeddings of this stage left in BF16 (lm_head always, on the last rank)."""
    keep = {n for n, m in stage.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    out = sorted(keep - set(quantized))
    return out + [lm_head] if is_last else out


def check_output(cfg: RunConfig, overwrite: bool) -> None:
    output = Path(cfg.output)
    if output.exists() and not overwrite:
        raise ConfigError(f"output {output} already exists; pass --overwrite to replace it or choose another 'output'")


def run(cfg: RunConfig, info: dist.RankInfo, overwrite: bool, plan_only: bool = False) -> None:
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str):
        t0 = time.perf_counter()
        yield
        phases[name] = time.perf_counter() - t0
        logger.info("%s done in %.1f s", name, phases[name])

    fmt = get_format(cfg.format)
    source = SourceCheckpoint(cfg.model)
    arch = architecture_of(source.config)
    if "num_hidden_layers" not in source.config:
        raise SourceError(f"{source.path / 'config.json'} has no num_hidden_layers; is it a decoder LLM?")
    if not plan_only:
        agreed(info, lambda: check_output(cfg, overwrite))
    batches: list[torch.Tensor] | None = None

    def prepare_samples() -> tuple[int, int, int]:
        nonlocal batches  # token ids exist on the first rank only; the others get hidden states
        samples = load_samples(cfg.calibration, cfg.model)
        batches = micro_batches(samples, cfg.calibration.batch_size)
        return len(samples), sum(map(len, samples)), len(batches)

    num_samples, num_tokens, num_batches = agreed(info, prepare_samples)
    logger.info("calibration: %d samples, %d tokens, %d micro-batches", num_samples, num_tokens, num_batches)

    plans = plan_run(cfg, info, source, arch)  # after the samples: their memory is part of the baseline
    for line in describe(plans):
        logger.info("%s", line)
    if plan_only:
        return
    ranges = [(p.start, p.stop) for p in plans]
    start, stop = ranges[info.rank]

    with phase("load"):
        stage = build_stage(source, arch, start, stop, info.device)
    traffic: dict[str, int] = {}
    with phase("calibrate"):
        calibrate(stage, lambda model: traffic.update(run_pipeline(model, info, batches, num_batches)))
    health = calibration_health(stage)
    if health["zero"] or health["nan"]:
        logger.warning("calibration health: %s (quantizers without a usable amax)", health)

    output = Path(cfg.output)
    work_dir = work_dir_of(output)
    owned = [n for n in source.weight_map if owner_of(n, arch, ranges) == info.rank]
    writer = ShardWriter(work_dir / f"rank{info.rank}", prefix=f"rank{info.rank:03d}")
    with phase("export"):
        result = export_stage(stage, owned, source, fmt, writer)
    manifest = {
        "rank": info.rank, "host": info.host, "device": str(info.device), "layers": [start, stop],
        "shards": writer.shards, "excluded": excluded_modules(stage, result["quantized"], arch.lm_head, info.is_last),
        "phases": phases, "health": health, "traffic": traffic, "kind": plans[info.rank].budget.kind,
        "predicted": {"host": plans[info.rank].need.host, "device": plans[info.rank].need.device},
        "measured": measured_peak(plans[info.rank].budget.kind),
    }
    del stage
    manifests = dist.all_gather_objects(manifest, info.world_size)
    if info.is_first:
        t0 = time.perf_counter()
        assemble(output, work_dir, manifests, source, fmt, overwrite)
        shutil.rmtree(work_dir, ignore_errors=True)
        logger.info("assembled %s in %.1f s", output, time.perf_counter() - t0)
        report(manifests)
    dist.barrier()


def report(manifests: list[dict]) -> None:
    """Per-rank phase times, calibration health, and measured peak memory beside the prediction."""
    logger.info("%-5s %-12s %-8s %-9s %8s %10s %8s  %-26s %s", "rank", "host", "device", "layers", "load s",
                "calib s", "export s", "peak GB measured/predicted", "quantizers good/zero/nan")
    for m in manifests:
        p, h = m["phases"], m["health"]
        peaks = " ".join(f"{pool} {m['measured'][pool] / budget.GB:.2f}/{m['predicted'][pool] / budget.GB:.2f}"
                         for pool in sorted(m["measured"]))
        logger.info("%-5d %-12s %-8s %-9s %8.1f %10.1f %8.1f  %-26s %d/%d/%d", m["rank"], m["host"][:12],
                    m["device"], f"{m['layers'][0]}-{m['layers'][1] - 1}", p["load"], p["calibrate"],
                    p["export"], peaks, h["good"], h["zero"], h["nan"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 2
    info = None
    try:
        info = dist.init(cfg.pipeline.backend, cfg.pipeline.device, cfg.pipeline.timeout_s)
        setup(info.rank)
        run(cfg, info, args.overwrite, plan_only=args.plan)
        return 0
    except (RunError, *USER_ERRORS) as e:
        if info is None or info.is_first or not isinstance(e, RunError):
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
