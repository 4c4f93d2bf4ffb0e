"""Entry point: `torchrun ... -m nvfp4_pp.run CONFIG.yaml [--set key=value ...] [--overwrite]`.

Phases: plan -> load stage -> calibrate (pipeline) -> export -> assemble (rank 0) -> report.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import dist
from .arch import UnsupportedArchitecture, architecture_of
from .card import write_card, write_record
from .calib import CalibrationDataError, load_samples, micro_batches
from .config import ConfigError, RunConfig, config_to_dict, load_config
from .export import export_stage
from .formats import get_format
from .log import logger, setup
from .merge import PRODUCER, AssembleError, assemble
from .pipeline import run_pipeline
from .plan import PlanError, owner_of, split_layers
from .quantize import calibrate, calibration_health
from .source import SourceCheckpoint, SourceError
from .stage import build_stage
from .verify import verify
from .writer import ExportWriteError, ShardWriter


class VerificationError(RuntimeError):
    """The assembled checkpoint breaks vLLM's loader contract; the output was not written."""


USER_ERRORS = (ConfigError, SourceError, PlanError, UnsupportedArchitecture, CalibrationDataError,
               AssembleError, ExportWriteError, VerificationError)


class RunError(RuntimeError):
    """A problem every rank agreed on (raised identically everywhere, so no rank waits forever)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.run", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.samples=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
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


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def excluded_modules(stage: nn.Module, quantized: list[str], lm_head: str, is_last: bool) -> list[str]:
    """Linears and embeddings of this stage left in BF16 (lm_head always, on the last rank)."""
    keep = {n for n, m in stage.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    out = sorted(keep - set(quantized))
    return out + [lm_head] if is_last else out


def check_output(cfg: RunConfig, overwrite: bool) -> None:
    output = Path(cfg.output)
    if output.exists() and not overwrite:
        raise ConfigError(f"output {output} already exists; pass --overwrite to replace it or choose another 'output'")


def run(cfg: RunConfig, info: dist.RankInfo, overwrite: bool) -> None:
    started = time.perf_counter()
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
    ranges = split_layers(source.config["num_hidden_layers"], info.world_size, cfg.pipeline.layers)
    start, stop = ranges[info.rank]
    logger.info("plan: %s", ", ".join(f"rank {r}: layers {a}-{b - 1}" for r, (a, b) in enumerate(ranges)))

    agreed(info, lambda: check_output(cfg, overwrite))
    batches: list[torch.Tensor] | None = None

    def prepare_samples() -> tuple[int, int, int]:
        nonlocal batches  # token ids exist on the first rank only; the others get hidden states
        samples = load_samples(cfg.calibration, cfg.model)
        batches = micro_batches(samples, cfg.calibration.batch_size)
        return len(samples), sum(map(len, samples)), len(batches)

    num_samples, num_tokens, num_batches = agreed(info, prepare_samples)
    logger.info("calibration: %d samples, %d tokens, %d micro-batches", num_samples, num_tokens, num_batches)

    with phase("load"):
        stage = build_stage(source, arch, start, stop, info.device)
    traffic: dict[str, int] = {}
    with phase("calibrate"):
        calibrate(stage, lambda model: traffic.update(run_pipeline(model, info, batches, num_batches)))
    health = calibration_health(stage)
    logger.info("calibration health: %d good, %d zero, %d NaN amax", health["good"], health["zero"], health["nan"])
    if health["zero"] or health["nan"]:
        logger.warning("calibration health: %d zero and %d NaN amax, e.g. %s", health["zero"], health["nan"],
                       ", ".join(health["bad"][:5]))

    output = Path(cfg.output)
    work_dir = work_dir_of(output)
    owned = [n for n in source.weight_map if owner_of(n, arch, ranges) == info.rank]
    writer = ShardWriter(work_dir / f"rank{info.rank}", prefix=f"rank{info.rank:03d}")
    with phase("export"):
        result = export_stage(stage, owned, source, fmt, writer)
    manifest = {
        "rank": info.rank, "host": info.host, "device": str(info.device), "layers": [start, stop],
        "shards": writer.shards, "excluded": excluded_modules(stage, result["quantized"], arch.lm_head, info.is_last),
        "phases": phases, "peak_gb": peak_memory_gb(info.device), "health": health, "traffic": traffic,
    }
    del stage
    manifests = dist.all_gather_objects(manifest, info.world_size)
    calibration = {**config_to_dict(cfg)["calibration"], "samples": num_samples, "tokens": num_tokens}

    def finish() -> None:
        t0 = time.perf_counter()

        def seal(tmp: Path) -> None:
            problems = verify(tmp, source.path)
            record = run_record(cfg, source, manifests, calibration, time.perf_counter() - started,
                                time.perf_counter() - t0, problems)
            write_record(tmp, record)
            write_card(tmp, record, output.name)
            if problems:
                shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
                raise VerificationError(f"the assembled checkpoint fails verification ({len(problems)} problems); "
                                        f"{output} was not written, the rejected files are in {tmp}:\n  {shown}")

        assemble(output, work_dir, manifests, source, fmt, overwrite, finalize=seal)
        shutil.rmtree(work_dir, ignore_errors=True)
        logger.info("assembled and verified %s in %.1f s", output, time.perf_counter() - t0)
        report(manifests)

    agreed(info, finish)


def run_record(cfg: RunConfig, source: SourceCheckpoint, manifests: list[dict], calibration: dict,
               wall_s: float, assemble_s: float, problems: list[str]) -> dict:
    """What the output's nvfp4_pp.json and model card say about this run."""
    import torch.distributed as torch_dist
    from modelopt import __version__ as modelopt_version

    return {
        "producer": PRODUCER, "modelopt_version": modelopt_version, "config": config_to_dict(cfg),
        "base_model": source.config.get("_name_or_path") or source.path.name,
        "backend": torch_dist.get_backend() if torch_dist.is_initialized() else "single process",
        "calibration": calibration, "ranks": [{k: v for k, v in m.items() if k != "shards"} for m in manifests],
        "kept_bf16": sorted({n for m in manifests for n in m["excluded"]}),
        "wall_s": wall_s, "assemble_s": assemble_s,
        "verification": f"{len(problems)} problem(s)" if problems else "passed",
    }


def report(manifests: list[dict]) -> None:
    logger.info("%-5s %-12s %-8s %-9s %8s %10s %8s %9s  %s", "rank", "host", "device", "layers",
                "load s", "calib s", "export s", "peak GB", "quantizers good/zero/nan")
    for m in manifests:
        p, h = m["phases"], m["health"]
        logger.info("%-5d %-12s %-8s %-9s %8.1f %10.1f %8.1f %9.2f  %d/%d/%d", m["rank"], m["host"][:12],
                    m["device"], f"{m['layers'][0]}-{m['layers'][1] - 1}", p["load"], p["calibrate"],
                    p["export"], m["peak_gb"], h["good"], h["zero"], h["nan"])


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
        run(cfg, info, args.overwrite)
        return 0
    except (RunError, *USER_ERRORS) as e:
        if info is None or info.is_first or not isinstance(e, RunError):
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
