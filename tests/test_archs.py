"""Every supported architecture: stages compute the model's own forward, and 3 ranks give modelopt's export.

Tiny random-weight models (tests/tiny_models.py) cover what differs between architectures: rope
scaling, biases, q/k norms, sliding-window layers interleaved across stage boundaries, parallel
blocks, embedding scaling, separate local/global rope, eager-only attention.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import REPO, load_tensors, read_json, run_nvfp4_pp, tensor_differences, write_config
from tiny_models import (TINY, TINY_IMAGE_TEXT, tiny_config, write_tiny_image_text_model,
                         write_tiny_model, write_token_file)

from nvfp4_pp.model.arch import SUPPORTED, UnsupportedArchitecture, architecture_of

ARCHS = sorted(TINY)
SPLIT = [(0, 2), (2, 4), (4, 6)]
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def test_every_supported_architecture_is_tested():
    assert ARCHS == sorted(SUPPORTED)


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory):
    return write_token_file(tmp_path_factory.mktemp("tiny-data") / "tokens.jsonl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: write_tiny_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_references(tiny_models, tiny_tokens, tmp_path_factory) -> dict:
    """modelopt's single-process export of every tiny model, in one process (imports paid once)."""
    root = tmp_path_factory.mktemp("tiny-references")
    refs = {arch: root / arch for arch in ARCHS}
    args = [str(a) for arch in ARCHS
            for a in (tiny_models[arch], tiny_tokens, refs[arch], SUPPORTED[arch].attn_implementation)]
    result = subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return refs


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_compute_the_models_forward(arch, tiny_models):
    """Hidden states after each stage equal the full model's after the same layer, bit for bit."""
    from transformers import AutoModelForCausalLM

    from nvfp4_pp.model.source import SourceCheckpoint
    from nvfp4_pp.model.stage import build_stage

    spec = SUPPORTED[arch]
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.bfloat16,
                                                 attn_implementation=spec.attn_implementation).eval()
    assert type(model).__name__ == arch
    after_layer = {}
    for i, layer in enumerate(model.get_submodule(f"{spec.decoder}.{spec.layers}")):
        layer.register_forward_hook(lambda m, args, out, i=i: after_layer.__setitem__(i, out))
    ids = torch.arange(3, 43).unsqueeze(0)  # 40 tokens > sliding window
    with torch.no_grad():
        model(ids)
        source, x = SourceCheckpoint(tiny_models[arch]), ids
        for start, stop in SPLIT:
            x = build_stage(source, spec, start, stop, torch.device("cpu"))(x)
            assert torch.equal(x, after_layer[stop - 1]), f"{arch}: stage {start}-{stop - 1} differs"


