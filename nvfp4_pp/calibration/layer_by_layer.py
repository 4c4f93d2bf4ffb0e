"""One stage's layer-by-layer calibration: its first layer's inputs, then its layers solved one at a time.

Used when layers are calibrated one at a time (`layerwise.enable`, or a stage that streams): the stage's
inputs come from the work directory, one pipelined BF16 pass (parallel boundary) or the previous stage
(sequential boundary); layerwise.Solver then fits each layer, recording it for resume (a resident stage),
and hands it to the export thread as soon as it is solved, so its export overlaps the next layers (a
streaming stage's layer is freed once packed; a resident stage under `auto`'s guard exports after the
verdict instead). `algorithm: auto` chooses each layer's algorithm first (layer_choice).
Everything it needs is in `LayerByLayerJob`; what it leaves is `LayerByLayerResult` and the work state.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from nvfp4_pp.runtime import dist
from nvfp4_pp.calibration import layerwise
from nvfp4_pp.algorithms.table import ALGORITHMS, AUTO
from nvfp4_pp.calibration.calibrate import ValidTokens, insert_quantizers, no_data_parallel_group, register_kv_attention
from nvfp4_pp.config import RunConfig
from nvfp4_pp.data.samples import MicroBatch
from nvfp4_pp.checkpoint.export import StageExporter
from nvfp4_pp.checkpoint.formats import CheckpointFormat
from nvfp4_pp.algorithms.gptq import SolveTimes, solve_progress
from nvfp4_pp.calibration.auto_guard import AUTO_PATH, GuardRun, ModelHead, decide
from nvfp4_pp.calibration.layer_choice import LayerChooser, held_out_count
from nvfp4_pp.log import logger
from nvfp4_pp.calibration.pipeline import run_pipeline
from nvfp4_pp.records import Traffic
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import Stage, drop_weights
from nvfp4_pp.calibration.streaming import LayerStream
from nvfp4_pp.checkpoint.work_state import WorkState
from nvfp4_pp.checkpoint.writer import ShardWriter


def restore_calibration(stage: Stage, state: WorkState, kv_cache: str | None, solved: set[int]) -> None:
    """The stage's quantizers as the work state saved them (KV quantizers need their classes registered),
    and the saved weights of the `solved` layers (layer-by-layer calibration changes them: GPTQ, smoothing)."""
    if kv_cache:
        register_kv_attention(stage)  # restoring re-creates the KV quantizers of those classes
    state.restore_quantizers(stage)
    for index, layer in stage.layers():
        if index in solved:
            state.restore_layer(index, layer)


@dataclasses.dataclass(frozen=True, slots=True)
class LayerByLayerJob:
    """What one stage's layer-by-layer calibration needs, all known before it starts."""

    cfg: RunConfig
    info: dist.RankInfo
    stage: Stage
    state: WorkState
    source: SourceCheckpoint
    configs: dict[str, dict]
    """modelopt's config per algorithm (several: `algorithm: auto`'s candidates)."""
    batches: list[MicroBatch] | None
    """The token ids (first rank only)."""
    lengths: list[tuple[int, ...]]
    """Real lengths per micro-batch (every rank: the shapes a sequential boundary receives)."""
    rank_dir: Path
    boundary: Literal["parallel", "sequential"]
    streaming: bool
    """The stage's layers are read a window at a time (and written as solved)."""
    exports_layers: bool
    """Each layer is written as soon as it is solved (export.StageExporter, overlapping the next layers): a
    streaming stage always, a resident one unless `auto`'s guard may replace its layers after the last."""
    fmt: CheckpointFormat
    owned: list[str]
    """The source tensors this rank writes (when it exports its layers as solved)."""
    new_writer: Callable[[], ShardWriter]
    layer_stream: LayerStream | None
    """A streaming stage's reader of its layers (made when the stage was built, its first layer read)."""
    solve_times: SolveTimes
    """Where GPTQ's solve seconds per Linear are collected."""


@dataclasses.dataclass(frozen=True, slots=True)
class LayerByLayerResult:
    """What the calibration leaves besides the stage's quantizers and the work state."""

    traffic: Traffic
    loop_seconds: float
    """Seconds solving the layers (the record's "calibration loop")."""
    exporter: StageExporter | None
    """The exporter of a stage that exports its layers as solved, its layers written: the export phase
    finishes it (the rest of the stage's tensors: embeddings, head, final norm)."""


