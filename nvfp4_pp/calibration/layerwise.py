"""Layer-by-layer calibration across the pipeline: capture each stage's inputs, then solve its layers.

modelopt's layerwise mode replays a decoder layer's captured call (args and kwargs) through the
whole model; in transformers 5.x those kwargs carry the model's KV cache, which keeps growing over
the replays, so every layer after the first is fed outputs computed against stale keys (seen on
CPU with transformers 5.23: modelopt's own layerwise GPTQ equals this module bit for bit only when
the reference forward runs with `use_cache=False`). Here every layer is fed by the stage's own
forward (`Stage.context` / `Stage.run_layer`: the masks and rotary tables of the model's forward,
no cache), and each layer is calibrated by modelopt's own algorithm function, as modelopt's
layerwise mode calls it.

Two ways to give each stage its first layer's inputs (`layerwise.boundary`):
- `parallel`: one pipelined BF16 pass captures every stage's inputs (all stages busy), then every
  stage solves its layers at once, each from BF16 inputs;
- `sequential`: stage s starts from stage s-1's quantized outputs, sent once s-1 has solved its
  last layer; stages solve in turn. This equals modelopt's single-process layerwise calibration.

Each solved layer is recorded in the work directory (its tensors and the quantizer state), and the
captured inputs are kept there too, so a killed rank resumes from its last solved layer.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from nvfp4_pp.runtime import dist
from nvfp4_pp.calibration.calibrate import ValidTokens, running_max_collection
from nvfp4_pp.algorithms.gptq import SolveTimes, gptq
from nvfp4_pp.algorithms.smoothing import GroupSmoothing, smooth_layer
from nvfp4_pp.log import logger
from nvfp4_pp.model.stage import LayerContext, Stage

_HEARTBEAT, _DONE = 1, 0
"""Messages a stage sends its successor in sequential mode: one per solved layer, then the outputs."""


INPUTS_FILE = "layer_inputs.pt"
"""The stage's captured (or received) first-layer inputs, in the rank's work directory."""


class LayerAlgorithm:
    """modelopt's calibration function for one algorithm config (e.g. {"method": "gptq",
    "perc_damp": 0.01}), applied to a module (one decoder layer, or a whole stage) as modelopt's
    layerwise mode does. GPTQ is modelopt's with its solve step from nvfp4_pp.algorithms.gptq (same bytes,
    the cost of its arithmetic); `times` collects where that solve's time went. None: a recipe with
    nothing to calibrate on data (pure MXFP4): each layer is only passed through (a streaming stage
    still reads and writes it a window at a time). A list: a stack (algorithms/table.py), its steps run
    in order on one decoder layer: smoothing (algorithms/smoothing.py), then modelopt's functions, GPTQ
    from the scales a scale search set before it."""

    def __init__(self, algorithm: dict | list[dict] | None, times: SolveTimes | None = None,
                 keep_scales: bool = False):
        from modelopt.torch.quantization.mode import BaseCalibrateModeDescriptor, CalibrateModeRegistry

        self.config = None
        self.times = times
        self.keep_scales = keep_scales
        self.stack: list[dict] | None = None
        self.smoothing: list[GroupSmoothing] = []
        """What the last smoothing step chose (a stack with `smooth`), for the log."""
        if isinstance(algorithm, list):
            self.stack = algorithm
            return
        if algorithm is None:
            return
        name = BaseCalibrateModeDescriptor._get_mode_name(algorithm["method"], check=True)
        self.descriptor = type(CalibrateModeRegistry[name])
        self.config = self.descriptor().config_class(**algorithm)

    @property
    def feeds_quantized_outputs(self) -> bool:
        """Whether the next layer is fed this layer's quantize-dequantize outputs (GPTQ, the stacks: every
        layer fitted on what it sees when served) or BF16 ones."""
        if self.stack is not None:
            return True
        return self.config is not None and self.config.layerwise.get_qdq_activations_from_prev_layer

    @property
    def calibrates_at_bf16(self) -> bool:
        """Whether the calibrating forward is the plain BF16 forward, so its outputs are the next
        layer's inputs: max calibration (modelopt's `enable_stats_collection` disables quantization
        while statistics are collected; this module's max collection only reads the inputs), unless
        the next layer is fed quantized outputs. Other methods quantize during their passes."""
        return self.config is not None and self.config.method == "max" and not self.feeds_quantized_outputs

    def calibrate(self, layer: nn.Module, forward_loop: Callable[[nn.Module], None]) -> None:
        """Max calibration collects input maxima on the device (calibrate.running_max_collection: the
        same amaxes, no host sync per quantizer and micro-batch), as the pipelined pass does."""
        from modelopt.torch.quantization.mode import wrapped_calib_func

        if self.stack is not None:
            self._calibrate_stack(layer, forward_loop)
            return
        if self.config is None:
            return
        loop = forward_loop
        if self.config.method == "max":
            def loop(module: nn.Module) -> None:
                with running_max_collection(module, ValidTokens()):
                    forward_loop(module)

        func = self.descriptor._calib_func
        if self.config.method == "gptq":
            func = functools.partial(gptq, times=self.times, keep_scales=self.keep_scales)
        wrapped_calib_func(layer, self.config, loop, func=func, supports_layerwise=self.descriptor._supports_layerwise)

    def _calibrate_stack(self, layer: nn.Module, forward_loop: Callable[[nn.Module], None]) -> None:
        assert self.stack is not None
        searched = False  # a scale search set the weight quantizers' scales: GPTQ keeps them
        for step in self.stack:
            if step["method"] == "smooth":
                self.smoothing = smooth_layer(layer, forward_loop, step["weight"], step["input"])
                continue
            LayerAlgorithm(step, self.times, keep_scales=searched).calibrate(layer, forward_loop)
            searched = searched or step["method"] not in ("max", "gptq")


@contextlib.contextmanager
def quantizers_off(module: nn.Module) -> Iterator[None]:
    """Every quantizer of `module` disabled: the plain BF16 forward (to capture inputs)."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    with set_quantizer_by_cfg_context(module, [{"quantizer_name": "*", "enable": False}]):
        yield


