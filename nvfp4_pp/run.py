"""Entry point: `torchrun ... -m nvfp4_pp.run CONFIG.yaml [--set key=value ...] [--overwrite] [--fresh] [--plan]`.

Phases: check -> budgets -> plan -> load stage -> calibrate (pipeline) -> export -> assemble (rank 0)
-> report. Calibration and export results are recorded in the output's work directory; running the
same command again continues from the last phase every rank completed.
"""

from __future__ import annotations

import argparse
from collections import Counter
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from . import __version__, budget, dist
from .arch import UnsupportedArchitecture, architecture_of
from .card import CALIBRATION_MANIFEST, peaks_text, write_card, write_manifest, write_record
from .calib import CalibrationDataError, MicroBatch, load_samples, micro_batches
from .config import ConfigError, RunConfig, config_to_dict, load_config
from .export import export_stage
from .formats import get_format
from .gather import GatherError, gather
from .log import logger, setup
from .memory import ModelSizes, Workload
from .merge import PRODUCER, AssembleError, assemble
from .pipeline import run_pipeline
from .plan import PlanError, StagePlan, check_split, describe, owner_of, plan_stages
from .quantize import ValidTokens, calibrate, calibration_health, modelopt_config, register_kv_attention
from .resume import StaleWorkState, WorkState
from .source import SourceCheckpoint, SourceError
from .stage import build_stage
from .verify import verify
from .writer import ExportWriteError, ShardWriter

class VerificationError(RuntimeError):
    """The assembled checkpoint breaks vLLM's loader contract; the output was not written."""


USER_ERRORS = (ConfigError, SourceError, PlanError, UnsupportedArchitecture, CalibrationDataError,
               AssembleError, ExportWriteError, StaleWorkState, dist.DeviceError, GatherError,
               VerificationError)
PHASES = ("calibrate", "export")


class RunError(RuntimeError):
    """A problem every rank agreed on; rank 0 reports it, the others exit quietly."""


class Stopped(RuntimeError):
    """SIGTERM/SIGINT: torchrun stops the remaining ranks when one of them fails."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.run", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.samples=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--fresh", action="store_true", help="discard saved progress in the work directory")
    p.add_argument("--stop-after", choices=PHASES, help="stop once this phase is recorded (resume later)")
    p.add_argument("--plan", action="store_true",
                   help="measure every rank's memory, print the stage plan and exit without loading weights")
    return p.parse_args(argv)


def everywhere(info: dist.RankInfo, fn):
    """Run `fn` on every rank; if any rank fails with a user error, every rank raises it."""
    error = None
    try:
        result = fn()
    except USER_ERRORS as e:
        result, error = None, str(e)
    errors = dist.all_gather_objects(error, info.world_size)
    failed = {e: r for r, e in reversed(list(enumerate(errors))) if e is not None}
    if failed:
        raise RunError("\n".join(e if len(failed) == 1 and error else f"rank {r}: {e}" for e, r in failed.items()))
    return result


def agreed(info: dist.RankInfo, fn):
    """Run `fn` on rank 0 only and hand its result (or its error) to every rank."""
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


def work_dir_of(cfg: RunConfig) -> Path:
    """This host's scratch directory for exported shards (gather.work_dir, else next to the output)."""
    if cfg.gather.work_dir:
        return Path(cfg.gather.work_dir)
    output = Path(cfg.output)
    return output.parent / f"{output.name}.nvfp4_pp-work"


def measured_peak(kind: str) -> dict[str, int]:
    """This rank's measured peak bytes per pool, to set beside the plan's prediction."""
    host = budget.peak_rss()
    if kind == "cpu":
        return {"host": host}
    device = torch.cuda.max_memory_allocated()
    return {"host": host + device} if kind == "unified" else {"device": device, "host": host}