class LayerByLayer:
    """Calibrates one stage layer by layer (`run()`), resuming after the layers an interrupted run solved."""

    def __init__(self, job: LayerByLayerJob):
        self.job = job
        algorithms = {name: quant_cfg["algorithm"] for name, quant_cfg in job.configs.items()}
        if not job.cfg.layerwise.enable:  # streaming alone: each layer's inputs as in one pass (BF16)
            algorithms = {name: a and {**a, "layerwise": {"get_qdq_activations_from_prev_layer": False}}
                          for name, a in algorithms.items()}  # (stacks and auto need layerwise.enable)
        self.algorithms = algorithms
        # A streaming stage's layers are written as they are solved: an interrupted one starts over.
        self.solved: set[int] = set() if job.streaming else job.state.solved_layers()
        self.stream = job.layer_stream if job.streaming else None
        self.exporter: StageExporter | None = None
        self.chooser: LayerChooser | None = None
        self.guard_run: GuardRun | None = None
        """`auto`'s guard: its candidate run alone beside it (set when the guard runs)."""

    def run(self) -> LayerByLayerResult:
        job = self.job
        info = job.info
        guard = self._guard_runs()
        if not self.solved:  # no layer solved (or a stage starting over): no choice stands
            job.state.record_calibrate_progress(choices={})
        self._prepare_quantizers()
        # the first stage's inputs are its embeddings (sequential boundary): computed again, never saved
        embeds = info.is_first and job.boundary != "parallel"
        waits = dist.all_gather_objects(not self._inputs_saved() and not embeds, info.world_size)
        relay = layerwise.Relay(info, not info.is_last and waits[info.rank + 1])
        held_out = held_out_count(len(job.lengths), job.cfg.auto.held_out)
        inputs, traffic = self._layer_inputs(waits, relay, guard, held_out)
        if job.exports_layers:
            assert self.guard_run is None, "auto's guard may replace layers after the last: they export after it"
            self.exporter = StageExporter(job.stage, job.owned, job.source, job.fmt, job.new_writer(), info.device)
        if job.cfg.algorithm == AUTO:
            self.chooser = LayerChooser(job.stage, self.algorithms, held_out, keep_chosen=guard)
        elif any(n == "gptq" or "gptq" in ALGORITHMS[n].steps for n in self.algorithms):  # one progress line
            # over the stage's solves (GPTQ alone or a stack's last step)
            job.solve_times.progress = solve_progress(job.stage, self.solved)
        t0 = time.perf_counter()
        outputs = self._solve(inputs, relay if job.boundary == "sequential" else None)
        seconds = time.perf_counter() - t0
        if self.stream:
            parts = [sorted(p)[len(p) // 2] for p in zip(*self.stream.read_parts)] or [0.0, 0.0, 0.0]
            logger.info("streaming: calibration waited %.1f s for layer reads (the read thread's medians per layer: "
                        "into pinned memory %.3f s, waiting for room on the device %.3f s, onto it %.3f s)",
                        self.stream.wait_seconds, *parts)
        if job.boundary == "sequential":
            extra = self.guard_run.outputs() if self.guard_run else []
            traffic = dataclasses.replace(traffic, bytes_sent=relay.send_outputs(outputs.hidden + extra))
        if self.guard_run:
            self._verdict(held_out)
        return LayerByLayerResult(traffic, seconds, self.exporter)

    def _guard_runs(self) -> bool:
        """Whether `auto`'s guard runs on this stage. Its candidate's own layers and streams are not saved, so
        a stage without a verdict calibrates again from its first layer (every stage, with the sequential
        boundary, whose streams flow between them): the output is an uninterrupted run's. A streaming stage
        anywhere has no room for the copies: no stage guards."""
        job = self.job
        if job.cfg.guarded is None:
            return False
        flags = dist.all_gather_objects((job.streaming, job.state.calibrate_progress.guard is not None),
                                        job.info.world_size)
        if any(streaming for streaming, _ in flags):
            logger.info("auto guard: skipped (a streaming stage keeps no copy of its layers); the per-layer "
                        "choices stand")
            return False
        decided = all(d for _, d in flags) if job.boundary == "sequential" else flags[job.info.rank][1]
        if decided:
            return False
        if self.solved or self._inputs_saved():
            logger.info("auto guard: no verdict was given before the interruption and the guard's own layers are "
                        "not saved: calibration starts again from the stage's first layer")
            self.solved = set()
            if job.boundary == "sequential":  # the previous stage relays its streams again
                job.state.record_calibrate_progress(inputs_saved=False)
        return True

    def _verdict(self, held_out: int) -> None:
        """`auto`'s guard decides (sequential boundary: the last stage, for every stage; parallel: each
        stage for itself); the candidate's layers replace `auto`'s here and in the work state if it won."""
        job, run = self.job, self.guard_run
        assert run is not None
        head = ModelHead(job.stage, job.source, job.info.device) if job.info.is_last else None
        if job.boundary == "sequential":
            errors = dist.all_gather_objects(run.errors(head) if head else None, job.info.world_size)[-1]
            verdict = decide(errors, held_out, "KL")
        else:
            verdict = decide(run.errors(head), held_out, "KL" if head else "output error")
        if verdict.kept != AUTO_PATH:
            for index, layer in run.keep(job.info.device):
                job.stage.replace_layer(index, layer)
                job.state.save_layer(index, layer)
            job.state.save_quantizers(job.stage, sorted(self.solved))
        self.guard_run = None  # the copies go
        job.state.record_calibrate_progress(guard=verdict)

    def _prepare_quantizers(self) -> None:
        """Quantizers inserted uncalibrated, or (an interrupted run) restored with its solved layers."""
        job = self.job
        if self.solved:
            restore_calibration(job.stage, job.state, job.cfg.kv_cache, self.solved)
        else:
            # every candidate calibrates the same quantizers: a scale search's (static block scales), if one has it
            quant_cfg = next((c for name, c in job.configs.items() if ALGORITHMS[name].scale_search),
                             next(iter(job.configs.values())))
            insert_quantizers(job.stage, {**quant_cfg, "algorithm": None})
        no_data_parallel_group(job.stage)

    @property
    def _inputs_path(self) -> Path:
        return self.job.rank_dir / layerwise.INPUTS_FILE

    def _inputs_saved(self) -> bool:
        return self._inputs_path.is_file() and self.job.state.calibrate_progress.inputs_saved

    def _layer_inputs(self, waits: list[bool], relay: layerwise.Relay, guard: bool,
                      held_out: int) -> tuple[layerwise.LayerInputs, Traffic]:
        """This stage's first layer's inputs (`waits`: which ranks have none saved): from the work dir, the
        pipelined BF16 pass (parallel boundary) or the previous stage (sequential boundary). With `auto`'s
        guard, also its streams (from the previous stage, or these same inputs where they are BF16 or
        embeddings)."""
        job, info = self.job, self.job.info
        saved = self._inputs_saved()
        streams: list[torch.Tensor] | None = None
        if job.boundary == "parallel" and any(waits):  # the pass needs every stage, whatever each has saved
            hidden, traffic = self._capture_pass()
            saved = False
        elif saved:
            hidden, traffic = layerwise.load_inputs(self._inputs_path, info.device), Traffic()
        elif info.is_first:  # the embeddings: computed again on a resume rather than saved
            assert job.batches is not None, "the first rank holds the token ids"
            with torch.no_grad():
                hidden = [job.stage.embed(b.ids.to(info.device)) for b in job.batches]
            self._start_guard(guard, hidden, None, held_out)
            return layerwise.LayerInputs(job.stage, hidden), Traffic()
        else:
            dtype = next(job.stage.parameters()).dtype
            shapes: list[tuple[int, ...]] = [(len(real), max(real), job.stage.hf_config.hidden_size)
                                             for real in job.lengths]
            extra = 2 * shapes + 2 * shapes[len(shapes) - held_out:] if guard else []  # GuardRun.outputs()
            received = relay.wait_for_inputs(shapes + extra, dtype)
            hidden, streams = received[:len(shapes)], received[len(shapes):]
            traffic = Traffic(bytes_received=sum(h.numel() * h.element_size() for h in received))
        if not saved:
            layerwise.save_inputs(self._inputs_path, hidden)
            job.state.record_calibrate_progress(inputs_saved=True)
        self._start_guard(guard, hidden, streams, held_out)
        return layerwise.LayerInputs(job.stage, hidden), traffic

    def _start_guard(self, guard: bool, hidden: list[torch.Tensor], streams: list[torch.Tensor] | None,
                     held_out: int) -> None:
        """`auto`'s guard from `streams` (the previous stage's GuardRun.outputs()), or from this
        stage's own inputs where every path's are the same (embeddings, or BF16 with the parallel boundary)."""
        if not guard:
            return
        name, n = self.job.cfg.guarded, len(hidden)
        assert name is not None, "a guard has its candidate"
        if streams is None:
            judged, kept, auto, reference = list(hidden), list(hidden), hidden[n - held_out:], hidden[n - held_out:]
        else:
            judged, kept = streams[:n], streams[n:2 * n]
            auto, reference = streams[2 * n:2 * n + held_out], streams[2 * n + held_out:]
        self.guard_run = GuardRun(self.job.stage, name, layerwise.LayerAlgorithm(self.algorithms[name]), judged, kept,
                                  auto, reference, held_out)

    def _capture_pass(self) -> tuple[list[torch.Tensor], Traffic]:
        """One pipelined BF16 pass (quantizers off, every stage busy) keeping each stage's inputs."""
        job = self.job
        captured: list[torch.Tensor] = []
        hook = layerwise.capture_hook(job.stage, captured)
        try:
            with layerwise.quantizers_off(job.stage):
                traffic = run_pipeline(job.stage, job.info, job.batches, job.lengths, ValidTokens())
        finally:
            hook.remove()
        return captured, traffic

    def _solve(self, inputs: layerwise.LayerInputs, relay: layerwise.Relay | None) -> layerwise.LayerInputs:
        """Every layer through layerwise.Solver; the stage's last outputs."""
        job, stream = self.job, self.stream
        try:
            outputs = layerwise.Solver(
                job.stage, self.algorithms, self.solved, self._write_and_free if stream else self._record,
                replayed=self._export_resident if self.exporter else lambda index, layer: None,
                heartbeat=relay.heartbeat if relay else lambda index: None,
                before=stream.load if stream else lambda index, layer: None,
                choose=self._choose if self.chooser else None,
                alongside=self.guard_run.layer if self.guard_run else None,
                chosen={i: c.chosen for i, c in job.state.calibrate_progress.choices.items() if i in self.solved},
                times=job.solve_times).run(inputs)
            if self.exporter:  # the last layer packed (its writes go on into the export phase)
                self.exporter.wait_packed()
            return outputs
        finally:
            if stream:
                stream.close()

    def _record(self, index: int, layer: torch.nn.Module) -> None:
        """A solved layer into the work state (its tensors and the quantizers so far): a rerun resumes after it
        (and exports it again). Then, if the stage exports as it solves, to the exporter."""
        self.solved.add(index)
        self.job.state.save_layer(index, layer)
        self.job.state.save_quantizers(self.job.stage, sorted(self.solved))
        if self.exporter:
            self._export_resident(index, layer)

    def _export_resident(self, index: int, layer: torch.nn.Module) -> None:
        """A resident stage's solved (or replayed) layer exported by the exporter's thread while the next layer
        calibrates. The exporter gets a copy sharing the layer's weights: exporting rewrites quantizers (shared
        inputs' amaxes unified, AWQ's scales folded) and the work state's next save of the stage's quantizers
        must hold them as solved, for a rerun to export them again. The stage's layer drops its weights (the
        copy frees them as it packs them) and keeps its quantizers (calibration health reads them)."""
        assert self.exporter is not None, "only a stage that exports its layers as solved"
        shell = copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})
        drop_weights(layer)
        self.exporter.layer(index, shell, release=_drop_copy)

    def _write_and_free(self, index: int, layer: torch.nn.Module) -> None:
        """A streaming stage's solved layer exported by the exporter's own thread while the next layer
        calibrates; its weights freed once packed."""
        assert self.exporter is not None and self.stream is not None, "a streaming stage has both"
        self.exporter.layer(index, layer, release=self.stream.unload)

    def _choose(self, index: int, layer: torch.nn.Module, inputs: layerwise.LayerInputs) -> str:
        """`auto`: layer `index`'s algorithm, kept in the work state."""
        assert self.chooser is not None, "choosing runs under `auto` only"
        choice = self.chooser(index, layer, inputs)
        if self.guard_run and self.chooser.chosen_trial is not None:  # the guard follows auto's trial path
            self.guard_run.auto_layer(index, self.chooser.chosen_trial)
            self.chooser.chosen_trial.to_empty(device="meta")
            self.chooser.chosen_trial = None
        state = self.job.state
        state.record_calibrate_progress(choices={**state.calibrate_progress.choices, index: choice})
        return choice.chosen


def _drop_copy(shell: torch.nn.Module, packed: torch.cuda.Event | None) -> None:
    """A resident layer's export copy, once packed: its tensors go now (modelopt's quantizers hold their parent
    module, a cycle that would keep them until a garbage collection; the export stream recorded its uses)."""
    shell.to_empty(device="meta")