class LayerInputs:
    """One stage's inputs for the layer it solves next: a hidden state per micro-batch, with contexts."""

    def __init__(self, stage: Stage, hidden: list[torch.Tensor], contexts: list[LayerContext] | None = None):
        self.stage = stage
        self.hidden = hidden
        self.contexts: list[LayerContext] = contexts or [stage.context(h) for h in hidden]

    def replay(self, index: int, layer: nn.Module, outputs: list[torch.Tensor] | None = None) -> None:
        """Every micro-batch through layer `index` (the calibration algorithm's forward loop); with
        `outputs`, each micro-batch's output is kept there."""
        for h, c in zip(self.hidden, self.contexts):
            out = self.stage.run_layer(index, layer, h, c)
            if outputs is not None:
                outputs.append(out)

    @torch.no_grad()
    def advance(self, index: int, layer: nn.Module) -> None:
        """Replace the inputs by layer `index`'s outputs, quantizers as calibrated (quantize-dequantize)."""
        self.hidden = [self.stage.run_layer(index, layer, h, c) for h, c in zip(self.hidden, self.contexts)]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


class Solver:
    """Solves a stage's layers in order, recording each; resumes after the last recorded one.

    `record(index)` is called after each solved layer (the caller saves the layer's tensors and
    the quantizer state); `solved` are the layers already recorded by an earlier, interrupted run,
    whose saved state the caller restored: they are replayed, not solved again.
    """

    def __init__(self, stage: Stage, algorithms: dict[str, dict], solved: set[int],
                 record: Callable[[int, nn.Module], None],
                 heartbeat: Callable[[int], None] = lambda index: None,
                 before: Callable[[int, nn.Module], None] = lambda index, layer: None,
                 choose: Callable[[int, nn.Module, LayerInputs], str] | None = None,
                 chosen: dict[int, str] | None = None, times: SolveTimes | None = None,
                 alongside: Callable[[int, nn.Module], None] | None = None,
                 replayed: Callable[[int, nn.Module], None] = lambda index, layer: None):
        """`algorithms`: name -> modelopt algorithm config; one, or (with `choose`, `algorithm: auto`)
        the candidates `choose(index, layer, inputs)` picks from per layer; `chosen` holds what solved
        layers got. `before(index, layer)` runs ahead of each layer (a streaming stage loads it there);
        `record` after each layer solved here (save it for resume; a streaming stage writes and frees it).
        `alongside(index, layer)` runs before a layer is chosen and fitted, its quantizers as inserted
        (`auto`'s guard fits each candidate's own copy there). `replayed(index, layer)` runs after a layer solved
        before is replayed (a resident stage that exports while solving exports it there)."""
        self.stage, self.solved, self.record, self.heartbeat, self.before = stage, solved, record, heartbeat, before
        self.replayed = replayed
        self.times = times
        """GPTQ's solve seconds per Linear (named with its layer's prefix), where the run collects them."""
        self.algorithms = {name: LayerAlgorithm(algorithm, times) for name, algorithm in algorithms.items()}
        self.choose, self.chosen = choose, dict(chosen or {})
        self.alongside = alongside

    def algorithm(self, index: int) -> LayerAlgorithm:
        """Layer `index`'s algorithm: the run's one, or the one chosen for it."""
        return self.algorithms[self.chosen.get(index, next(iter(self.algorithms)))]

    def feeds_quantized(self, index: int) -> bool:
        """Whether layer `index` is fitted before its outputs feed the next layer, quantizers on: under
        `auto` always, so every layer is judged and fitted on the inputs it sees when served, whatever
        its predecessors chose; else as its algorithm does in modelopt (GPTQ yes, max and AWQ no)."""
        return self.choose is not None or self.algorithm(index).feeds_quantized_outputs

    def _advance(self, inputs: LayerInputs, index: int, layer: nn.Module) -> None:
        if self.feeds_quantized(index):
            inputs.advance(index, layer)
        else:
            with quantizers_off(layer):
                inputs.advance(index, layer)

    def run(self, inputs: LayerInputs) -> LayerInputs:
        layers = self.stage.layers()
        started = time.perf_counter()
        todo = [index for index, _ in layers if index not in self.solved]
        parts = ("read", *(("guard",) if self.alongside else ()), *(("choose",) if self.choose else ()), "advance",
                 "calibrate", "write")
        split = LayerTimes(inputs.hidden[0].device if inputs.hidden else torch.device("cpu"), parts)
        for step, (index, layer) in enumerate(layers, 1):
            split.start()
            self.before(index, layer)
            split.lap("read")
            if index in self.solved:
                self._advance(inputs, index, layer)
                logger.info("layer %d: solved before, replayed (%d/%d)", index, step, len(layers))
                self.replayed(index, layer)
                continue
            if self.alongside:
                self.alongside(index, layer)
                split.lap("guard")
            if self.choose:
                self.chosen[index] = self.choose(index, layer, inputs)
                split.lap("choose")
            if self.times is not None:
                self.times.prefix = f"{self.stage.layer_prefix(index)}."
            if self.algorithm(index).calibrates_at_bf16 and not self.feeds_quantized(index):
                # one pass: it calibrates and gives the next inputs
                inputs.hidden = self._calibrate_and_advance(inputs, index, layer)
                split.lap("calibrate")
            else:
                self._solve(inputs, index, layer, split)
            self.record(index, layer)
            split.lap("write")
            done = todo.index(index) + 1
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(todo) - done)
            solve = (self.times.per_layer() if self.times is not None else {}).get(index)
            logger.info("layer %d solved in %.2f s (%s%s; %d/%d of this stage, %d tokens; ETA %.0f s)", index,
                        split.layer_total(), split.layer_text(), "" if solve is None else f", GPTQ solve {solve:.2f}",
                        done, len(todo), inputs.tokens, eta)
            self.heartbeat(index)
        if todo:
            logger.info("%d layers solved in %.1f s: %s", len(todo), sum(split.totals.values()), split.totals_text())
        return inputs

    def _calibrate_and_advance(self, inputs: LayerInputs, index: int, layer: nn.Module) -> list[torch.Tensor]:
        """Max calibration of layer `index`, keeping its forward's outputs: they are the BF16 outputs the
        separate pass with quantizers off would give, bit for bit (tests/test_streaming.py checks it)."""
        outputs: list[torch.Tensor] = []
        calls = 0

        def loop(module: nn.Module) -> None:
            nonlocal calls
            calls += 1
            inputs.replay(index, module, outputs)

        self.algorithm(index).calibrate(layer, loop)
        if calls != 1:
            raise RuntimeError(f"layer {index}: max calibration ran its forward loop {calls} times, not once")
        return outputs

    def _solve(self, inputs: LayerInputs, index: int, layer: nn.Module, split: LayerTimes) -> None:
        """Calibrate layer `index` from a replay of its inputs, and advance them in a pass of their own:
        BF16 before calibrating (as modelopt), or quantized after it (GPTQ feeds quantized outputs)."""
        replay = LayerInputs(self.stage, inputs.hidden, inputs.contexts)
        algorithm = self.algorithm(index)
        if not self.feeds_quantized(index):
            self._advance(inputs, index, layer)
            split.lap("advance")
        algorithm.calibrate(layer, lambda module: replay.replay(index, module))
        split.lap("calibrate")
        if algorithm.smoothing:
            logger.info("layer %d smoothing: %s", index, "; ".join(
                f"{s.group} " + ("none" if s.alpha is None else f"alpha {s.alpha:.2f}") +
                f" (output error {s.error:.3g}, unsmoothed {s.unsmoothed:.3g})" for s in algorithm.smoothing))
        if self.feeds_quantized(index):
            self._advance(inputs, index, layer)
            split.lap("advance")


