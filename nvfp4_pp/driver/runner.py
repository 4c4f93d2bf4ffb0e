"""One quantization run on this rank: one short method per phase, the phase state on the object.

start-up checks -> calibration samples -> plan -> work state -> load -> calibrate -> export ->
gather -> assemble and verify (rank 0) -> report. Each phase reads what earlier phases left on the
object (typed records, see records.py) and leaves its own. Calibration and export are recorded
in the work directory (`WorkState.once`), so running the same command again continues from the
last phase every rank completed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Generic, Literal, TypeVar, cast, overload

import torch

from nvfp4_pp.runtime import dist
from nvfp4_pp.algorithms.table import memory_terms
from nvfp4_pp.model.arch import Architecture, architecture_of
from nvfp4_pp.checkpoint.assemble import assemble
from nvfp4_pp.calibration.calibrate import (
    ValidTokens,
    algorithm_options,
    calibrate,
    calibration_health,
    check_algorithm_device,
    load_cuda_extensions,
    modelopt_config,
)
from nvfp4_pp.publish.card import CALIBRATION_MANIFEST, final_line, run_record, write_record_and_card
from nvfp4_pp.config import RunConfig
from nvfp4_pp.data.samples import CalibrationDataError, MicroBatch, Tokenizer, load_samples, micro_batches
from nvfp4_pp.data.vocabulary import check_vocabulary
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.checkpoint.export import StageExporter, export_stage
from nvfp4_pp.files import nearest_existing, require_free, write_json
from nvfp4_pp.checkpoint.formats import CheckpointFormat, get_format
from nvfp4_pp.checkpoint.gather import gather
from nvfp4_pp.algorithms.gptq import SolveTimes
from nvfp4_pp.calibration.layer_by_layer import LayerByLayer, LayerByLayerJob, restore_calibration
from nvfp4_pp.runtime.lock import WORK_DIR_LOCK, FileLock, Holder, output_lock_path
from nvfp4_pp.log import RELAY, attach_file, end_of_run, logger
from nvfp4_pp.checkpoint.output_guard import check_output, check_paths
from nvfp4_pp.phases import RECORDED, Phase
from nvfp4_pp.calibration.pipeline import run_pipeline
from nvfp4_pp.planning import budget
from nvfp4_pp.planning.memory import ModelSizes, Workload, written_bytes
from nvfp4_pp.planning.plan import StagePlan, check_split, describe, owner_of, plan_stages
from nvfp4_pp.model.recipe_shapes import check_recipe_shapes
from nvfp4_pp.records import CalibrationManifest, ExportResult, Health, Memory, PhaseSpan, RankReport, Traffic
from nvfp4_pp.publish.run_record import RunRecord
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import Stage, build_stage
from nvfp4_pp.calibration.streaming import LayerStream
from nvfp4_pp.checkpoint.verify import summarize, verify
from nvfp4_pp.checkpoint.work_state import StaleWorkState, WorkState, fingerprint, work_dir_of
from nvfp4_pp.checkpoint.writer import ShardWriter


T = TypeVar("T")


class VerificationError(NvFp4PpError):
    """The assembled checkpoint breaks vLLM's loader contract; the output was not written."""


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """The command line's switches beside the config."""

    overwrite: bool = False
    fresh: bool = False
    stop_after: Phase | None = None
    """One of phases.RECORDED."""
    plan_only: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Samples:
    """The calibration set as every rank knows it: real lengths per micro-batch and the manifest;
    the token ids themselves exist on the first rank only (the others receive hidden states)."""

    manifest: CalibrationManifest
    lengths: list[tuple[int, ...]]
    batches: list[MicroBatch] | None


