"""Faults: a killed rank is named within the timeout, a rerun resumes to a byte-identical checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, run_nvfp4_pp, write_config
from nvfp4_pp.records import RECORD
from nvfp4_pp.publish.charts import TIMELINE

TIMEOUT_S = 60


def _config(tmp: Path, smol_dir: Path, output: Path, samples: int = 24) -> Path:
    return write_config(
        tmp / f"run-{samples}.yaml", model=str(smol_dir), output=str(output), format="modelopt",
        calibration={"dataset": "builtin:pydoc", "samples": samples, "max_length": 64},
        pipeline={"timeout_s": TIMEOUT_S},
    )


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of the checkpoint, byte for byte (the run record, model card and its timeline picture hold
    this run's timings)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name not in (RECORD, "README.md", TIMELINE)}


@pytest.fixture(scope="module")
def uninterrupted(smol_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "out"
    result = run_nvfp4_pp(_config(tmp, smol_dir, out), 3)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_hosts(config: Path, logs: Path) -> list[subprocess.Popen]:
    """Three torchrun agents, one rank each, like three hosts (static rendezvous on loopback)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NVFP4_PP_LOG": "debug"}
    agents = []
    for node in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=1",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "nvfp4_pp.run", str(config)]
        out = open(logs / f"node{node}.log", "w")
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    return agents


def _wait_for(path: Path, text: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text()[-2000:]}")


def test_killed_rank_is_named_and_rerun_resumes(smol_dir, tmp_path, uninterrupted):
    out = tmp_path / "out"
    config = _config(tmp_path, smol_dir, out)
    agents = _start_hosts(config, tmp_path)
    try:
        _wait_for(tmp_path / "node1.log", "calibration micro-batch 3/24 done", 300)
        worker = psutil.Process(agents[1].pid).children()[0]
        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        for agent in agents:
            agent.wait(timeout=TIMEOUT_S + 60)
        elapsed = time.monotonic() - killed_at
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert elapsed < TIMEOUT_S + 30
    assert all(agent.returncode != 0 for agent in agents)
    for node in (0, 2):
        log = (tmp_path / f"node{node}.log").read_text()
        assert f"nvfp4_pp: error (rank {node}): lost rank 1 on host {socket.gethostname()} during calibrate" in log
    assert not out.exists()  # nothing under the final name

    result = run_nvfp4_pp(config, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _files(out) == _files(uninterrupted)


def test_stop_after_calibrate_resumes_and_refuses_stale_state(smol_dir, tmp_path, uninterrupted):
    out = tmp_path / "out"
    config = _config(tmp_path, smol_dir, out)
    result = run_nvfp4_pp(config, 3, "--stop-after", "calibrate")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.exists() and (tmp_path / "out.nvfp4_pp-work" / "rank2" / "quantizers.pt").is_file()

    changed = run_nvfp4_pp(_config(tmp_path, smol_dir, out, samples=20), 3)
    assert changed.returncode == 1
    assert "holds state of a different run (calibration, samples_sha256 changed); rerun with --fresh" in changed.stderr
    # Printed once; torchrun's own summary names it too (as the root cause read from its error file).
    assert sum(line.startswith("nvfp4_pp: error") for line in changed.stderr.splitlines()) == 1

    result = run_nvfp4_pp(config, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calibration: reusing the state every rank saved" in result.stdout
    assert "export: running it (it was not finished before)" in result.stdout  # what the rerun redoes
    assert _files(out) == _files(uninterrupted)
    assert not (tmp_path / "out.nvfp4_pp-work").exists()
