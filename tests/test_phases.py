"""Phase names, unit level: one enum for the phase timer, fault messages, the timeline and
`--stop-after`; the calibrate phase's progress as a typed record in the work state."""

from __future__ import annotations

import pytest

from nvfp4_pp.runtime import dist
from nvfp4_pp.publish.charts import PHASE_COLORS
from nvfp4_pp.driver.command_line import parse_args
from nvfp4_pp.errors import EXIT_BAD_INPUT, Interrupted
from nvfp4_pp.phases import RECORDED, Phase
from nvfp4_pp.records import CalibrateProgress, LayerChoice


def test_stop_after_takes_the_recorded_phases_as_documented():
    assert [p.value for p in RECORDED] == ["calibrate", "export"]  # docs/faults.md: --stop-after calibrate|export
    for name in ("calibrate", "export"):
        assert Phase(parse_args(["run.yaml", "--stop-after", name]).stop_after) in RECORDED


def test_stop_after_another_phase_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["run.yaml", "--stop-after", "assemble"])
    assert e.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err == ("nvfp4_pp: error: argument --stop-after: invalid choice: 'assemble' (choose from 'calibrate', "
                   "'export') (python -m nvfp4_pp.run --help lists the options)\n")


def test_fault_messages_name_the_phase():
    assert dist.current_phase() == Phase.START_UP
    assert str(Interrupted("SIGINT", dist.current_phase())) == "interrupted by SIGINT during start-up"
    dist.set_phase(Phase.ASSEMBLE)
    try:
        assert str(Interrupted("SIGTERM", dist.current_phase())) == "interrupted by SIGTERM during assemble"
    finally:
        dist.set_phase(Phase.START_UP)


def test_every_timed_phase_has_a_colour():
    assert set(PHASE_COLORS) == set(Phase) - {Phase.PLANNING}  # planning is not timed as a span


def test_calibrate_progress_survives_a_restart(tmp_path):
    from nvfp4_pp.checkpoint.work_state import WorkState

    choice = LayerChoice(layer=3, chosen="gptq", errors={"max": 0.2, "gptq": 0.1, "awq_lite": None}, fitted_on=3,
                         judged_on=1)
    state = WorkState(tmp_path, {"run": 1}, fresh=False)
    assert state.calibrate_progress == CalibrateProgress()
    state.record_calibrate_progress(choices={3: choice})
    state.record_calibrate_progress(inputs_saved=True)
    again = WorkState(tmp_path, {"run": 1}, fresh=False)
    assert again.calibrate_progress == CalibrateProgress({3: choice}, inputs_saved=True)