class Later(Generic[T]):
    """A `Run` attribute that one phase sets and later phases read, typed as what it holds: read before
    its phase ran (or after it was released), it raises an error naming it, never an AttributeError or
    a None far away."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, run: None, owner: type) -> Later[T]: ...
    @overload
    def __get__(self, run: object, owner: type) -> T: ...

    def __get__(self, run: object | None, owner: type) -> Later[T] | T:
        if run is None:
            return self
        try:
            return run.__dict__[self.name]
        except KeyError:
            raise RuntimeError(f"Run.{self.name} read before the phase that sets it ran") from None

    def __set__(self, run: object, value: T) -> None:
        run.__dict__[self.name] = value

    def __delete__(self, run: object) -> None:
        run.__dict__.pop(self.name, None)

    def ready(self, run: object) -> bool:
        """Whether its phase has set it on `run`."""
        return self.name in run.__dict__


class Run:
    """This rank's part of one run; `execute()` runs the phases in order."""

    # Each phase's result (`Later`): start-up, samples, plan, work state, load, calibrate, export, assemble.
    fmt: Later[CheckpointFormat] = Later()
    source: Later[SourceCheckpoint] = Later()
    arch: Later[Architecture] = Later()
    samples: Later[Samples] = Later()
    sizes: Later[ModelSizes] = Later()
    plans: Later[list[StagePlan]] = Later()
    state: Later[WorkState] = Later()
    stage: Later[Stage] = Later()
    """Released once exported (the weights are no longer needed)."""
    traffic: Later[Traffic] = Later()
    health: Later[Health] = Later()
    export_result: Later[ExportResult] = Later()
    record: Later[RunRecord] = Later()
    """The run record (rank 0, once the checkpoint is written): the final line reads it."""

    def __init__(self, cfg: RunConfig, info: dist.RankInfo, options: Options):
        self.cfg, self.info, self.options = cfg, info, options
        self.started, self.started_wall = time.perf_counter(), time.time()
        self.timings: dict[str, float] = {}
        self.solve_times = SolveTimes()
        """GPTQ's solve seconds per Linear (the run record keeps them per layer)."""
        self.spans: list[PhaseSpan] = [PhaseSpan(Phase.START_UP, self.started_wall, self.started_wall)]
        self.work_dir = work_dir_of(cfg)
        self.rank_dir = self.work_dir / f"rank{info.rank}"
        self.locks: list[FileLock] = []
        self.exporter: StageExporter | None = None
        """The exporter of a stage that exports its layers as solved (`exports_layers`), which writes each layer
        as soon as it is calibrated."""
        self.layer_stream: LayerStream | None = None
        """A streaming stage's reader of its layers, made once the stage is built."""
        # Every other attribute is a phase's result, declared on the class (`Later`).

    def execute(self) -> None:
        try:
            self.start_up()
            self.prepare_samples()
            self.plan()
            if self.options.plan_only:
                return
            self.open_work_state()
            self.check_disk_space()
            self.load()
            self.calibrate()
            if self.options.stop_after == Phase.CALIBRATE:
                return self.stopped_after(Phase.CALIBRATE)
            self.export()
            if self.options.stop_after == Phase.EXPORT:
                return self.stopped_after(Phase.EXPORT)
            self.assemble()
            self.clean_up()
        finally:
            self.release_locks()
        if self.info.is_first:
            end_of_run(final_line(self.record, time.perf_counter() - self.started))

    @contextlib.contextmanager
    def phase(self, name: Phase):
        """Name the phase for lost-peer messages and time it."""
        dist.set_phase(name)
        t0, wall = time.perf_counter(), time.time()
        if self.spans[-1].name == Phase.START_UP:  # start-up lasts until the first timed phase
            self.spans[-1] = PhaseSpan(Phase.START_UP, self.started_wall, wall)
        yield
        self.timings[name] = time.perf_counter() - t0
        self.spans.append(PhaseSpan(name, wall, time.time()))
        logger.info("%s done in %.1f s", name, self.timings[name], extra=RELAY)

    @property
    def layers(self) -> tuple[int, int]:
        plan = self.plans[self.info.rank]
        return plan.start, plan.stop

    # ---- before any weight is loaded ----------------------------------------------------------
    def start_up(self) -> None:
        """Every rank checks the source, the split and where it will write; rank 0 checks the output;
        then every host's work directory and the output are locked for this run."""
        dist.set_phase(Phase.START_UP)
        writes = not self.options.plan_only

        def check() -> tuple[CheckpointFormat, SourceCheckpoint, Architecture]:
            info = self.info
            for algorithm in self.cfg.algorithms:
                check_algorithm_device(algorithm, self.cfg.recipe, info.rank, info.host, info.device,
                                       auto=self.cfg.algorithm == "auto")
            source = SourceCheckpoint(self.cfg.model)
            arch = architecture_of(source.config, source.weight_map)
            source.require_sizes()  # after the architecture: an unsupported model is named as such first
            check_split(source.text_config["num_hidden_layers"], self.info.world_size, self.cfg.pipeline.layers)
            source.require_tokenizer()  # checked now: verification would refuse the output at the very end
            check_recipe_shapes(source, arch, self.cfg.recipe, self.cfg.recipe_overrides, self.cfg.ignore)
            if writes:
                check_paths(source.path, self.cfg.output, self.work_dir)
            return get_format(self.cfg.format), source, arch

        self.fmt, self.source, self.arch = dist.everywhere(self.info, check)
        if writes:
            dist.agreed(self.info, lambda: check_output(self.cfg.output, self.options.overwrite))
            self.take_locks()

    def take_locks(self) -> None:
        """Rank 0 locks the output (any holder is another run: one line, said once); then every rank
        tries its work directory's lock, and after all have tried, a rank that got none is fine only if
        a rank of this run holds it (ranks of one host share one work directory)."""
        info = self.info
        me = Holder(run=dist.broadcast_object(secrets.token_hex(8) if info.is_first else None), host=info.host,
                    pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"))

        def lock_output() -> None:
            output = FileLock(output_lock_path(Path(self.cfg.output)), f"output {self.cfg.output}")
            if not output.take(me):
                output.refuse_unless_ours(me)
            self.locks.append(output)

        dist.agreed(info, lock_output)
        work = FileLock(self.work_dir / WORK_DIR_LOCK, f"work directory {self.work_dir}")
        self.locks.append(work)
        taken = dist.everywhere(info, lambda: work.take(me))

        def check_work_lock() -> None:  # a rank that could not take it: fine when this run holds it
            if not taken:
                work.refuse_unless_ours(me)

        dist.everywhere(info, check_work_lock)

    def release_locks(self) -> None:
        """Unlock (removing the lock files) and remove the work directory if nothing is left in it."""
        if not self.locks:
            return
        for lock in self.locks:
            lock.release()
        self.locks = []
        with contextlib.suppress(OSError):
            self.work_dir.rmdir()

    def prepare_samples(self) -> None:
        """Rank 0 checks the vocabulary and builds the token ids; every rank learns the real lengths of
        each micro-batch."""
        batches: list[MicroBatch] | None = None

        def build() -> tuple[CalibrationManifest, list[tuple[int, ...]]]:
            nonlocal batches
            vocab_size = check_vocabulary(self.source, self.arch, Tokenizer(self.source.path))
            calibration_set = load_samples(self.cfg.calibration, self.source.path, vocab_size)
            manifest = calibration_set.manifest()
            limit = self.source.text_config.get("max_position_embeddings")
            if limit and manifest.max_length > limit:
                raise CalibrationDataError(
                    f"a calibration sample has {manifest.max_length} tokens but the model's max_position_embeddings "
                    f"is {limit}; set calibration.max_length <= {limit}")
            batches = micro_batches(calibration_set.samples, self.cfg.calibration.batch_size, calibration_set.pad_id)
            if self.cfg.algorithm == "auto" and len(batches) < 2:
                raise CalibrationDataError(
                    f"algorithm auto fits each candidate on some calibration micro-batches and judges it on others, "
                    f"but the set makes {len(batches)}; raise calibration.samples or lower calibration.batch_size")
            return manifest, [b.lengths for b in batches]

        manifest, lengths = dist.agreed(self.info, build)
        self.samples = Samples(manifest, lengths, batches)
        logger.info("calibration: %d samples, %d tokens (lengths %d/%s/%d min/median/max), %d micro-batches, "
                    "token ids sha256 %s", manifest.samples, manifest.tokens, manifest.min_length,
                    manifest.median_length, manifest.max_length, len(lengths), manifest.token_ids_sha256[:16])

    def plan(self) -> None:
        """Every rank measures its budget, all share them, and each computes the same plan.

        Measured after the samples are built: their memory is part of the baseline. The plan is a
        pure function of the shared facts, so a bad plan fails on every rank alike.
        """
        dist.set_phase(Phase.PLANNING)
        info, pipeline = self.info, self.cfg.pipeline
        t0 = time.perf_counter()
        mine = budget.measure(info.rank, info.host, info.device)
        # measured after modelopt's import (its memory is baseline): most of this phase's seconds
        logger.info("planning: libraries imported and memory measured in %.1f s", time.perf_counter() - t0)
        facts: list[budget.RankFacts] = dist.all_gather_objects(mine, info.world_size)
        terms = memory_terms({self.cfg.algorithm, *self.cfg.algorithms})
        workload = Workload(self.cfg.calibration.batch_size, self.cfg.calibration.max_length,
                            calibration_tokens=self.samples.manifest.tokens, hessians=terms.hessians,
                            layer_major=self.cfg.layerwise.enable, trials=terms.trials, smoothing=terms.smoothing,
                            guard=self.cfg.guarded is not None)

        sizes = self.sizes = ModelSizes.from_source(self.source, self.arch)

        def plan() -> list[StagePlan]:
            budgets = budget.budgets(facts, pipeline.memory_limit_gb, pipeline.reserve_gb)
            return plan_stages(sizes, budgets, pipeline.layers, workload, info.wire_device.type == "cpu",
                               pipeline.stream)

        self.plans = dist.everywhere(info, plan)
        gptq = None if not terms.hessians else self.boundary if self.cfg.layerwise.enable else "flat"
        for line in describe(self.plans, sizes, gptq):
            logger.info("%s", line)

    def open_work_state(self) -> None:
        """This rank's record of finished phases (a stale one of another run is refused)."""
        info = self.info
        self.state = dist.everywhere(info, lambda: WorkState(
            self.rank_dir, fingerprint(self.cfg, self.source, info.world_size, info.device.type, self.layers,
                                       self.streaming, self.samples.manifest.token_ids_sha256),
            fresh=self.options.fresh))
        logger.info("log: every line of this rank in %s", attach_file(self.rank_dir))
        if info.is_first:
            write_json(self.rank_dir / CALIBRATION_MANIFEST, self.samples.manifest.to_dict())

    def check_disk_space(self) -> None:
        """Free space for the shards this rank will write (rank 0: every rank's, gathered, and the output
        when it lies on another filesystem), checked before the weights load; skipped once exported."""
        if "export" in self.state.phases:
            return
        last = self.info.world_size - 1
        stages = [written_bytes(self.sizes, self.cfg.recipe, p.start, p.stop, i == 0, i == last)
                  for i, p in enumerate(self.plans)]

        def check() -> None:
            fix = "free space there, or set gather.work_dir on a larger disk"
            mine = sum(stages) if self.info.is_first else stages[self.info.rank]
            require_free(self.work_dir, mine, f"the work directory {self.work_dir} (this rank's shards"
                         f"{' and the copies it gathers' if self.info.is_first else ''})", fix)
            output = Path(self.cfg.output)
            elsewhere = nearest_existing(output).stat().st_dev != nearest_existing(self.work_dir).stat().st_dev
            if self.info.is_first and elsewhere:  # assembly copies the shards instead of linking them
                require_free(output.parent, sum(stages), f"output {output}", "free space there or choose an "
                             "'output' on a larger disk")

        dist.everywhere(self.info, check)

    # ---- the stage -------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        """This rank's stage brings its layers to the device a window at a time (the plan says so)."""
        return self.plans[self.info.rank].streaming

    @property
    def layer_major(self) -> bool:
        """Layers calibrated one at a time, all samples through a layer before the next: asked for
        (layerwise.enable), or needed because some stage streams (then stages go in turn)."""
        return self.cfg.layerwise.enable or any(p.streaming for p in self.plans)

    @property
    def exports_layers(self) -> bool:
        """This stage writes each layer as soon as it is solved, overlapping the next layers' calibration:
        every layer-major stage, except a resident one under `auto`'s guard (whose verdict, after the last
        layer, may replace its layers; a streaming stage anywhere skips the guard)."""
        return self.layer_major and (self.streaming or self.cfg.guarded is None)

    @property
    def boundary(self) -> Literal["parallel", "sequential"]:
        return self.cfg.layerwise.boundary if self.cfg.layerwise.enable else "sequential"

    def load(self) -> None:
        """This rank's layers onto its device; a rank that cannot read its part fails every rank with it."""

        with self.phase(Phase.LOAD):
            self.stage = dist.everywhere(self.info, lambda: build_stage(self.source, self.arch, *self.layers,
                                                                        self.info.device, self.streaming))
        if self.streaming:  # its first layer read while calibration gets ready (CUDA extensions, inputs)
            self.layer_stream = LayerStream(self.stage, self.source, self.info.device)
            self.layer_stream.prefetch(self.stage.layers()[0][0])

    def calibrate(self) -> None:
        """Quantizers calibrated through the pipeline (every rank at once), or restored from the work dir."""
        with self.phase(Phase.CALIBRATE):
            load_cuda_extensions(self.info.device, {self.cfg.recipe, *(self.cfg.recipe_overrides or {}).values()})
            self.traffic = self.state.once(
                Phase.CALIBRATE, self._calibrate_through_pipeline, self._restore_calibration,
                reused=f"calibration: reusing the state every rank saved in {self.work_dir}",
                # a stage that writes its layers while calibrating: reusable only once written; flat GPTQ
                # changes weights it does not save: calibrated again unless its export was written
                usable=lambda saved: (not self.exports_layers and not self._flat_weights_changed
                                      or "export" in self.state.phases),
                agree=lambda done: all(dist.all_gather_objects(done, self.info.world_size)))
        if self.layer_stream:  # its reads are over (or were not needed: calibration reused)
            self.layer_stream.close()
        self.health = calibration_health(self.stage)
        h = self.health
        logger.info("calibration health: %d good, %d zero, %d NaN amax", h.good, h.zero, h.nan)
        if not h.healthy:
            logger.warning("calibration health: %d zero and %d NaN amax, e.g. %s", h.zero, h.nan, ", ".join(h.bad[:5]))

    def _calibrate_through_pipeline(self) -> Traffic:
        cfg, samples = self.cfg, self.samples
        configs = {a: modelopt_config(cfg.recipe, cfg.recipe_overrides, cfg.ignore, cfg.kv_cache, a,
                                      algorithm_options(cfg, a)) for a in cfg.algorithms}
        if self.layer_major:
            return self._calibrate_layer_by_layer(configs)
        quant_cfg = configs[cfg.algorithm]
        valid = ValidTokens()
        traffic: list[Traffic] = []

        def loop(model: torch.nn.Module) -> None:  # modelopt calls it with the stage it quantizes in place
            traffic.append(run_pipeline(cast(Stage, model), self.info, samples.batches, samples.lengths, valid))

        self.timings["calibration loop"] = calibrate(self.stage, loop, quant_cfg, valid, self.solve_times)
        self.state.save_quantizers(self.stage)
        if not traffic:  # no calibration algorithm (MXFP4: weight scales from the weights, activations dynamic)
            logger.info("calibration: recipe %s has nothing to calibrate on data; modelopt ran no pass", cfg.recipe)
            return Traffic()
        return traffic[-1]

    def _calibrate_layer_by_layer(self, configs: dict[str, dict]) -> Traffic:
        """This stage's layers solved one at a time (layer_by_layer.py), written as solved (`exports_layers`)."""
        exports = self.exports_layers
        result = LayerByLayer(LayerByLayerJob(
            cfg=self.cfg, info=self.info, stage=self.stage, state=self.state, source=self.source, configs=configs,
            batches=self.samples.batches, lengths=self.samples.lengths, rank_dir=self.rank_dir,
            boundary=self.boundary, streaming=self.streaming, exports_layers=exports, fmt=self.fmt,
            owned=self.owned() if exports else [],
            new_writer=self.writer, layer_stream=self.layer_stream, solve_times=self.solve_times)).run()
        self.exporter = result.exporter
        self.timings["calibration loop"] = result.loop_seconds
        return result.traffic

    @property
    def _flat_weights_changed(self) -> bool:
        """Flat GPTQ updates the stage's weights in place, and only the quantizers are saved."""
        return not self.layer_major and self.cfg.algorithm == "gptq"

    def _restore_calibration(self, saved: dict) -> Traffic:
        """Every rank saved its calibration: the quantizers as they were, the layers layer-by-layer
        calibration changed and saved (GPTQ, smoothing, `auto`'s guard), and the traffic recorded."""
        solved = self.state.solved_layers() if self.layer_major and not self.streaming else set()
        restore_calibration(self.stage, self.state, self.cfg.kv_cache, solved)
        return Traffic.from_dict(saved)

    def owned(self) -> list[str]:
        """The source tensors this rank writes: its layers', plus embeddings (first) or head (last)."""
        ranges = [(p.start, p.stop) for p in self.plans]
        return [n for n in self.source.weight_map if owner_of(n, self.arch, ranges) == self.info.rank]

    def writer(self) -> ShardWriter:
        return ShardWriter(self.rank_dir, prefix=f"rank{self.info.rank:03d}")

    def export(self) -> None:
        """This rank's tensors into shards in its work directory (or the ones it wrote before)."""
        lm_head = self.arch.lm_head if self.info.is_last else None

        def write() -> ExportResult:
            if self.exports_layers:  # its layers were written while calibrating
                if self.exporter is None:
                    raise StaleWorkState(f"{self.rank_dir}: recorded shards of this stage (written as its layers "
                                         "were calibrated) are damaged; rerun with --fresh")
                return self.exporter.finish(lm_head)
            return export_stage(self.stage, self.owned(), self.source, self.fmt, self.writer(), lm_head,
                                self.info.device)

        with self.phase(Phase.EXPORT):  # a rank that cannot write (a full disk) fails every rank with it
            self.export_result = dist.everywhere(self.info, lambda: self.state.once(
                Phase.EXPORT, write, ExportResult.from_dict, reused="export: reusing the shards this rank wrote before",
                usable=lambda saved: self.state.shards_intact(ExportResult.from_dict(saved))))
        del self.stage  # the weights are no longer needed

    def stopped_after(self, name: Phase) -> None:
        dist.barrier()
        logger.info("stopped after %s as asked; run the same command without --stop-after to continue", name)

    def resume_point(self) -> str:
        """What a rerun of the same command starts from, as this rank knows it (for an interrupt's message)."""
        done = [p for p in RECORDED if Run.state.ready(self) and p in self.state.phases]
        if not done:
            return "the beginning (no phase was finished)"
        return f"the saved {done[-1]} in {self.rank_dir}"

    # ---- the checkpoint ----------------------------------------------------------------------
    def report(self) -> RankReport:
        plan = self.plans[self.info.rank]
        return RankReport(
            rank=self.info.rank, host=self.info.host, device=str(self.info.device), layers=self.layers,
            kind=plan.budget.kind, phases=dict(self.timings), health=self.health, traffic=self.traffic,
            predicted=Memory(plan.need.host, plan.need.device), measured=budget.measured_peak(plan.budget.kind),
            export=self.export_result, spans=tuple(self.spans),
            choices=tuple(choice for _, choice in sorted(self.state.calibrate_progress.choices.items())),
            guard=self.state.calibrate_progress.guard,
            gptq_solve={str(i): round(t, 3) for i, t in sorted(self.solve_times.per_layer().items())})

    def assemble(self) -> None:
        """Rank 0 gathers every rank's shards and report, assembles, verifies and renames into place."""
        with self.phase(Phase.GATHER):
            gathered = gather(self.cfg.gather, self.info, self.rank_dir, self.export_result.shards)
        dist.set_phase(Phase.ASSEMBLE)
        reports = dist.gather_to_first(self.report(), self.info)
        # every rank waits for rank 0's outcome, and fails with it
        dist.agreed(self.info, functools.partial(self._assemble_checkpoint, gathered.dirs, reports))

    def _assemble_checkpoint(self, dirs: dict[int, Path], reports: list[RankReport] | None) -> None:
        """Rank 0: the gathered shards into the output, sealed by `_verify_and_describe` before the rename."""
        assert reports is not None, "rank 0 gathered every rank's report"
        t0 = time.perf_counter()
        output = Path(self.cfg.output)
        assemble(output, dirs, [r.export for r in reports], self.source, self.fmt, self.options.overwrite,
                 finalize=functools.partial(self._verify_and_describe, reports, t0))
        logger.info("assembled and verified %s in %.1f s", output, time.perf_counter() - t0)
        log_report(reports)

    def _verify_and_describe(self, reports: list[RankReport], t0: float, tmp: Path, checksums: dict[str, str]) -> None:
        """The assembled checkpoint in `tmp` verified, its run record and card written beside it; a failed
        verification stops the output from being renamed into place."""
        problems = verify(tmp, self.source.path, self.cfg.serving.target)
        record = run_record(self.cfg, self.source, reports, self.samples.manifest, len(self.samples.lengths),
                            time.perf_counter() - self.started, time.perf_counter() - t0, problems,
                            wire_name(self.info), tmp)
        self.record = write_record_and_card(tmp, record, Path(self.cfg.output).name, checksums)
        if problems:
            raise verification_error(problems, Path(self.cfg.output))

    def clean_up(self) -> None:
        """Each rank removes its own exports (rank 0 also the copies it received); once every rank has,
        the locks go and with them each empty work directory."""
        for r in range(self.info.world_size) if self.info.is_first else [self.info.rank]:
            shutil.rmtree(self.work_dir / f"rank{r}", ignore_errors=True)
        dist.barrier()
        self.release_locks()


def verification_error(problems: list, output: Path) -> VerificationError:
    """One error naming the kinds of problem found (the first 20) and that the output was not written."""
    kinds = summarize(problems)
    shown = "\n  ".join(kinds[:20]) + (f"\n  ... {len(kinds) - 20} more" if len(kinds) > 20 else "")
    return VerificationError(f"the assembled checkpoint fails verification ({len(problems)} problems); "
                             f"{output} was not written:\n  {shown}")


def wire_name(info: dist.RankInfo) -> str:
    """What carried the hidden states between stages."""
    if info.world_size == 1:
        return "single process"
    return "nccl" if info.wire_group is not None else "gloo"


def log_report(reports: list[RankReport]) -> None:
    """Per-rank phase times, calibration health, and measured peak memory beside the prediction."""
    logger.info("%-5s %-12s %-8s %-9s %8s %10s %8s  %-26s %s", "rank", "host", "device", "layers", "load s",
                "calib s", "export s", "peak GB measured/predicted", "quantizers good/zero/nan")
    for r in reports:
        p, h = r.phases, r.health
        logger.info("%-5d %-12s %-8s %-9s %8.1f %10.1f %8.1f  %-26s %d/%d/%d", r.rank, r.host[:12], r.device,
                    f"{r.layers[0]}-{r.layers[1] - 1}", p[Phase.LOAD], p[Phase.CALIBRATE], p[Phase.EXPORT],
                    r.peaks_text(), h.good, h.zero, h.nan)
