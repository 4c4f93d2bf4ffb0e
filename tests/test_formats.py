"""The compressed-tensors output holds modelopt's numbers and reads back through compressed-tensors' own code."""

from __future__ import annotations

import torch

from helpers import load_tensors, read_json
from nvfp4_pp.checkpoint.decoders.decode import decode_checkpoint
from nvfp4_pp.checkpoint.decoders.nvfp4 import dequantize_weight

CT_PARAMS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


def test_same_numbers_as_modelopt_layout(ct_output, reference):
    """Same bytes for nibbles and block scales; per-tensor scales are the correctly rounded reciprocals."""
    ours, theirs = load_tensors(ct_output), load_tensors(reference)
    modules = sorted(k.removesuffix(".input_scale") for k in theirs if k.endswith(".input_scale"))
    assert len(modules) == 30 * 7
    assert sorted(k for k in ours if not k.endswith(CT_PARAMS)) == sorted(
        k for k in theirs if not k.endswith((".weight_scale", ".weight_scale_2", ".input_scale"))
        and k.removesuffix(".weight") not in modules)
    for m in modules:
        assert torch.equal(ours[f"{m}.weight_packed"], theirs[f"{m}.weight"]), m
        assert torch.equal(ours[f"{m}.weight_scale"].view(torch.uint8), theirs[f"{m}.weight_scale"].view(torch.uint8)), m
        for ct_name, mo_name in (("weight_global_scale", "weight_scale_2"), ("input_global_scale", "input_scale")):
            g, s = ours[f"{m}.{ct_name}"], theirs[f"{m}.{mo_name}"]
            assert g.dtype == torch.float32 and g.shape == (1,) and s.shape == ()
            assert g == (1 / s.double()).float(), f"{m}.{ct_name}"
    # Decoded from the files by each layout's own rule (multiply vs divide): equal to fp32 rounding.
    ct_linears, _ = decode_checkpoint(ct_output)
    mo_linears, _ = decode_checkpoint(reference)
    for m in modules:
        torch.testing.assert_close(ct_linears[m].weight, mo_linears[m].weight, rtol=3e-7, atol=0)


def test_config_is_the_compressed_tensors_nvfp4_preset(ct_output):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    qc = read_json(ct_output / "config.json")["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "nvfp4-pack-quantized"
    assert parsed.quantization_status == QuantizationStatus.COMPRESSED
    # Only Linears, as llm-compressor writes it (the modelopt layout also names the embedding, as modelopt does).
    assert parsed.ignore == ["lm_head"]
    preset = preset_name_to_scheme("NVFP4", ["Linear"])
    # Only the fields older compressed-tensors releases reject are left out (see formats/compressed_tensors.py).
    left_out = {"scale_dtype", "zp_dtype", "observer"}
    for part in ("weights", "input_activations"):
        ours = getattr(parsed.config_groups["group_0"], part).model_dump()
        assert {k: v for k, v in ours.items() if k not in left_out} == {
            k: v for k, v in getattr(preset, part).model_dump().items() if k not in left_out}, part


def test_library_decompressor_reproduces_our_decoder(ct_output):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    tensors = load_tensors(ct_output)
    qc = QuantizationConfig.model_validate(read_json(ct_output / "config.json")["quantization_config"])
    scheme = qc.config_groups["group_0"]
    modules = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    for m in modules:
        state = {p: tensors[f"{m}.{p}"] for p in CT_PARAMS}
        theirs = NVFP4PackedCompressor.decompress(state, scheme)["weight"]
        ours = dequantize_weight(state["weight_packed"], state["weight_scale"], state["weight_global_scale"],
                                 global_form=True)
        assert torch.equal(ours.to(theirs.dtype), theirs), m