class LayerTimes:
    """Where each layer's time goes: reading it (a streaming stage's wait), the BF16 pass that
    advances the inputs, calibration, writing (the work dir's record, or a streaming stage's export).

    On a GPU each lap waits for the compute stream (not the whole device: a streaming stage's next
    layer is copied on a stream of its own meanwhile), so the time of queued kernels is counted in
    the part that queued them (a sync per part and layer: negligible against a layer's compute)."""

    def __init__(self, device: torch.device, parts: tuple[str, ...] = ("read", "advance", "calibrate", "write")):
        """`parts`: where time goes, in log order (`choose` is `algorithm: auto`'s trials)."""
        self.device, self.parts = device, parts
        self.layer: dict[str, float] = {}
        self.totals = dict.fromkeys(parts, 0.0)
        self._t = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.layer = dict.fromkeys(self.parts, 0.0)
        self._t = self._now()

    def lap(self, part: str) -> None:
        now = self._now()
        self.layer[part] += now - self._t
        self.totals[part] += now - self._t
        self._t = now

    def layer_total(self) -> float:
        return sum(self.layer.values())

    def layer_text(self) -> str:
        return ", ".join(f"{part} {self.layer[part]:.2f}" for part in self.parts)

    def totals_text(self) -> str:
        return ", ".join(f"{part} {self.totals[part]:.1f} s" for part in self.parts)


