"""Recipes beyond plain NVFP4: 3 ranks give modelopt's single-process tensors for every recipe that
calibrates on CPU, with FP8 KV-cache scales; both layouts; verify and evaluate read every scheme; every
written config either passes vLLM 0.34's pinned loader tables (and the card's serve command carries the
method they name) or was written for another reader (`serving.target`), the card naming it."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from helpers import REPO, load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config
from test_verify import copy_checkpoint, edit_tensor
from reference import preset_config
from nvfp4_pp.algorithms.table import RECIPES as ALL_RECIPES
from nvfp4_pp.calibration.calibrate import modelopt_config
from nvfp4_pp.checkpoint.decoders.decode import decode_checkpoint
from nvfp4_pp.evaluate.quality import evaluate
from nvfp4_pp.publish.serving import OTHER_READERS, checkpoint_facts
from nvfp4_pp.checkpoint.verify import verify
from nvfp4_pp.vllm_contract import vllm_method, vllm_problems

RECIPES = ["fp8", "w4a16_nvfp4", "mxfp4", "mxfp4_mlp_fp8_attn"]
"""Every recipe modelopt 0.47 calibrates on CPU besides nvfp4 (test_identity.py) and w4a16_int4
(test_int4.py); nvfp4_awq needs CUDA in modelopt (benchmarks/awq_identity.py shows its identity on a GPU)."""
KV_CACHE = {"mxfp4": None}
"""Pure MXFP4 runs without a KV cache: its config then has no calibration algorithm and modelopt runs no
pass (with FP8 K/V scales it would calibrate them). Every other recipe calibrates FP8 K/V scales."""
VLLM_REFUSES_MODELOPT = ("mxfp4", "mxfp4_mlp_fp8_attn")
"""Recipes whose modelopt layout vLLM 0.34 does not load: written with `serving.target: tensorrt-llm`."""
L0 = "model.layers.0"


@pytest.fixture(scope="session")
def recipe_outputs(smol_dir, token_file, tmp_path_factory):
    """recipe -> (modelopt's single-process reference, our 3-rank modelopt-layout output), built on demand once."""
    built: dict[str, tuple] = {}

    def build(recipe: str):
        if recipe not in built:
            work = tmp_path_factory.mktemp(recipe)
            ref = work / "reference"
            kv = ["--kv-cache", KV_CACHE.get(recipe, "fp8")] if KV_CACHE.get(recipe, "fp8") else []
            subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), "--recipe", recipe, *kv,
                            str(smol_dir), str(token_file), str(ref)], check=True, capture_output=True)
            built[recipe] = (ref, run_recipe(smol_dir, token_file, work, recipe, "modelopt"))
        return built[recipe]

    return build


