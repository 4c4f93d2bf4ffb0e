"""Unit tests of the layer-by-layer parts, no run: `ValidTokens` and the pad-free max, `layerwise.Solver`,
`LayerChooser` and `LayerStream` (the calibrate phase's saved progress: test_phases.py).

On the first three layers of a tiny random Llama (the architecture coverage model: shapes only, no
quality claim), with modelopt's FP8 quantizers (per-tensor W8A8, whose quantized forward runs on CPU;
NVFP4's needs CUDA). The whole-run equalities with modelopt live in test_algorithms.py and
test_streaming.py; these pin each part's own contract in seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nvfp4_pp.model.arch import architecture_of
from nvfp4_pp.calibration.calibrate import ValidTokens, _make_max_hook, insert_quantizers, modelopt_config
from nvfp4_pp.errors import CalibrationError
from nvfp4_pp.calibration.layer_choice import LayerChooser, NonFiniteLayer, held_out_count, relative_error
from nvfp4_pp.calibration.layerwise import LayerInputs, Solver, quantizers_off
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import build_stage
from nvfp4_pp.calibration.streaming import LayerStream
from tiny_models import write_tiny_model

CPU = torch.device("cpu")
MAX = {"method": "max", "distributed_sync": False}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SourceCheckpoint:
    return SourceCheckpoint(str(write_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny") / "llama")))


def _stage(source: SourceCheckpoint, streaming: bool = False, quantized: bool = True):
    stage = build_stage(source, architecture_of(source.config, source.weight_map), 0, 3, CPU, streaming)
    if quantized:
        insert_quantizers(stage, {**modelopt_config("fp8"), "algorithm": None})
    return stage


def _hidden(stage, batches: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [stage.embed(torch.randint(0, 256, (1, 12), generator=generator)) for _ in range(batches)]


def _amaxes(stage) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in stage.state_dict().items() if k.endswith("_amax")}


# ---- ValidTokens -----------------------------------------------------------------------------
def test_pads_never_reach_the_running_max():
    valid, box = ValidTokens(), [None]
    hook = _make_max_hook(box, valid)
    x = torch.tensor([[[1.0, -3.0], [100.0, 100.0]], [[2.0, 0.5], [-4.0, 1.0]]])  # [B=2, T=2, F=2]
    valid.set(torch.tensor([[True, False], [True, True]]))  # the 100s are pads
    hook(None, (x,))
    assert float(box[0]) == 4.0
    valid.set(None)  # nothing padded: every position counts
    hook(None, (x,))
    assert float(box[0]) == 100.0
    valid.set(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="does not fit the token mask"):
        hook(None, (x,))


def test_a_padded_batch_is_refused_while_a_quantizer_cannot_skip_pads():
    valid = ValidTokens()
    valid.unmaskable = ["model.layers.0.mlp.down_proj.weight_quantizer"]
    valid.set(None)  # unpadded batches are fine
    with pytest.raises(CalibrationError, match="use calibration.batch_size: 1 or calibration.pack: true"):
        valid.set(torch.ones(1, 4, dtype=torch.bool))


# ---- Solver ----------------------------------------------------------------------------------
def test_solver_calls_back_in_layer_order_and_feeds_bf16_outputs_after_max(source):
    stage = _stage(source)
    hidden = _hidden(stage)
    with torch.no_grad(), quantizers_off(stage):  # the plain BF16 forward, layer after layer
        expected = LayerInputs(stage, [h.clone() for h in hidden])
        for index, layer in stage.layers():
            expected.advance(index, layer)
    calls: list[tuple[str, int]] = []
    outputs = Solver(stage, {"max": MAX}, set(), lambda index, layer: calls.append(("record", index)),
                     heartbeat=lambda index: calls.append(("heartbeat", index)),
                     before=lambda index, layer: calls.append(("before", index))).run(LayerInputs(stage, hidden))
    assert calls == [(what, i) for i in range(3) for what in ("before", "record", "heartbeat")]
    assert all(torch.equal(a, b) for a, b in zip(outputs.hidden, expected.hidden))
    amaxes = _amaxes(stage)
    assert amaxes and all(bool(torch.isfinite(v).all()) and float(v.max()) > 0 for v in amaxes.values())


def test_solver_replays_solved_layers_and_solves_the_rest_as_one_run_would(source):
    whole = _stage(source)
    hidden = _hidden(whole)
    Solver(whole, {"max": MAX}, set(), lambda index, layer: None).run(LayerInputs(whole, [h.clone() for h in hidden]))
    resumed = _stage(source)  # layer 0 solved by an earlier run: replayed (not calibrated again), the rest solved
    recorded: list[int] = []
    Solver(resumed, {"max": MAX}, {0}, lambda index, layer: recorded.append(index)).run(LayerInputs(resumed, hidden))
    assert recorded == [1, 2]
    mine, theirs = _amaxes(resumed), _amaxes(whole)
    assert not [k for k in mine if ".layers.0." in k]
    later = {k: v for k, v in theirs.items() if ".layers.0." not in k}
    assert later and mine.keys() == later.keys() and all(torch.equal(v, later[k]) for k, v in mine.items())


def test_solver_under_a_chooser_keeps_each_choice_and_feeds_quantized_outputs(source):
    stage = _stage(source)
    asked: list[int] = []

    def choose(index, layer, inputs) -> str:
        asked.append(index)
        return "second" if index == 1 else "first"

    solver = Solver(stage, {"first": MAX, "second": MAX}, set(), lambda index, layer: None, choose=choose)
    solver.run(LayerInputs(stage, _hidden(stage)))
    assert asked == [0, 1, 2] and solver.chosen == {0: "first", 1: "second", 2: "first"}
    assert all(solver.feeds_quantized(i) for i in range(3))


# ---- LayerChooser ----------------------------------------------------------------------------
def test_held_out_share_keeps_one_to_judge_and_one_to_fit():
    assert [held_out_count(n, 0.25) for n in (2, 3, 4, 8, 10)] == [1, 1, 1, 2, 2]
    assert held_out_count(2, 0.5) == 1 and held_out_count(9, 0.5) == 4


def test_chooser_judges_every_candidate_on_held_out_batches_and_breaks_ties_by_order(source):
    stage = _stage(source)
    index, layer = stage.layers()[0]
    before = copy.deepcopy(layer.state_dict())
    choice = LayerChooser(stage, {"max": MAX, "max_again": MAX}, held_out=1)(index, layer, LayerInputs(stage, _hidden(stage)))
    assert (choice.layer, choice.chosen, choice.fitted_on, choice.judged_on) == (0, "max", 3, 1)
    assert choice.errors["max"] == choice.errors["max_again"] and 0 < choice.errors["max"] < 1
    # the candidates fitted copies: the layer itself is untouched (the winner fits it afterwards)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_chooser_refuses_a_layer_no_candidate_quantizes_to_finite_outputs(source):
    stage = _stage(source)
    index, layer = stage.layers()[0]
    hidden = _hidden(stage)
    hidden[-1] = torch.full_like(hidden[-1], float("inf"))
    with pytest.raises(NonFiniteLayer, match="layer 0: every auto candidate"):
        LayerChooser(stage, {"max": MAX}, held_out=1)(index, layer, LayerInputs(stage, hidden))


def test_relative_error_is_zero_for_equal_outputs_and_scale_free():
    reference = [torch.tensor([1.0, 2.0]), torch.tensor([2.0])]
    assert relative_error(reference, reference) == 0.0
    off = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    assert relative_error(off, reference) == pytest.approx(1 / 9)
    assert relative_error([10 * t for t in off], [10 * t for t in reference]) == pytest.approx(1 / 9)


# ---- LayerStream -----------------------------------------------------------------------------
def test_layer_stream_brings_each_layer_from_the_source_and_frees_it(source):
    stage = _stage(source, streaming=True, quantized=False)
    stream = LayerStream(stage, source, CPU)
    try:
        for index, layer in stage.layers():
            assert all(p.is_meta for p in layer.parameters())
            stream.load(index, layer)
            prefix = f"{stage.layer_prefix(index)}."
            names = [n for n in source.weight_map if n.startswith(prefix)]
            expected = source.load(names, CPU)
            params = dict(layer.named_parameters())
            assert names and all(torch.equal(params[n.removeprefix(prefix)], t) for n, t in expected.items())
            stream.unload(layer)
            assert all(p.is_meta for p in layer.parameters())
    finally:
        stream.close()
    assert stream.wait_seconds >= 0
