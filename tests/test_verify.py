"""verify passes good checkpoints and names the tensor or field of each deliberately broken one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_nvfp4_pp, write_config
from nvfp4_pp.checkpoint.verify import verify
from nvfp4_pp.verify import main

INDEX = "model.safetensors.index.json"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Shards hard-linked (edits replace them, never write through), small files copied."""
    dst.mkdir()
    for f in src.iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copy)(f, dst / f.name)
    return dst


def edit_tensor(directory: Path, name: str, new: torch.Tensor | None) -> None:
    """Replace (or, with None, delete from shard and index) one tensor."""
    index = json.loads((directory / INDEX).read_text())
    file = directory / index["weight_map"][name]
    tensors = load_file(file)
    if new is None:
        del tensors[name], index["weight_map"][name]
        (directory / INDEX).write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, str(file) + ".tmp", metadata={"format": "pt"})
    os.replace(str(file) + ".tmp", file)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def edit_quant_config(directory: Path, key: str, value) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"][key] = value
    (directory / "config.json").write_text(json.dumps(config))


L = "model.layers"
BREAKAGES = {
    "missing-input-scale": (lambda d: edit_tensor(d, f"{L}.3.self_attn.k_proj.input_global_scale", None),
                            f"{L}.3.self_attn.k_proj.input_global_scale: missing"),
    "fused-scales-differ": (lambda d: edit_tensor(d, f"{L}.5.mlp.up_proj.weight_global_scale",
                                                  load_file_tensor(d, f"{L}.5.mlp.up_proj.weight_global_scale") * 2),
                            f"{L}.5.mlp.gate_up_proj.weight_global_scale: parts differ"),
    "nan-scale": (lambda d: edit_tensor(d, f"{L}.7.self_attn.o_proj.weight_global_scale", torch.tensor([float("nan")])),
                  f"{L}.7.self_attn.o_proj.weight_global_scale: [nan] is not a finite positive scale"),
    "bad-block-scales": (lambda d: edit_tensor(d, f"{L}.2.mlp.gate_proj.weight_scale",
                                               with_bytes(load_file_tensor(d, f"{L}.2.mlp.gate_proj.weight_scale"),
                                                          [0x7F, 0xFF, 0x00, 0xB8])),
                         f"{L}.2.mlp.gate_proj.weight_scale: 2 NaN and 2 zero or negative block scales"),
    "uncalibrated-input-scale": (lambda d: edit_tensor(d, f"{L}.9.mlp.down_proj.input_global_scale", torch.ones(1)),
                                 f"{L}.9.mlp.down_proj.input_global_scale: exactly 1.0, the uncalibrated placeholder"),
    "dropped-shard": (lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
                      "model-00002-of-00002.safetensors: named by the index but missing"),
    "num-hidden-layers": (lambda d: edit_config(d, num_hidden_layers=29),
                          "config.json num_hidden_layers: 29, the source has 30"),
    "ignored-but-quantized": (lambda d: edit_quant_config(d, "ignore", ["lm_head", f"{L}.0.mlp.down_proj"]),
                              f"{L}.0.mlp.down_proj: listed in ignore but has quantized tensors"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: in the source but missing"),
    "embedding-in-ignore": (lambda d: edit_quant_config(d, "ignore", ["lm_head", "model.embed_tokens"]),
                            "quantization_config.ignore: 'model.embed_tokens' is not a Linear"),
}


def with_bytes(t: torch.Tensor, first: list[int]) -> torch.Tensor:
    """A copy of `t` whose first raw bytes are `first` (E4M3 0x7F/0xFF: NaN, 0x00: zero, 0xB8: -1.0)."""
    out = t.clone()
    out.view(torch.uint8).view(-1)[: len(first)] = torch.tensor(first, dtype=torch.uint8)
    return out


def load_file_tensor(directory: Path, name: str) -> torch.Tensor:
    index = json.loads((directory / INDEX).read_text())
    return load_file(directory / index["weight_map"][name])[name]


def test_good_checkpoint_passes(ct_output, smol_dir, capsys):
    assert verify(ct_output, smol_dir) == []
    assert main([str(ct_output), "--source", str(smol_dir)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoint_is_named(breakage, ct_output, smol_dir, tmp_path):
    broken = copy_checkpoint(ct_output, tmp_path / "broken")
    damage, expected = BREAKAGES[breakage]
    damage(broken)
    problems = verify(broken, smol_dir)
    assert any(p.startswith(expected) for p in problems), problems
    assert verify(ct_output, smol_dir) == []  # the original is untouched


def test_layer_count_change_is_caught_without_source(ct_output, tmp_path, capsys):
    broken = copy_checkpoint(ct_output, tmp_path / "broken")
    edit_config(broken, num_hidden_layers=29)
    assert main([str(broken), "--quick"]) == 1  # the config changed: its checksum would say so first (exit 3)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{L}.29.input_layernorm.weight: not a parameter of the model config.json describes "
                             "(wrong layer count, stray or misnamed tensor) (and 29 more like it)"), out
    assert main([str(broken)]) == 3


def test_run_fails_instead_of_writing_a_checkpoint_that_fails_verification(tmp_path, monkeypatch, capsys):
    """A real run whose assembled checkpoint gets a problem from verify exits 1 and writes no output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import nvfp4_pp.run as run_module
    import nvfp4_pp.driver.runner as runner_module
    from tiny_models import write_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    source = tmp_path / "tiny"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(source)
    write_tiny_tokenizer(source, config.vocab_size)
    tokens = tmp_path / "t.jsonl"
    tokens.write_text("".join(json.dumps({"input_ids": list(range(i, i + 16))}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    run_config = write_config(tmp_path / "run.yaml", model=str(source), output=str(out),
                              calibration={"dataset": str(tokens), "samples": 2, "max_length": 16})
    real_verify = runner_module.verify
    assert real_verify(source) != []  # a BF16 source is not a quantized checkpoint: verify says so
    monkeypatch.setattr(runner_module, "verify",
                        lambda d, s, target: real_verify(d, s, target) + ["model.norm.weight: planted problem"])
    assert run_module.main([str(run_config)]) == 2  # rerunning cannot help: a bug to report
    err = capsys.readouterr().err
    assert "fails verification (1 problems)" in err and "model.norm.weight: planted problem" in err, err[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def flip_bytes(path: Path, offset_from_end: int, count: int, mask: int = 0xFF) -> None:
    """Flip `count` bytes (each XOR `mask`) inside a shard's data, `offset_from_end` bytes before its end."""
    data = bytearray(path.read_bytes())
    start = len(data) - offset_from_end
    for i in range(start, start + count):
        data[i] ^= mask
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("count, mask", [(64, 0xFF), (1, 0x01)])
def test_corrupted_copy_is_caught_by_its_checksums(ct_output, tmp_path, capsys, count, mask):
    """Flipped bytes in packed weights still load (the contract cannot see them): the record's sha256 can.
    Exit 3, one line naming the shard; --quick skips the checksums and finds nothing."""
    broken = tmp_path / "copy"
    shutil.copytree(ct_output, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    flip_bytes(shard, 4096, count, mask)
    assert main([str(broken)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{shard.name}: sha256 differs from the one the run recorded in nvfp4_pp.json (a corrupted copy: "
                   "copy it again from the original)",
                   f"{broken}: 1 file(s) differ from what the run wrote: a corrupted or incomplete copy"]
    assert main([str(broken), "--quick"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{broken}: OK"


def test_one_root_cause_is_one_line(ct_output, tmp_path, capsys):
    """A deleted shard: its own line (hundreds of tensors in it are not listed one by one); a wrong group
    size in the config: one line per kind of tensor it breaks, with how many more show it."""
    dropped = copy_checkpoint(ct_output, tmp_path / "dropped")
    (dropped / "model-00002-of-00002.safetensors").unlink()
    assert main([str(dropped)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("model-00002-of-00002.safetensors: listed in nvfp4_pp.json but missing (an incomplete copy)")
    assert out[1].startswith("model-00002-of-00002.safetensors: named by the index but missing (")
    assert len(out) == 3, out

    regrouped = copy_checkpoint(ct_output, tmp_path / "regrouped")
    config = json.loads((regrouped / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["group_size"] = 32
    (regrouped / "config.json").write_text(json.dumps(config))
    assert main([str(regrouped), "--quick"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("quantization_config.config_groups.group_0: weights {") and "'group_size': 32" in out[0]
    assert out[1:] == ["note: --quick: file checksums not checked", f"{regrouped}: 1 problem(s)"], out
