"""Recipes beyond plain NVFP4: 3 ranks give modelopt's single-process tensors for every recipe that
calibrates on CPU, with FP8 KV-cache scales; both layouts; verify and evaluate read every scheme."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from helpers import REPO, load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config
from test_verify import copy_checkpoint, edit_tensor
from nvfp4_pp.evaluate.decode import decode_checkpoint
from nvfp4_pp.evaluate.quality import evaluate
from nvfp4_pp.verify import verify

RECIPES = ["fp8", "w4a16_nvfp4", "mxfp4_mlp_fp8_attn"]
"""Every recipe modelopt 0.47 calibrates on CPU besides nvfp4 (test_identity.py); nvfp4_awq needs
CUDA in modelopt (benchmarks/awq_identity.py shows its identity on a GPU)."""
L0 = "model.layers.0"


@pytest.fixture(scope="session")
def recipe_outputs(smol_dir, token_file, tmp_path_factory):
    """recipe -> (modelopt's single-process reference, our 3-rank modelopt-layout output), built on demand once."""
    built: dict[str, tuple] = {}

    def build(recipe: str):
        if recipe not in built:
            work = tmp_path_factory.mktemp(recipe)
            ref = work / "reference"
            subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), "--recipe", recipe, "--kv-cache",
                            "fp8", str(smol_dir), str(token_file), str(ref)], check=True, capture_output=True)
            built[recipe] = (ref, run_recipe(smol_dir, token_file, work, recipe, "modelopt"))
        return built[recipe]

    return build


def run_recipe(smol_dir, token_file, work, recipe: str, fmt: str):
    out = work / f"out-{fmt}"
    config = write_config(
        work / f"{fmt}.yaml", model=str(smol_dir), output=str(out), format=fmt, recipe=recipe, kv_cache="fp8",
        calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
    )
    result = run_nvfp4_pp(config, 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_identical_to_single_process_modelopt(recipe, recipe_outputs, smol_dir):
    reference, out = recipe_outputs(recipe)
    ours, theirs = load_tensors(out), load_tensors(reference)
    assert tensor_differences(ours, theirs) == []
    # KV-cache scales (amax / 448) on every layer, under modelopt's names, equal to the reference's.
    for kind in "kv":
        scales = {k: v for k, v in ours.items() if k.endswith(f".{kind}_proj.{kind}_scale")}
        assert len(scales) == 30 and all(0 < float(v) < 1 for v in scales.values())
    # The config says what modelopt's own export says about every layer.
    ref_q = read_json(reference / "hf_quant_config.json")["quantization"]
    our_q = read_json(out / "hf_quant_config.json")["quantization"]
    for key in ("quant_algo", "kv_cache_quant_algo", "quantized_layers", "group_size"):
        assert our_q.get(key) == ref_q.get(key), key
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["kv_cache_quant_algo"] == "FP8" and qc["quant_method"] == "modelopt"
    assert verify(out, smol_dir) == []
    assert verify(reference) == ["tokenizer: tokenizer_config.json and tokenizer.json (or tokenizer.model) are "
                                 "required"] + ([] if recipe == "mxfp4_mlp_fp8_attn" else [
        "quantization_config.ignore / exclude_modules: must both be present and equal (vLLM 0.10-0.11 reads "
        "exclude_modules, 0.12-0.32 ignore)"])  # modelopt's own export passes the tensor contract too


def test_mixed_recipe_layers(recipe_outputs):
    _, out = recipe_outputs("mxfp4_mlp_fp8_attn")
    tensors = load_tensors(out)
    assert tensors[f"{L0}.mlp.down_proj.weight"].dtype == torch.uint8
    assert tuple(tensors[f"{L0}.mlp.down_proj.weight_scale"].shape) == (576, 1536 // 32)
    assert tensors[f"{L0}.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    layers = read_json(out / "config.json")["quantization_config"]["quantized_layers"]
    assert layers[f"{L0}.mlp.up_proj"] == {"quant_algo": "mxfp4"} and layers[f"{L0}.self_attn.q_proj"] == {
        "quant_algo": "FP8"}
    assert len(layers) == 30 * 7


def test_verify_rejects_a_missing_k_scale(recipe_outputs, smol_dir, tmp_path):
    _, out = recipe_outputs("fp8")
    broken = copy_checkpoint(out, tmp_path / "broken")
    edit_tensor(broken, "model.layers.4.self_attn.k_proj.k_scale", None)
    assert "model.layers.4.self_attn.k_proj.k_scale: missing (the config declares an FP8 KV cache; vLLM would " \
           "use 1.0)" in verify(broken, smol_dir)


@pytest.fixture(scope="session")
def mixed_ct(recipe_outputs, smol_dir, token_file, tmp_path_factory):
    recipe_outputs("mxfp4_mlp_fp8_attn")
    return run_recipe(smol_dir, token_file, tmp_path_factory.mktemp("mixed-ct"), "mxfp4_mlp_fp8_attn",
                      "compressed-tensors")


def test_compressed_tensors_mixed_holds_modelopt_numbers(mixed_ct, recipe_outputs, smol_dir):
    """Two groups (MXFP4 MLP, FP8 attention), KV scales on the attention module; same numbers as modelopt's."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, modelopt_out = recipe_outputs("mxfp4_mlp_fp8_attn")
    ours, theirs = load_tensors(mixed_ct), load_tensors(modelopt_out)
    qc = read_json(mixed_ct / "config.json")["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "mixed-precision" and parsed.kv_cache_scheme.num_bits == 8
    formats = {g.format: g for g in parsed.config_groups.values()}
    assert set(formats) == {"mxfp4-pack-quantized", "float-quantized"}
    assert f"{L0}.mlp.down_proj" in formats["mxfp4-pack-quantized"].targets
    assert verify(mixed_ct, smol_dir) == []
    for layer in range(30):
        p = f"model.layers.{layer}"
        for kind in "kv":
            assert torch.equal(ours[f"{p}.self_attn.{kind}_scale"], theirs[f"{p}.self_attn.{kind}_proj.{kind}_scale"])
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = f"{p}.self_attn.{proj}"
            assert torch.equal(ours[f"{m}.weight"].view(torch.uint8), theirs[f"{m}.weight"].view(torch.uint8))
            for s in ("weight_scale", "input_scale"):
                assert ours[f"{m}.{s}"].shape == (1,) and ours[f"{m}.{s}"] == theirs[f"{m}.{s}"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            m = f"{p}.mlp.{proj}"
            assert torch.equal(ours[f"{m}.weight_packed"], theirs[f"{m}.weight"])
            assert torch.equal(ours[f"{m}.weight_scale"], theirs[f"{m}.weight_scale"])
    # compressed-tensors' own MXFP4 decompressor and our decoder read the same weights.
    decoded, _ = decode_checkpoint(mixed_ct)
    scheme = formats["mxfp4-pack-quantized"]
    for m in (f"{L0}.mlp.gate_proj", "model.layers.29.mlp.down_proj"):
        state = {k: ours[f"{m}.{k}"] for k in ("weight_packed", "weight_scale")}
        theirs_w = MXFP4PackedCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(decoded[m].weight.to(theirs_w.dtype), theirs_w), m


def test_evaluate_decodes_every_scheme(recipe_outputs, mixed_ct, smol_dir, eval_ids):
    for out in (recipe_outputs("fp8")[1], mixed_ct):
        results = evaluate(smol_dir, out, eval_ids[:2], "cpu")
        for name in ("w4a16", "w4a4"):
            assert math.isfinite(results[name]["perplexity"]) and 0 < results[name]["kl"] < 2, results
