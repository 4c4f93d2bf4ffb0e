"""Quality measured from the written files, cross-checked by transformers' own compressed-tensors loader."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import read_json
from nvfp4_pp.evaluate.quality import evaluate, perplexity


@pytest.fixture(scope="module")
def results(smol_dir, ct_output, eval_ids):
    return evaluate(smol_dir, ct_output, eval_ids, "cpu")


def test_transformers_loads_output_and_agrees_with_evaluate(ct_output, eval_ids, results):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        ct_output, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    assert perplexity(model, eval_ids) == pytest.approx(results["w4a16"]["perplexity"], rel=1e-6)


def test_quality_numbers_are_sane(results):
    assert set(results) == {"bf16", "w4a16", "w4a4"}
    assert results["bf16"]["kl"] == 0
    for name in ("w4a16", "w4a4"):
        assert math.isfinite(results[name]["perplexity"]) and 0 < results[name]["kl"] < 2, results


def test_output_records_the_run(ct_output, smol_dir):
    record = read_json(ct_output / "nvfp4_pp.json")
    assert [r["layers"] for r in record["ranks"]] == [[0, 15], [15, 30]]
    assert [r["health"]["good"] for r in record["ranks"]] == [210, 210]  # weight + input quantizer per Linear
    assert all(r["health"]["zero"] == r["health"]["nan"] == 0 for r in record["ranks"])
    assert record["calibration"]["samples"] == 4 and record["verification"] == "passed"
    card = (ct_output / "README.md").read_text()
    for expected in ("# base_model left out: the source (SmolLM2-135M) names no Hub id", "compressed-tensors",
                     "rank 0 210 / 0 / 0", "| 1 |",
                     f"vllm serve {ct_output}", "4 samples, 240 tokens", "lm_head"):
        assert expected in card, expected