def capture_hook(stage: Stage, captured: list[torch.Tensor]):
    """A forward pre-hook on the stage's first decoder layer that keeps each micro-batch's input."""
    first = stage.layers()[0][1]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach().clone())

    return first.register_forward_pre_hook(hook, with_kwargs=True)


def save_inputs(path: Path, hidden: list[torch.Tensor]) -> None:
    """Captured inputs into the work directory (the resume point of every solve)."""
    from nvfp4_pp.files import write_errors_named

    tmp = path.with_name(f".{path.name}.tmp")
    with write_errors_named(path, sum(h.numel() * h.element_size() for h in hidden)):
        torch.save([h.cpu() for h in hidden], tmp)
        tmp.replace(path)


def load_inputs(path: Path, device: torch.device) -> list[torch.Tensor]:
    return [h.to(device) for h in torch.load(path, weights_only=True)]


class Relay:
    """Sequential boundary: what a stage receives from its predecessor and sends its successor.

    A stage waits while every stage before it solves; each solved layer sends a heartbeat down the
    chain, so no wait is longer than one layer's solve (`pipeline.timeout_s` bounds that), and
    waiting ranks log where the chain is. Then the predecessor's final outputs arrive.
    """

    def __init__(self, info: dist.RankInfo, successor_waits: bool):
        self.info, self.successor_waits = info, successor_waits

    def heartbeat(self, index: int) -> None:
        if self.successor_waits:
            dist.send_object((_HEARTBEAT, index), self.info.rank + 1)

    def wait_for_inputs(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Block until the predecessor has solved its last layer; relay its heartbeats; its outputs."""
        info = self.info
        while True:
            kind, index = dist.recv_object(info.rank - 1)
            if kind == _DONE:
                break
            logger.info("waiting for the stages before this one: layer %d solved", index)
            self.heartbeat(index)
        receiver = dist.Receiver(info.rank - 1, info.wire_device, info.wire_group, shapes=shapes, dtype=dtype)
        return [h.to(info.device) for h in receiver]

    def send_outputs(self, hidden: list[torch.Tensor]) -> int:
        """The stage's final outputs to its successor, if it waits for them; the bytes sent."""
        info = self.info
        if not self.successor_waits:
            return 0
        dist.send_object((_DONE, -1), info.rank + 1)
        sender = dist.Sender(info.rank + 1, info.wire_device, info.wire_group, headers=False)
        for h in hidden:
            sender.send(h.to(info.wire_device))
        sender.close()
        return sender.bytes_sent
