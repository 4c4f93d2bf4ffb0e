"""`python -m nvfp4_pp.launch` (what `make demo` and the seed-model targets run): config and argument errors
in one line before any rank starts, a failed run ending with its own line, signals without tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from helpers import REPO, write_config
from nvfp4_pp.launch import failure_lines

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nvfp4_pp.launch", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _tree(directory: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in directory.rglob("*")}


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "frame #" not in text and "SignalException" not in text, text[-3000:]


CONFIG_ERRORS = [
    ({"calibration": {"sample": 32}}, [],
     "nvfp4_pp: error: unknown config key 'calibration.sample'; valid keys in section 'calibration' are"),
    ({"calibratoin": {"samples": 32}}, [], "nvfp4_pp: error: unknown config key 'calibratoin'; valid keys in the top"),
    ({"calibration": {"samples": "abc"}}, [],
     "nvfp4_pp: error: config key 'calibration.samples' must be an integer or one of 'all', got 'abc'"),
    ({}, ["--set", "calibration.nope=1"], "nvfp4_pp: error: unknown config key 'calibration.nope'"),
    ({}, ["--set", "samples"], "nvfp4_pp: error: --set 'samples': expected KEY=VALUE"),
    ({"output": "$NVFP4_PP_TEST_UNSET/out"}, [], "nvfp4_pp: error: config key 'output' = '$NVFP4_PP_TEST_UNSET/out' "
     "uses $NVFP4_PP_TEST_UNSET, which is not set"),
    ({}, ["--sett", "x"], "nvfp4_pp: error: unrecognized arguments: --sett x (python -m nvfp4_pp.run --help"),
    (None, [], "nvfp4_pp: error: config file '{config}' is not valid YAML at line 3, column 1:"),
]


@pytest.mark.parametrize("sections, args, first", CONFIG_ERRORS)
def test_config_errors_are_one_line_before_any_rank_starts(tmp_path, smol_dir, sections, args, first):
    config = tmp_path / "run.yaml"
    if sections is None:
        config.write_text(f"model: {smol_dir}\ncalibration: [1,\n")
    else:
        write_config(config, **{"model": str(smol_dir), "output": str(tmp_path / "out"), **sections})
    before = _tree(tmp_path)
    result = _launch("-m", "nvfp4_pp.run", str(config), *args, timeout=60)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(first.format(config=config)), lines[0]
    assert not result.stdout and _tree(tmp_path) == before


def test_launcher_argument_error_is_one_line():
    cmd = [sys.executable, "-m", "nvfp4_pp.launch", "--nproc-per-node", "two", "-m", "nvfp4_pp.run", "x.yaml"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["nvfp4_pp: error: argument --nproc-per-node/--nproc_per_node: invalid "
                                          "str value: 'two' (python -m nvfp4_pp.launch --help lists torchrun's "
                                          "options)"] or len(result.stderr.splitlines()) == 1, result.stderr


def test_a_rank_error_ends_the_run_in_its_own_line(tmp_path, smol_dir):
    """Found by rank 0 after the ranks started (a foreign output): the line once, exit 2, nothing touched."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a checkpoint")
    config = write_config(tmp_path / "run.yaml", model=str(smol_dir), output=str(tmp_path / "out"),
                          calibration={"samples": 2, "max_length": 16})
    before = _tree(tmp_path)
    result = _launch("-m", "nvfp4_pp.run", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"nvfp4_pp: error: output {tmp_path / 'out'} is a non-empty directory that nvfp4_pp did not write: it "
        "holds notes.txt, and no nvfp4_pp.json; nvfp4_pp replaces only its own checkpoints or an empty directory: "
        "choose another 'output' (or move those files away)"]
    assert _tree(tmp_path) == before


def _failure(tmp_path: Path, local_rank: int, exitcode: int, message: str | None) -> ProcessFailure:
    """torch's own failure record (whatever fields this torch version gives it), as torchrun makes it."""
    error_file = tmp_path / f"error{local_rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    return ProcessFailure(local_rank=local_rank, pid=1000 + local_rank, exitcode=exitcode, error_file=str(error_file))


def test_failure_lines_from_torchs_record(tmp_path):
    """The root cause is kept, the ranks torchrun stopped because of it are left out; a rank that died
    without a line is named by its signal; the exit status says whether to fix the input or rerun."""
    own = "nvfp4_pp: error (rank 1): source tensor x is NaN"
    stopped = ("nvfp4_pp: error (rank 0): interrupted by SIGTERM during calibrate; rerun the same command to "
               "resume from the beginning (no phase was finished)")
    lines, code = failure_lines({0: _failure(tmp_path, 0, 1, stopped), 1: _failure(tmp_path, 1, 2, own)}, None)
    assert (lines, code) == ([own], 2)
    # every rank words a shared error alike; one may have been killed by torchrun's SIGTERM while leaving
    lines, code = failure_lines({0: _failure(tmp_path, 0, 2, own), 1: _failure(tmp_path, 1, -15, own)}, None)
    assert (lines, code) == ([own], 2)
    lines, code = failure_lines({0: _failure(tmp_path, 0, 1, stopped), 2: _failure(tmp_path, 2, -9, None)}, None)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("nvfp4_pp: error: rank 2 was killed by SIGKILL (from outside: the kernel's "
                               "out-of-memory killer, scancel or kill -9) before it could say why")


def _start(tmp_path: Path, smol_dir: Path, log: Path) -> subprocess.Popen:
    config = write_config(tmp_path / "run.yaml", model=str(smol_dir), output=str(tmp_path / "out"),
                          calibration={"samples": 48, "max_length": 64})
    cmd = [sys.executable, "-m", "nvfp4_pp.launch", "--standalone", "--nproc-per-node=2", "-m", "nvfp4_pp.run",
           str(config)]
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, "NVFP4_PP_LOG": "debug"}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, text: str, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} never appeared:\n{path.read_text()[-2000:]}"
        time.sleep(0.2)


def test_double_ctrl_c_ends_with_the_launchers_line_and_no_traceback(tmp_path, smol_dir):
    log = tmp_path / "screen.txt"
    launcher = _start(tmp_path, smol_dir, log)
    _wait_for(log, "calibration micro-batch 2/")
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    time.sleep(0.3)
    os.killpg(launcher.pid, signal.SIGINT)
    assert launcher.wait(timeout=120) == 1
    text = log.read_text()
    _no_traceback(text)
    assert text.splitlines()[-1].startswith("nvfp4_pp: error: the launcher was stopped by SIGINT; each rank said "
                                            "above what it saved; rerun the same command to resume"), text[-2000:]
    for rank in (0, 1):
        assert f"nvfp4_pp: error (rank {rank}): interrupted by SIGINT during calibrate" in text
    assert not (tmp_path / "out").exists()


def test_a_killed_rank_is_named_with_its_signal(tmp_path, smol_dir):
    import psutil

    log = tmp_path / "screen.txt"
    launcher = _start(tmp_path, smol_dir, log)
    _wait_for(log, "calibration micro-batch 2/")
    ranks = psutil.Process(launcher.pid).children()
    victim = next(r for r in ranks if "RANK=1" in " ".join(f"{k}={v}" for k, v in r.environ().items()))
    victim.kill()
    assert launcher.wait(timeout=120) == 1
    text = log.read_text()
    _no_traceback(text)
    last = text.splitlines()[-1]
    assert last.startswith("nvfp4_pp: error: rank 1 was killed by SIGKILL (from outside: the kernel's out-of-memory "
                           f"killer, scancel or kill -9) before it could say why; its log is in {tmp_path}"), last
    assert "interrupted by SIGTERM" not in last
