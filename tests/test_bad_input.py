"""Bad input: each case gets one clear line naming the problem and the fix (the README table's rows)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import run_nvfp4_pp, write_config
from nvfp4_pp.run import main
from tiny_models import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (no tokenizer): enough for every error raised before weights load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny") / "llama"
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=32)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    write_tiny_tokenizer(path, config.vocab_size)
    return path


def _run(tmp_path: Path, capsys, model: Path, *args: str, **overrides) -> tuple[int, str]:
    sections = {"model": str(model), "output": str(tmp_path / "out"), "format": "modelopt",
                "calibration": {"dataset": "builtin:pydoc", "samples": 2, "max_length": 16}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            sections.setdefault(section, {})[name] = value
        else:
            sections[section] = value
    config = write_config(tmp_path / "run.yaml", **sections)
    code = main([str(config), *args])
    err = capsys.readouterr().err
    return code, err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(lines) == 1, err
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_model_dir_missing(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, tmp_path / "nowhere")
    assert code == 2
    assert f"model directory '{tmp_path / 'nowhere'}' does not exist; check config key 'model'" in _one_error(err)


def test_config_json_missing(tmp_path, capsys, tiny_llama):
    model = _copy(tiny_llama, tmp_path / "m")
    (model / "config.json").unlink()
    code, err = _run(tmp_path, capsys, model)
    assert code == 2 and "config.json is missing; 'model' must be a Hugging Face checkpoint directory" in _one_error(err)


def test_config_without_num_hidden_layers(tmp_path, capsys, tiny_llama):
    model = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    del config["num_hidden_layers"]
    (model / "config.json").write_text(json.dumps(config))
    code, err = _run(tmp_path, capsys, model)
    assert code == 2 and "has no num_hidden_layers; is it a decoder LLM's config? Restore the missing key(s)" in _one_error(err)


def test_unsupported_architecture(tmp_path, capsys, tiny_llama):
    model = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8)
    (model / "config.json").write_text(json.dumps(config))
    code, err = _run(tmp_path, capsys, model)
    line = _one_error(err)
    assert code == 2
    assert "architecture ['MixtralForCausalLM'] is not supported (a mixture-of-experts model)" in line
    assert "LlamaForCausalLM" in line


def test_index_names_missing_shard(tmp_path, capsys, tiny_llama):
    model = _copy(tiny_llama, tmp_path / "m")
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, err = _run(tmp_path, capsys, model)
    assert code == 2 and "names shard 'model-00002-of-00002.safetensors', which is missing" in _one_error(err)


@pytest.mark.parametrize("damage,message", [
    ("truncate", "is truncated: its header promises"),
    ("garbage", "is not a safetensors file"),
])
def test_damaged_safetensors(tmp_path, capsys, tiny_llama, damage, message):
    model = _copy(tiny_llama, tmp_path / "m")
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    code, err = _run(tmp_path, capsys, model)
    line = _one_error(err)
    assert code == 2 and message in line and "model.safetensors" in line


def test_layer_counts_do_not_sum(tmp_path, capsys, tiny_llama):
    code, err = _run(tmp_path, capsys, tiny_llama, pipeline__layers=[3])
    assert code == 2
    assert "pipeline.layers = [3] sums to 3 but the model has 2 decoder layers; make the counts sum to 2" in _one_error(err)


def test_rank_with_zero_layers(tmp_path, capsys, tiny_llama):
    code, err = _run(tmp_path, capsys, tiny_llama, pipeline__layers=[2, 0])
    assert code == 2 and "every rank needs at least one layer" in _one_error(err)


@pytest.mark.whole
def test_more_ranks_than_layers_one_line(tmp_path, tiny_llama):
    config = write_config(tmp_path / "run.yaml", model=str(tiny_llama), output=str(tmp_path / "out"))
    result = run_nvfp4_pp(config, 3)
    assert result.returncode != 0
    assert _one_error(result.stderr) == (
        "nvfp4_pp: error: 3 ranks but the model has only 2 decoder layers; use at most 2 ranks")


def test_source_without_tokenizer(tmp_path, capsys, tiny_llama):
    model = _copy(tiny_llama, tmp_path / "m")
    (model / "tokenizer.json").unlink()
    code, err = _run(tmp_path, capsys, model)
    assert code == 2
    assert "has no tokenizer (tokenizer_config.json and tokenizer.json or tokenizer.model)" in _one_error(err)


def test_output_exists_without_overwrite(tmp_path, capsys, tiny_llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "nvfp4_pp.json").write_text('{"producer": {"name": "nvfp4_pp"}, "files": {}}')  # an earlier run's
    code, err = _run(tmp_path, capsys, tiny_llama)
    assert code == 2
    assert f"output {tmp_path / 'out'} already holds an nvfp4_pp checkpoint; pass --overwrite" in _one_error(err)


@pytest.mark.parametrize("content,message", [
    ("", "holds no samples"),
    ("{\"input_ids\": [1, 2\n", "calib.jsonl:1 is not valid JSON"),
])
def test_bad_calibration_file(tmp_path, capsys, tiny_llama, content, message):
    (tmp_path / "calib.jsonl").write_text(content)
    code, err = _run(tmp_path, capsys, tiny_llama, calibration__dataset=str(tmp_path / "calib.jsonl"))
    assert code == 2 and message in _one_error(err)


def test_samples_longer_than_max_position_embeddings(tmp_path, capsys, tiny_llama):
    (tmp_path / "calib.jsonl").write_text(json.dumps({"input_ids": list(range(40))}) + "\n")
    code, err = _run(tmp_path, capsys, tiny_llama, calibration__dataset=str(tmp_path / "calib.jsonl"),
                     calibration__max_length=64, calibration__samples=1)
    assert code == 2
    assert ("a calibration sample has 40 tokens but the model's max_position_embeddings is 32; "
            "set calibration.max_length <= 32") in _one_error(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_device(tmp_path, capsys, tiny_llama):
    code, err = _run(tmp_path, capsys, tiny_llama, pipeline__device="cuda")
    assert code == 2
    assert (f"pipeline.device is 'cuda' but rank 0 on host {socket.gethostname()} sees no CUDA device; "
            "set pipeline.device: cpu") in _one_error(err)


def test_too_little_disk_is_found_before_loading(tmp_path, capsys, smol_dir, token_file):
    """The plan's predicted shard bytes against the work directory's free space: one line, before any weight
    is loaded or calibrated, nothing written."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        config = write_config(tmp_path / "run.yaml", model=str(smol_dir), output=str(disk / "out"),
                              format="modelopt", calibration={"dataset": str(token_file), "samples": 1})
        code = main([str(config)])
        err = capsys.readouterr().err
        line = _one_error(err)
        assert code == 2 and line.startswith(f"nvfp4_pp: error: the work directory {disk / 'out.nvfp4_pp-work'} "
                                             "(this rank's shards and the copies it gathers) needs about 0.1"), line
        assert line.endswith("free space there, or set gather.work_dir on a larger disk")
        assert "load done" not in err and not (disk / "out").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_cuda_only_algorithm_on_a_cpu_rank(tmp_path, capsys, tiny_llama):
    code, err = _run(tmp_path, capsys, tiny_llama, recipe="nvfp4", algorithm="gptq")
    assert code == 2
    assert _one_error(err).endswith(
        f"rank 0 on host {socket.gethostname()} calibrates on cpu, but algorithm gptq with recipe nvfp4 (NVFP4 gptq) "
        "runs on CUDA only in modelopt 0.47; give every rank a CUDA device (pipeline.device) or choose recipe "
        "w4a16_int4 or 'algorithm: max'")
    assert not (tmp_path / "out").exists()


