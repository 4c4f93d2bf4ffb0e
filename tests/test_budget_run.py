"""The planner on real ranks: measured budgets, --plan, per-rank limits followed, peaks as predicted.

Three CPU ranks (gloo) on SmolLM2-135M. Measured peak RSS includes the process baseline
(Python, torch, transformers, modelopt), which each rank measures at start and the plan adds.
The stated margin: measured peak RSS <= predicted peak + MARGIN_GB.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import REPO, load_tensors, run_nvfp4_pp, tensor_differences, write_config

MARGIN_GB = 0.05
PLAN_ROW = re.compile(r"\[stage 0\] (\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+(\d+)-(\d+) \((\d+)\)\s+(?:[a-z-]+\s+)?"
                      r"([\d.]+)\s+(\d+)%")
REPORT_ROW = re.compile(r"\[stage 0\] (\d+)\s+\S+\s+cpu\s+\d+-\d+ .* host ([\d.]+)/([\d.]+)")


def plan_rows(stdout: str) -> list[dict]:
    rows = [m.groups() for m in PLAN_ROW.finditer(stdout)]
    return [{"rank": int(r[0]), "device": r[2], "kind": r[3], "budget": float(r[4]), "start": int(r[5]),
             "stop": int(r[6]) + 1, "layers": int(r[7]), "peak": float(r[8])} for r in rows]


def test_plan_then_run_within_per_rank_limits(smol_dir, token_file, reference, tmp_path):
    out = tmp_path / "out"
    common = {"model": str(smol_dir), "output": str(out), "format": "modelopt",
              "calibration": {"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1}}

    # --plan: every rank measures its budget; the plan is printed and nothing is loaded or written.
    result = run_nvfp4_pp(write_config(tmp_path / "plan.yaml", **common), 3, "--plan")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = plan_rows(result.stdout)
    assert [r["rank"] for r in rows] == [0, 1, 2], result.stdout[-3000:]
    assert [(r["start"], r["stop"]) for r in rows] == [(0, 10), (10, 20), (20, 30)]
    assert all(r["device"] == "cpu" and r["kind"] == "cpu" and 0 < r["peak"] < r["budget"] for r in rows)
    assert not out.exists() and not (tmp_path / "out.nvfp4_pp-work").exists()

    # Rank 2 may use 40 MB less than its 10-layer stage needs: auto gives it fewer layers.
    limits = [rows[0]["peak"] + 1, rows[1]["peak"] + 1, round(rows[2]["peak"] - 0.04, 2)]
    config = write_config(tmp_path / "run.yaml", **common, pipeline={"layers": "auto", "memory_limit_gb": limits})
    result = run_nvfp4_pp(config, 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = plan_rows(result.stdout)
    layers = [r["layers"] for r in rows]
    assert sum(layers) == 30 and layers[2] < 10 and layers[2] < min(layers[:2]), result.stdout[-3000:]
    assert all(r["peak"] <= limit for r, limit in zip(rows, limits))

    peaks = {int(m.group(1)): (float(m.group(2)), float(m.group(3))) for m in REPORT_ROW.finditer(result.stdout)}
    assert sorted(peaks) == [0, 1, 2], result.stdout[-3000:]
    for rank, (measured, predicted) in peaks.items():
        assert measured <= predicted + MARGIN_GB, (rank, measured, predicted)
        assert measured > predicted - 0.4, (rank, measured, predicted)  # the prediction is not vacuous

    assert tensor_differences(load_tensors(out), load_tensors(reference)) == []


def test_model_that_cannot_fit_is_refused_before_loading(smol_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", model=str(smol_dir), output=str(out),
                          calibration={"samples": 2, "max_length": 64}, pipeline={"memory_limit_gb": 0.3})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "nvfp4_pp.run", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert re.search(r"nvfp4_pp: error: the model does not fit in these ranks' memory: \d+\.\d\d GB missing in all\. "
                     r"The closest split \[30\] leaves \d+\.\d\d GB missing on rank 0 \(\S+, memory: needs "
                     r"\d+\.\d\d GB, budget 0\.30 GB\)", result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "load done" not in result.stdout
    assert not out.exists() and not (tmp_path / "out.nvfp4_pp-work").exists()
