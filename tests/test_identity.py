"""The core promise: N ranks under torchrun give exactly modelopt's single-process checkpoint."""

from __future__ import annotations

import pytest

from helpers import load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config

SPLITS = [
    pytest.param(1, "auto", id="1-rank"),
    pytest.param(2, "auto", id="2-ranks"),
    pytest.param(3, "auto", id="3-ranks"),
    pytest.param(4, "auto", id="4-ranks"),
    pytest.param(3, [1, 28, 1], id="3-ranks-1-28-1"),
]


@pytest.mark.parametrize("nproc,layers", SPLITS)
def test_identical_to_single_process_modelopt(nproc, layers, smol_dir, token_file, reference, tmp_path):
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.yaml", model=str(smol_dir), output=str(out), format="modelopt",
        calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
        pipeline={"layers": layers},
    )
    result = run_nvfp4_pp(config, nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ours, theirs = load_tensors(out), load_tensors(reference)
    assert len(ours) == 902
    assert tensor_differences(ours, theirs) == []

    # Every quantized Linear carries a calibrated input scale (never the 1.0 workaround).
    input_scales = {k: v for k, v in ours.items() if k.endswith(".input_scale")}
    assert len(input_scales) == 30 * 7
    assert all(0 < float(v) < float("inf") and float(v) != 1.0 for v in input_scales.values())

    index = read_json(out / "model.safetensors.index.json")
    assert sorted(index["weight_map"]) == sorted(ours)
    assert len(set(index["weight_map"].values())) == nproc
    config_json = read_json(out / "config.json")
    source_config = read_json(smol_dir / "config.json")
    assert {k: v for k, v in config_json.items() if k != "quantization_config"} == source_config
    qc = config_json["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["ignore"] == qc["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    assert read_json(out / "hf_quant_config.json")["quantization"]["exclude_modules"] == qc["ignore"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not (out.parent / "out.nvfp4_pp-work").exists()
