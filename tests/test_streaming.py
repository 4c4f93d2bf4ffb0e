"""Streaming stages: layers brought in a window at a time give the resident run's bytes, in less memory."""

from __future__ import annotations

from helpers import load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config


def test_streaming_stages_give_the_resident_bytes_with_a_lower_peak(smol_dir, token_file, reference, tmp_path):
    """SmolLM2 on 3 ranks, every stage streaming (layer-major, stages in turn) vs every stage resident
    (pipelined): the same tensors, equal to modelopt's single-process export, and a lower measured peak
    on every rank."""
    outputs, logs = {}, {}
    for stream in ("never", "always"):
        out = tmp_path / stream
        config = write_config(
            tmp_path / f"{stream}.yaml", model=str(smol_dir), output=str(out), format="modelopt",
            calibration={"dataset": str(token_file), "samples": 16, "max_length": 128, "batch_size": 1},
            pipeline={"stream": stream},
        )
        result = run_nvfp4_pp(config, 3)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outputs[stream], logs[stream] = out, result.stdout
    streamed, resident = load_tensors(outputs["always"]), load_tensors(outputs["never"])
    assert len(streamed) == 902
    assert tensor_differences(streamed, resident) == []
    assert tensor_differences(streamed, load_tensors(reference)) == []
    assert " streaming " in logs["always"] and "layer-major: stages calibrate in turn" in logs["always"]
    assert " streaming " not in logs["never"]
    peaks = {s: [r["measured"]["host"] for r in read_json(outputs[s] / "nvfp4_pp.json")["ranks"]] for s in outputs}
    assert all(a < b for a, b in zip(peaks["always"], peaks["never"])), peaks