def plan_run(cfg: RunConfig, info: dist.RankInfo, source: SourceCheckpoint, arch) -> list[StagePlan]:
    """Every rank measures its budget, all share them, and each computes the same plan.

    The plan is a pure function of the shared facts, so a bad plan fails on every rank alike.
    """
    facts = dist.all_gather_objects(budget.measure(info.rank, info.host, info.device), info.world_size)
    workload = Workload(cfg.calibration.batch_size, cfg.calibration.max_length)
    wire_on_host = info.wire_device.type == "cpu"

    def plan() -> list[StagePlan]:
        budgets = budget.budgets(facts, cfg.pipeline.memory_limit_gb, cfg.pipeline.reserve_gb)
        return plan_stages(ModelSizes.from_source(source, arch), budgets, cfg.pipeline.layers, workload,
                           wire_on_host)

    return everywhere(info, plan)


def excluded_modules(owned: list[str], source: SourceCheckpoint, quantized: list[str], lm_head: str,
                     is_last: bool) -> list[str]:
    """Modules this rank writes in BF16 that a loader could take for quantized Linears: every 2-D
    weight it owns and did not quantize (embeddings; an image-text model's vision tower and
    projector), and lm_head (tied or not) on the last rank."""
    out = {n.removesuffix(".weight") for n in owned if n.endswith(".weight") and len(source.shape(n)) == 2}
    return sorted((out - set(quantized)) | ({lm_head} if is_last else set()))


def check_output(cfg: RunConfig, overwrite: bool) -> None:
    output = Path(cfg.output)
    if output.exists() and not overwrite:
        raise ConfigError(f"output {output} already exists; pass --overwrite to replace it or choose another 'output'")


