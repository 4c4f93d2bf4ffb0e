"""Recipe w4a16_int4 (modelopt's INT4_BLOCKWISE_WEIGHT_ONLY_CFG): 3 ranks give modelopt's single-process
tensors in its layout; the compressed-tensors layout holds the same codes, loads in transformers through
compressed-tensors and decodes there to exactly what our decoder reads; verify passes both.

SmolLM2's Linears are 576 wide except down_proj (1536 = 12 x 128): the others stay in BF16 there, and a
tiny Llama 128 wide covers every Linear of a layer (fused q/k/v and gate/up keep their own group scales)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import REPO, load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config
from tiny_models import _save_perturbed, write_token_file
from test_verify import copy_checkpoint, edit_quant_config, edit_tensor
from nvfp4_pp.algorithms.table import RECIPES
from nvfp4_pp.checkpoint.decoders.decode import decode_checkpoint
from nvfp4_pp.publish.serving import checkpoint_facts
from nvfp4_pp.checkpoint.decoders.int4 import codes_from_row_pairs
from nvfp4_pp.evaluate.quality import evaluate, perplexity
from nvfp4_pp.run import main
from nvfp4_pp.publish.run_record import read_run_record
from nvfp4_pp.checkpoint.verify import verify

IGNORE = ["*self_attn*", "*gate_proj", "*up_proj"]
DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(30)]


@pytest.fixture(scope="module")
def int4(smol_dir, token_file, tmp_path_factory):
    """(modelopt's single-process reference, our 3-rank modelopt layout, our 3-rank compressed-tensors layout)."""
    work = tmp_path_factory.mktemp("int4")
    ref = work / "reference"
    subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), "--recipe", "w4a16_int4", "--ignore",
                    ",".join(IGNORE), str(smol_dir), str(token_file), str(ref)], check=True, capture_output=True)
    outs = []
    for fmt in ("modelopt", "compressed-tensors"):
        out = work / f"out-{fmt}"
        config = write_config(
            work / f"{fmt}.yaml", model=str(smol_dir), output=str(out), format=fmt, recipe="w4a16_int4",
            ignore=IGNORE, calibration={"dataset": str(token_file), "samples": 4, "max_length": 128, "batch_size": 1},
            serving={"target": "tensorrt-llm" if fmt == "modelopt" else "vllm"})
        result = run_nvfp4_pp(config, 3)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        outs.append(out)
    return ref, *outs


def test_modelopt_layout_identical_to_single_process_modelopt(int4, smol_dir):
    reference, out, _ = int4
    ours, theirs = load_tensors(out), load_tensors(reference)
    assert tensor_differences(ours, theirs) == []
    w, s = ours[f"{DOWN[0]}.weight"], ours[f"{DOWN[0]}.weight_scale"]
    assert (w.dtype, tuple(w.shape), s.dtype, tuple(s.shape)) == (torch.uint8, (288, 1536), torch.float32, (576, 12))
    ref_q = read_json(reference / "hf_quant_config.json")["quantization"]
    our_q = read_json(out / "hf_quant_config.json")["quantization"]
    for key in ("quant_algo", "group_size", "has_zero_point", "pre_quant_scale"):
        assert our_q[key] == ref_q[key], key
    qc = read_json(out / "config.json")["quantization_config"]
    assert (qc["quant_algo"], qc["group_size"]) == ("W4A16_AWQ", 128)
    assert list(checkpoint_facts(out).schemes) == list(RECIPES["w4a16_int4"].schemes)
    assert verify(out, smol_dir) == []  # written for tensorrt-llm (its nvfp4_pp.json says so)
    assert verify(out, smol_dir, target="vllm") == [
        "quantization_config: not vLLM-loadable, vLLM 0.34.0 refuses it (its ModelOpt loader takes quant_algo FP8, "
        "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8, MIXED_PRECISION, not W4A16_AWQ); write the "
        "layout it loads, or name the reader in the run's serving.target"]
    errors = {n: s.weight_error for n, s in read_run_record(out).linears.items()}
    assert sorted(errors) == sorted(DOWN) and all(0.05 < e < 0.2 for e in errors.values()), errors  # decoded at export
    card = (out / "README.md").read_text()
    assert "vLLM 0.34.0 does not load this checkpoint (its ModelOpt loader takes quant_algo" in card
    assert "TensorRT-LLM and SGLang" in card and "vllm serve" not in card