def _edit_weight(model: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = edit(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_nan_in_a_source_weight_is_named_before_calibrating(tmp_path, capsys, tiny_llama):
    """Not a network fault and not "rerun to resume": the tensor named, exit 2, nothing written."""
    model = _copy(tiny_llama, tmp_path / "m")

    def poison(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[3, 5], t[0, 0] = float("nan"), float("inf")
        return t

    _edit_weight(model, "model.layers.1.mlp.up_proj.weight", poison)
    code, err = _run(tmp_path, capsys, model)
    assert code == 2
    assert _one_error(err) == (f"nvfp4_pp: error: source tensor 'model.layers.1.mlp.up_proj.weight' in "
                               f"{model / 'model.safetensors'} holds 1 NaN and 1 infinite values; the checkpoint is "
                               "damaged: download it again or repair that tensor")
    assert "calibration:" not in err and not (tmp_path / "out").exists()


@pytest.mark.whole
def test_an_unexpected_error_is_one_line_with_its_traceback_kept(tmp_path, tiny_llama):
    """Input nothing checks yet (a weight of the wrong shape on rank 1): under the launcher, one line from the
    rank that failed, naming the exception and the log that keeps its traceback; rank 0 does not blame the
    network, nobody advises a rerun."""
    import os
    import sys

    from helpers import REPO

    model = _copy(tiny_llama, tmp_path / "m")
    _edit_weight(model, "model.layers.1.mlp.up_proj.weight", lambda t: t[:, :32].contiguous())
    config = write_config(tmp_path / "run.yaml", model=str(model), output=str(tmp_path / "out"),
                          calibration={"dataset": "builtin:pydoc", "samples": 2, "max_length": 16})
    cmd = [sys.executable, "-m", "nvfp4_pp.launch", "--standalone", "--nproc-per-node=2", "-m", "nvfp4_pp.run",
           str(config)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1].startswith(errors[0]), result.stderr[-3000:]
    line = errors[0]
    assert line.startswith("nvfp4_pp: error (rank 1): unexpected RuntimeError: ") and "(please report it)" in line
    assert "rerun" not in line and "lost rank" not in result.stderr and "Traceback" not in result.stderr
    log = Path(line.split("; the traceback is in ")[1].split(" (please report it)")[0])
    assert "Traceback (most recent call last)" in log.read_text()