def fingerprint(cfg: RunConfig, source: SourceCheckpoint, info: dist.RankInfo, layers: tuple[int, int],
                samples_sha256: str) -> dict:
    """Everything that shapes this rank's result; saved progress is reused only when all of it matches."""
    import modelopt
    import transformers

    return {
        "versions": {"nvfp4_pp": __version__, "modelopt": modelopt.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": str(source.path.resolve()),
        "model_config": hashlib.sha256((source.path / "config.json").read_bytes()).hexdigest(),
        "model_files": {f: (source.path / f).stat().st_size for f in sorted(set(source.weight_map.values()))},
        "format": cfg.format,
        "recipe": {"recipe": cfg.recipe, "recipe_overrides": cfg.recipe_overrides, "ignore": cfg.ignore,
                   "kv_cache": cfg.kv_cache},
        "calibration": config_to_dict(cfg)["calibration"],
        "samples_sha256": samples_sha256,
        "world_size": info.world_size,
        "layers": list(layers),
        "device_type": info.device.type,
    }


def run(cfg: RunConfig, info: dist.RankInfo, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str):
        dist.set_phase(name)
        t0 = time.perf_counter()
        yield
        phases[name] = time.perf_counter() - t0
        logger.info("%s done in %.1f s", name, phases[name])

    def prepare() -> tuple:
        source = SourceCheckpoint(cfg.model)
        arch = architecture_of(source.config, source.weight_map)
        if "num_hidden_layers" not in source.text_config:
            raise SourceError(f"{source.path / 'config.json'} has no num_hidden_layers; is it a decoder LLM?")
        check_split(source.text_config["num_hidden_layers"], info.world_size, cfg.pipeline.layers)
        source.require_tokenizer()  # checked now: verification would refuse the output at the very end
        return get_format(cfg.format), source, arch

    dist.set_phase("startup checks")
    fmt, source, arch = everywhere(info, prepare)
    if not args.plan:
        agreed(info, lambda: check_output(cfg, args.overwrite))

    batches: list[MicroBatch] | None = None

    def prepare_samples() -> tuple[list[tuple[int, ...]], dict]:
        nonlocal batches  # token ids exist on the first rank only; the others get hidden states
        calibration_set = load_samples(cfg.calibration, cfg.model)
        manifest = calibration_set.manifest()
        limit = source.text_config.get("max_position_embeddings")
        if limit and manifest["max_length"] > limit:
            raise CalibrationDataError(
                f"a calibration sample has {manifest['max_length']} tokens but the model's max_position_embeddings "
                f"is {limit}; set calibration.max_length <= {limit}")
        batches = micro_batches(calibration_set.samples, cfg.calibration.batch_size, calibration_set.pad_id)
        return [b.lengths for b in batches], manifest

    lengths, samples_manifest = agreed(info, prepare_samples)  # every rank: real lengths per micro-batch
    num_batches = len(lengths)
    samples_sha = samples_manifest["token_ids_sha256"]
    logger.info("calibration: %d samples, %d tokens (lengths %d/%s/%d min/median/max), %d micro-batches, "
                "token ids sha256 %s", samples_manifest["samples"], samples_manifest["tokens"],
                samples_manifest["min_length"], samples_manifest["median_length"], samples_manifest["max_length"],
                num_batches, samples_sha[:16])

    dist.set_phase("planning")
    plans = plan_run(cfg, info, source, arch)  # after the samples: their memory is part of the baseline
    for line in describe(plans):
        logger.info("%s", line)
    if args.plan:
        return
    ranges = [(p.start, p.stop) for p in plans]
    start, stop = ranges[info.rank]

    output = Path(cfg.output)
    work_dir = work_dir_of(cfg)
    rank_dir = work_dir / f"rank{info.rank}"
    state = everywhere(info, lambda: WorkState(
        rank_dir, fingerprint(cfg, source, info, (start, stop), samples_sha), fresh=args.fresh))
    if info.is_first:
        write_manifest(rank_dir / CALIBRATION_MANIFEST, samples_manifest)

    with phase("load"):
        stage = build_stage(source, arch, start, stop, info.device)

    traffic: dict[str, int] = {}
    if all(dist.all_gather_objects(state.done("calibrate"), info.world_size)):
        with phase("calibrate"):
            if cfg.kv_cache:
                register_kv_attention(stage)  # restoring re-creates the KV quantizers of those classes
            state.restore_quantizers(stage)
            logger.info("calibration: reusing the state every rank saved in %s", work_dir)
    else:
        with phase("calibrate"):
            state.forget("calibrate", "export")
            quant_cfg = modelopt_config(cfg.recipe, cfg.recipe_overrides, cfg.ignore, cfg.kv_cache)
            valid = ValidTokens()
            phases["calibration loop"] = calibrate(
                stage, lambda model: traffic.update(run_pipeline(model, info, batches, lengths, valid)), quant_cfg, valid)
            state.save_quantizers(stage)
            state.record("calibrate", {"traffic": traffic})
    health = calibration_health(stage)
    logger.info("calibration health: %d good, %d zero, %d NaN amax", health["good"], health["zero"], health["nan"])
    if health["zero"] or health["nan"]:
        logger.warning("calibration health: %d zero and %d NaN amax, e.g. %s", health["zero"], health["nan"],
                       ", ".join(health["bad"][:5]))
    if args.stop_after == "calibrate":
        return stopped_after("calibrate", info)

    if state.done("export") and state.shards_intact(rank_dir):
        with phase("export"):
            logger.info("export: reusing the shards this rank wrote before")
    else:
        with phase("export"):
            owned = [n for n in source.weight_map if owner_of(n, arch, ranges) == info.rank]
            writer = ShardWriter(rank_dir, prefix=f"rank{info.rank:03d}")
            result = export_stage(stage, owned, source, fmt, writer)
            shards = writer.shards
            state.record("export", {"shards": shards, "schemes": result["quantized"], "kv_cache": result["kv_cache"],
                                    "excluded": excluded_modules(owned, source, result["quantized"], arch.lm_head,
                                                                 info.is_last)})
    del stage
    if args.stop_after == "export":
        return stopped_after("export", info)

    exported = state.phases["export"]
    manifest = {
        "rank": info.rank, "host": info.host, "device": str(info.device), "layers": [start, stop],
        "shards": exported["shards"], "excluded": exported["excluded"], "schemes": exported["schemes"],
        "kv_cache": exported["kv_cache"],
        "phases": phases, "health": health, "traffic": state.phases["calibrate"].get("traffic", {}),
        "kind": plans[info.rank].budget.kind,
        "predicted": {"host": plans[info.rank].need.host, "device": plans[info.rank].need.device},
        "measured": measured_peak(plans[info.rank].budget.kind),
    }
    dist.set_phase("assembly")
    manifests = dist.gather_to_first(manifest, info)
    gathered = gather(cfg.gather, info, rank_dir, exported["shards"])

    calibration = {**config_to_dict(cfg)["calibration"], "samples": samples_manifest["samples"],
                   "tokens": samples_manifest["tokens"], "micro_batches": num_batches, "samples_sha256": samples_sha,
                   "manifest": samples_manifest}

    def finish() -> None:
        t0 = time.perf_counter()

        def seal(tmp: Path) -> None:
            problems = verify(tmp, source.path)
            record = run_record(cfg, source, manifests, calibration, time.perf_counter() - started,
                                time.perf_counter() - t0, problems, wire_name(info))
            write_record(tmp, record)
            write_card(tmp, record, output.name)
            if problems:
                shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
                raise VerificationError(f"the assembled checkpoint fails verification ({len(problems)} problems); "
                                        f"{output} was not written:\n  {shown}")

        assemble(output, gathered.dirs, manifests, source, fmt, args.overwrite, finalize=seal)
        logger.info("assembled and verified %s in %.1f s", output, time.perf_counter() - t0)
        report(manifests)

    agreed(info, finish)  # every rank waits for the outcome, and fails with it
    remove_work_dir(work_dir, info)


def remove_work_dir(work_dir: Path, info: dist.RankInfo) -> None:
    """Each rank removes its own exports (rank 0 also the copies it received), then the dir if empty."""
    for r in range(info.world_size) if info.is_first else [info.rank]:
        shutil.rmtree(work_dir / f"rank{r}", ignore_errors=True)
    with contextlib.suppress(OSError):
        work_dir.rmdir()


def run_record(cfg: RunConfig, source: SourceCheckpoint, manifests: list[dict], calibration: dict,
               wall_s: float, assemble_s: float, problems: list[str], wire: str) -> dict:
    """What the output's nvfp4_pp.json and model card say about this run."""
    from modelopt import __version__ as modelopt_version

    return {
        "producer": PRODUCER, "modelopt_version": modelopt_version, "config": config_to_dict(cfg),
        "base_model": source.config.get("_name_or_path") or source.path.name,
        "backend": wire,
        "calibration": calibration,
        "ranks": [{k: v for k, v in m.items() if k not in ("shards", "schemes")} for m in manifests],
        "schemes": dict(sorted(Counter(s for m in manifests for s in m["schemes"].values()).items())),
        "kept_bf16": sorted({n for m in manifests for n in m["excluded"]}),
        "wall_s": wall_s, "assemble_s": assemble_s,
        "verification": f"{len(problems)} problem(s)" if problems else "passed",
    }


def wire_name(info: dist.RankInfo) -> str:
    """What carried the hidden states between stages."""
    if info.world_size == 1:
        return "single process"
    return "nccl" if info.wire_group is not None else "gloo"


def stopped_after(phase_name: str, info: dist.RankInfo) -> None:
    dist.barrier()
    logger.info("stopped after %s as asked; run the same command without --stop-after to continue", phase_name)


def report(manifests: list[dict]) -> None:
    """Per-rank phase times, calibration health, and measured peak memory beside the prediction."""
    logger.info("%-5s %-12s %-8s %-9s %8s %10s %8s  %-26s %s", "rank", "host", "device", "layers", "load s",
                "calib s", "export s", "peak GB measured/predicted", "quantizers good/zero/nan")
    for m in manifests:
        p, h = m["phases"], m["health"]
        logger.info("%-5d %-12s %-8s %-9s %8.1f %10.1f %8.1f  %-26s %d/%d/%d", m["rank"], m["host"][:12],
                    m["device"], f"{m['layers'][0]}-{m['layers'][1] - 1}", p["load"], p["calibrate"],
                    p.get("export", 0.0), peaks_text(m), h["good"], h["zero"], h["nan"])


def _raise_stopped(signum, frame) -> None:
    raise Stopped(f"stopped by signal {signal.Signals(signum).name} during {dist.current_phase()} "
                  "(torchrun stops the other ranks when one fails: see the first error above)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if rank == 0:  # every rank reads the same file: say it once
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 2
    previous_handler = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        info = dist.init(cfg.pipeline.backend, cfg.pipeline.device, cfg.pipeline.timeout_s)
        setup(info.rank)
        run(cfg, info, args)
        return 0
    except RunError as e:
        if rank == 0:
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 1
    except (dist.PeerLost, Stopped, *USER_ERRORS) as e:
        print(f"nvfp4_pp: error (rank {rank}): {e}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