@pytest.mark.whole
def test_every_linear_of_a_128_wide_model_identical_to_single_process_modelopt(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    config.architectures = ["LlamaForCausalLM"]
    model_dir = tmp_path / "llama-128"
    _save_perturbed(LlamaForCausalLM(config), model_dir, config.vocab_size)
    tokens = write_token_file(tmp_path / "tokens.jsonl")
    ref, out = tmp_path / "reference", tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), "--recipe", "w4a16_int4", str(model_dir),
                    str(tokens), str(ref)], check=True, capture_output=True)
    run = write_config(tmp_path / "run.yaml", model=str(model_dir), output=str(out), format="modelopt",
                       recipe="w4a16_int4", calibration={"dataset": str(tokens), "samples": 4, "batch_size": 1},
                       serving={"target": "none"})
    result = run_nvfp4_pp(run, 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours = load_tensors(out)
    assert tensor_differences(ours, load_tensors(ref)) == []
    assert len([n for n in ours if n.endswith(".weight_scale")]) == 3 * 7
    assert verify(out, model_dir) == []


def test_compressed_tensors_holds_modelopt_codes(int4, smol_dir, eval_ids):
    """Same codes (repacked by compressed-tensors' pack_to_int32), modelopt's scales rounded once to BF16,
    decoded by compressed-tensors' own decompressor exactly as by ours; transformers loads it with the
    perplexity `evaluate` reports, and `evaluate`'s decoder reads the modelopt layout too."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, modelopt_out, ct_out = int4
    assert verify(ct_out, smol_dir) == []
    card = (ct_out / "README.md").read_text()
    assert "INT4 weight-only (W4A16, group 128)" in card and "no loader" not in card and "--quantization" not in card
    qc = read_json(ct_out / "config.json")["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized"
    (group,) = parsed.config_groups.values()
    assert group.weights == PRESET_SCHEMES["W4A16"]["weights"] and group.input_activations is None
    ours, theirs = load_tensors(ct_out), load_tensors(modelopt_out)
    decoded, _ = decode_checkpoint(ct_out)
    model = AutoModelForCausalLM.from_pretrained(
        ct_out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True))
    for m in DOWN:
        packed, scale = ours[f"{m}.weight_packed"], ours[f"{m}.weight_scale"]
        assert (packed.dtype, tuple(packed.shape), scale.dtype) == (torch.int32, (576, 192), torch.bfloat16)
        assert ours[f"{m}.weight_shape"].tolist() == [576, 1536]
        assert torch.equal(scale, theirs[f"{m}.weight_scale"].to(torch.bfloat16))
        state = {k: ours[f"{m}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        theirs_w = PackedQuantizationCompressor.decompress(state, group)["weight"]
        assert torch.equal(decoded[m].weight.to(theirs_w.dtype), theirs_w), m
        codes = codes_from_row_pairs(theirs[f"{m}.weight"]).float()  # modelopt's codes, with the BF16 scales
        assert torch.equal(decoded[m].weight, codes * scale.float().repeat_interleave(128, dim=1)), m
        loaded = model.get_submodule(m).weight
        assert torch.equal(loaded, decoded[m].weight.to(torch.bfloat16)), m
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ct_ppl = evaluate(smol_dir, ct_out, eval_ids[:1], "cpu")["w4a16"]["perplexity"]
    assert perplexity(model.eval(), eval_ids[:1]) == pytest.approx(ct_ppl, rel=1e-6)
    # `evaluate` decodes the modelopt layout too: the same codes with modelopt's FP32 scales.
    decoded_mo, _ = decode_checkpoint(modelopt_out)
    for m in DOWN:
        codes = codes_from_row_pairs(theirs[f"{m}.weight"]).float()
        assert torch.equal(decoded_mo[m].weight, codes * theirs[f"{m}.weight_scale"].repeat_interleave(128, dim=1))


def test_verify_rejects_missing_weight_shape_and_wrong_group(int4, smol_dir, tmp_path):
    _, _, ct_out = int4
    broken = copy_checkpoint(ct_out, tmp_path / "no-shape")
    edit_tensor(broken, f"{DOWN[3]}.weight_shape", None)
    assert f"{DOWN[3]}.weight_shape: missing (every int4_awq Linear needs it)" in verify(broken, smol_dir)
    regrouped = copy_checkpoint(ct_out, tmp_path / "group-64")
    qc = read_json(regrouped / "config.json")["quantization_config"]
    qc["config_groups"]["group_0"]["weights"]["group_size"] = 64
    edit_quant_config(regrouped, "config_groups", qc["config_groups"])
    assert any("match none of the schemes" in p for p in verify(regrouped, smol_dir))


def test_widths_not_a_multiple_of_128_refused_before_loading(smol_dir, tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", model=str(smol_dir), output=str(tmp_path / "out"),
                          recipe="w4a16_int4", calibration={"dataset": "builtin:pydoc", "samples": 2, "max_length": 16})
    assert main([str(config)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(lines) == 1 and "input width not a multiple of the group size" in lines[0], lines
    assert "q_proj (in 576, groups of 128) x30" in lines[0] and "down_proj" not in lines[0]