def run_recipe(smol_dir, token_file, work, recipe: str, fmt: str):
    out = work / f"out-{fmt}"
    reader = "tensorrt-llm" if fmt == "modelopt" and recipe in VLLM_REFUSES_MODELOPT else "vllm"
    config = write_config(
        work / f"{fmt}.yaml", model=str(smol_dir), output=str(out), format=fmt, recipe=recipe,
        kv_cache=KV_CACHE.get(recipe, "fp8"), serving={"target": reader},
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
    kv = KV_CACHE.get(recipe, "fp8")
    # KV-cache scales (amax / 448) on every layer, under modelopt's names, equal to the reference's.
    for kind in "kv":
        scales = {k: v for k, v in ours.items() if k.endswith(f".{kind}_proj.{kind}_scale")}
        assert len(scales) == (30 if kv else 0) and all(0 < float(v) < 1 for v in scales.values())
    # The config says what modelopt's own export says about every layer.
    ref_q = read_json(reference / "hf_quant_config.json")["quantization"]
    our_q = read_json(out / "hf_quant_config.json")["quantization"]
    for key in ("quant_algo", "kv_cache_quant_algo", "quantized_layers", "group_size"):
        assert our_q.get(key) == ref_q.get(key), key
    qc = read_json(out / "config.json")["quantization_config"]
    assert qc["kv_cache_quant_algo"] == ("FP8" if kv else None) and qc["quant_method"] == "modelopt"
    assert list(checkpoint_facts(out).schemes) == sorted(ALL_RECIPES[recipe].schemes)
    assert verify(out, smol_dir) == []  # for the reader its serving.target names
    assert_serving_follows_vllm_tables(out, refused=recipe in VLLM_REFUSES_MODELOPT)
    assert verify(reference, target="none") == ["tokenizer: tokenizer_config.json and tokenizer.json (or tokenizer.model) are "
                                 "required"] + ([] if recipe == "mxfp4_mlp_fp8_attn" else [
        "quantization_config.ignore / exclude_modules: must both be present and equal (vLLM 0.10-0.11 reads "
        "exclude_modules, 0.12-0.32 ignore)"])  # modelopt's own export passes the tensor contract too


def assert_serving_follows_vllm_tables(out, refused: bool) -> None:
    """The written config against vLLM 0.34's pinned tables: loadable, with the card's every serve command
    naming the method they give it, or refused, with the card naming the readers and no vLLM command."""
    qc = read_json(out / "config.json")["quantization_config"]
    card = (out / "README.md").read_text()
    serve = [line for line in card.splitlines() if line.startswith("vllm serve ")]
    if refused:
        assert vllm_problems(qc) and not serve and OTHER_READERS[qc["quant_method"]] in card
        problems = verify(out, target="vllm")
        assert len(problems) == 1 and problems[0].startswith("quantization_config: not vLLM-loadable, vLLM 0.34.0 "
                                                             "refuses it"), problems
    else:
        assert vllm_problems(qc) == [] and len(serve) == 3
        method = vllm_method(qc)
        assert all((f"--quantization {method}" in line) == (method is not None) for line in serve), serve


def _without_sync(cfg: dict) -> dict:
    algorithm = cfg["algorithm"]
    if isinstance(algorithm, dict):
        algorithm = {k: v for k, v in algorithm.items() if k != "distributed_sync"}
    return {**cfg, "algorithm": algorithm}


@pytest.mark.parametrize("recipe,options", [*((r, {}) for r in ALL_RECIPES), ("mxfp4", {"kv_cache": "fp8"}),
                                            ("w4a16_int4", {"ignore": ["*self_attn*"], "algorithm": "gptq"}),
                                            ("w4a16_int4", {"algorithm": "awq_lite"}),
                                            ("nvfp4", {"algorithm": "local_hessian"}),
                                            ("w4a16_nvfp4", {"algorithm": "mse"})])
def test_modelopt_config_is_modelopts_preset(recipe, options):
    """What a run hands modelopt equals modelopt's own preset (the reference's config), apart from the
    `distributed_sync: False` every pipeline stage needs."""
    ours = modelopt_config(recipe, ignore=options.get("ignore", ()), kv_cache=options.get("kv_cache"),
                           algorithm=options.get("algorithm", "max"))
    assert _without_sync(ours) == preset_config(recipe, **options)


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


def test_compressed_tensors_mxfp4_holds_modelopt_numbers(recipe_outputs, smol_dir, token_file, tmp_path_factory):
    """Pure MXFP4 (no calibration pass at all) in the layout vLLM 0.34 loads: modelopt's codes and E8M0
    scales under compressed-tensors' names, verified, served without a --quantization flag; a streaming
    run (layers read and written a window at a time, nothing to fit) writes the same tensors."""
    _, modelopt_out = recipe_outputs("mxfp4")
    out = run_recipe(smol_dir, token_file, tmp_path_factory.mktemp("mxfp4-ct"), "mxfp4", "compressed-tensors")
    ours, theirs = load_tensors(out), load_tensors(modelopt_out)
    assert checkpoint_facts(out).schemes == ("mxfp4",) and verify(out, smol_dir) == []
    assert_serving_follows_vllm_tables(out, refused=False)
    linears = [k.removesuffix(".weight") for k, v in theirs.items() if k.endswith(".weight") and v.dtype == torch.uint8]
    assert len(linears) == 30 * 7
    for m in linears:
        assert torch.equal(ours[f"{m}.weight_packed"], theirs[f"{m}.weight"])
        assert torch.equal(ours[f"{m}.weight_scale"], theirs[f"{m}.weight_scale"])
    work = tmp_path_factory.mktemp("mxfp4-streaming")
    config = write_config(work / "run.yaml", model=str(smol_dir), output=str(work / "out"), recipe="mxfp4",
                          pipeline={"stream": "always"},
                          calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1})
    result = run_nvfp4_pp(config, 2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert tensor_differences(load_tensors(work / "out"), ours) == []


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
    assert verify(mixed_ct, smol_dir) == [] and checkpoint_facts(mixed_ct).schemes == ("fp8", "mxfp4")
    assert_serving_follows_vllm_tables(mixed_ct, refused=False)
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