def quantize_with_three_ranks(model_dir, tokens, tmp_path):
    """nvfp4_pp's output for `model_dir` calibrated on `tokens` by 3 ranks (modelopt layout)."""
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "run.yaml", model=str(model_dir), output=str(out), format="modelopt",
        calibration={"dataset": str(tokens), "samples": 4, "max_length": 64, "batch_size": 1},
    )
    result = run_nvfp4_pp(config, 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.whole
def test_three_ranks_identical_to_single_process_modelopt(arch, tiny_models, tiny_tokens, tiny_references, tmp_path):
    out = quantize_with_three_ranks(tiny_models[arch], tiny_tokens, tmp_path)

    ours, theirs = load_tensors(out), load_tensors(tiny_references[arch])
    assert tensor_differences(ours, theirs) == []
    input_scales = [float(v) for k, v in ours.items() if k.endswith(".input_scale")]
    assert len(input_scales) == tiny_config(arch).num_hidden_layers * LINEARS_PER_LAYER
    assert all(0 < s < float("inf") and s != 1.0 for s in input_scales)
    # Biases, norms, embeddings (everything but the quantized weights) are the BF16 source bits.
    source = load_tensors(tiny_models[arch])
    quantized = {k for k in source if k.removesuffix(".weight") + ".weight_scale" in ours}
    assert len(quantized) == len(input_scales)
    assert all(torch.equal(ours[k], source[k]) for k in set(source) - quantized)

    config_json = read_json(out / "config.json")
    assert {k: v for k, v in config_json.items() if k != "quantization_config"} == read_json(
        tiny_models[arch] / "config.json")
    # Same exclude list as modelopt, except that we also list Gemma's scaled embedding: modelopt
    # only lists modules it gave a (disabled) quantizer, and its registry matches nn.Embedding
    # exactly, not subclasses such as Gemma3TextScaledWordEmbedding. Either way it stays BF16.
    excluded = set(config_json["quantization_config"]["exclude_modules"])
    reference_excluded = set(read_json(tiny_references[arch] / "hf_quant_config.json")["quantization"]["exclude_modules"])
    assert reference_excluded <= excluded and excluded - reference_excluded <= {"model.embed_tokens"}


IMAGE_TEXT = [(arch, False) for arch in sorted(TINY_IMAGE_TEXT)] + [("Mistral3ForConditionalGeneration", True)]
"""(class, saved in transformers 4.52-4.57's `model.language_model.*` layout)."""


def _case(arch: str, new_layout: bool) -> str:
    return arch + ("-new-layout" if new_layout else "")


@pytest.fixture(scope="session")
def image_text_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny-image-text")
    return {_case(*c): write_tiny_image_text_model(c[0], root / _case(*c), new_layout=c[1]) for c in IMAGE_TEXT}


@pytest.fixture(scope="session")
def image_text_references(image_text_models, tiny_tokens, tmp_path_factory) -> dict:
    """modelopt's single-process export of each whole image-text model (one process)."""
    root = tmp_path_factory.mktemp("tiny-image-text-references")
    refs = {case: root / case for case in image_text_models}
    args = [str(a) for case, model in image_text_models.items() for a in (model, tiny_tokens, refs[case], "sdpa")]
    result = subprocess.run([sys.executable, str(REPO / "tests" / "reference.py"), *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return refs


@pytest.mark.parametrize("arch,new_layout", IMAGE_TEXT, ids=[_case(*c) for c in IMAGE_TEXT])
def test_image_text_stages_compute_the_language_models_forward(arch, new_layout, image_text_models):
    from transformers import AutoModelForImageTextToText

    from nvfp4_pp.model.source import SourceCheckpoint
    from nvfp4_pp.model.stage import build_stage

    model_dir = image_text_models[_case(arch, new_layout)]
    source = SourceCheckpoint(model_dir)
    spec = architecture_of(source.config, source.weight_map)
    assert spec.name == arch and spec.decoder == ("model.language_model" if new_layout else "language_model.model")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    after_layer = {}
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: after_layer.__setitem__(i, out))
    ids = torch.arange(3, 43).unsqueeze(0)
    with torch.no_grad():
        model(input_ids=ids)
        x = ids
        for start, stop in SPLIT:
            stage = build_stage(source, spec, start, stop, torch.device("cpu"))
            assert all(n.startswith(spec.decoder) for n in stage.state_dict())
            x = stage(x)
            assert torch.equal(x, after_layer[stop - 1]), f"{arch}: stage {start}-{stop - 1} differs"


@pytest.mark.parametrize("arch,new_layout", IMAGE_TEXT, ids=[_case(*c) for c in IMAGE_TEXT])
@pytest.mark.whole
def test_image_text_language_model_quantized_rest_kept(arch, new_layout, image_text_models, tiny_tokens,
                                                      image_text_references, tmp_path):
    """3 ranks quantize the language model exactly as modelopt does for the whole model, in the
    source's own tensor layout (as modelopt keeps it); the vision tower and projector are the
    source's BF16 bits and listed in the ignore list; verify passes."""
    from nvfp4_pp.checkpoint.verify import verify

    case = _case(arch, new_layout)
    out = quantize_with_three_ranks(image_text_models[case], tiny_tokens, tmp_path)

    ours, source = load_tensors(out), load_tensors(image_text_models[case])
    assert set(ours) >= set(source) - {k for k in source if k.endswith(".weight") and
                                       k.removesuffix(".weight") + ".weight_scale" in ours}
    assert tensor_differences(ours, load_tensors(image_text_references[case])) == []
    input_scales = [k for k in ours if k.endswith(".input_scale")]
    assert len(input_scales) == 6 * LINEARS_PER_LAYER and all("language_model" in k for k in input_scales)
    outside = [k for k in source if "vision_tower" in k or "multi_modal_projector" in k]
    assert outside and all(torch.equal(ours[k], source[k]) for k in outside)

    excluded = read_json(out / "config.json")["quantization_config"]["exclude_modules"]
    vision_linears = {k.removesuffix(".weight") for k in outside if k.endswith(".weight") and source[k].dim() == 2}
    assert vision_linears and vision_linears <= set(excluded)
    assert verify(out, image_text_models[case]) == []


@pytest.mark.parametrize("config,kind", [
    ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "mixture-of-experts"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128}, "mixture-of-experts"),
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "encoder-decoder"),
    ({"architectures": ["Qwen2VLForConditionalGeneration"], "vision_config": {},
      "text_config": {"model_type": "qwen2_vl_text"}}, "multimodal model whose language model ('qwen2_vl_text')"),
    ({"architectures": ["LlavaForConditionalGeneration"], "vision_config": {}}, "multimodal"),
    ({"architectures": ["GPT2LMHeadModel"]}, "not a decoder nvfp4_pp knows"),
    ({}, "not a decoder nvfp4_pp knows"),
])
def test_unsupported_architectures_are_refused(config, kind):
    with pytest.raises(UnsupportedArchitecture) as e:
        architecture_of(config)
    message = str(e.value)
    assert "is not supported" in message and kind in message and all(name in message for name in SUPPORTED)


@pytest.mark.whole
def test_refusal_from_the_command_line(tmp_path):
    """A MoE checkpoint stops before anything is loaded, with one line naming what is supported."""
    from transformers import MixtralConfig, MixtralForCausalLM

    model_dir = tmp_path / "mixtral"
    MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, num_local_experts=2, vocab_size=64)).save_pretrained(model_dir)
    config = write_config(tmp_path / "run.yaml", model=str(model_dir), output=str(tmp_path / "out"))
    result = subprocess.run([sys.executable, "-m", "nvfp4_pp.run", str(config)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("nvfp4_pp: error:")]
    assert len(errors) == 1 and "['MixtralForCausalLM'] is not supported" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
