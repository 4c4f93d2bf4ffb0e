"""Independent decoders: a written checkpoint's tensors back to BF16 weights, per layout and scheme.

Every weight comes from the safetensors files, decoded with the plain-torch format code in
nvfp4.py, fp8_mx.py and int4.py (never from modelopt or in-memory state); the config says which scheme
each Linear has, read as `verify` reads it. A writer bug therefore cannot hide behind a table it
shares with the decoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.vllm_contract import read_quant_config
from nvfp4_pp.checkpoint.decoders.fp8_mx import dequantize_fp8, dequantize_mxfp4, fake_quantize_fp8_activation, fake_quantize_mxfp4_activation
from nvfp4_pp.checkpoint.decoders.int4 import codes_from_int32, codes_from_row_pairs, dequantize_int4
from nvfp4_pp.checkpoint.decoders.nvfp4 import dequantize_weight, fake_quantize_activation


class EvaluateError(NvFp4PpError):
    pass


def layout_of(directory: Path):
    """What the checkpoint's config declares (layout, scheme per module), read as `verify` reads it."""
    config = json.loads((directory / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if not qc:
        raise EvaluateError(f"{directory / 'config.json'} has no quantization_config: {directory} is not a quantized "
                            "checkpoint; pass the output directory of an nvfp4_pp run")
    problems: list[str] = []
    layout = read_quant_config(directory, qc, problems)
    if layout is None:
        raise EvaluateError(f"{directory / 'config.json'}: quantization_config.quant_method "
                            f"{qc.get('quant_method')!r} is not a known layout; is this an nvfp4_pp output?")
    return layout


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the files the index names (or of the lone model.safetensors)."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(directory / file, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


class DecodedLinear:
    """One quantized Linear as read from disk: its decoded weight and how its input is quantized.

    `pre_scale` (AWQ) multiplies the input before anything else; `quantize_input` (None for
    weight-only schemes) is the activation quantization a W4A4 / W8A8 kernel applies.
    """

    def __init__(self, weight: torch.Tensor, quantize_input: Callable[[torch.Tensor, bool], torch.Tensor] | None,
                 pre_scale: torch.Tensor | None = None):
        self.weight, self.quantize_input, self.pre_scale = weight, quantize_input, pre_scale


def _nvfp4_input(scale: torch.Tensor, global_form: bool):
    scale = scale.float().reshape(())
    return lambda x, one: fake_quantize_activation(x, torch.ones_like(scale) if one else scale.to(x.device), global_form)


def _fp8_input(scale: torch.Tensor):
    scale = scale.float().reshape(())
    return lambda x, one: fake_quantize_fp8_activation(x, torch.ones_like(scale) if one else scale.to(x.device))


def decode_linear(method: str, scheme: str, module: str, tensors: dict[str, torch.Tensor]) -> DecodedLinear:
    """Pop one Linear's tensors (names per layout and scheme) and decode them."""
    ct = method == "compressed-tensors"

    def take(suffix: str) -> torch.Tensor:
        name = module + suffix
        if name not in tensors:
            raise EvaluateError(f"{module} ({scheme}) lacks {name}; run nvfp4_pp.verify on it")
        return tensors.pop(name)

    def take_optional(suffix: str) -> torch.Tensor | None:
        return tensors.pop(module + suffix, None)

    packed_name = ".weight_packed" if ct else ".weight"
    if scheme in ("nvfp4", "nvfp4_awq", "w4a16_nvfp4"):
        packed, block = take(packed_name), take(".weight_scale")
        weight = dequantize_weight(packed, block, take(".weight_global_scale" if ct else ".weight_scale_2"), ct)
        quantize = None
        if scheme != "w4a16_nvfp4":
            quantize = _nvfp4_input(take(".input_global_scale" if ct else ".input_scale"), ct)
        return DecodedLinear(weight, quantize, take_optional(".pre_quant_scale"))
    if scheme == "fp8":
        weight = dequantize_fp8(take(".weight"), take(".weight_scale"))
        return DecodedLinear(weight, _fp8_input(take(".input_scale")))
    if scheme == "mxfp4":
        weight = dequantize_mxfp4(take(packed_name), take(".weight_scale"))
        return DecodedLinear(weight, lambda x, one: fake_quantize_mxfp4_activation(x))
    if scheme == "int4_awq":
        packed = take(packed_name)
        codes = codes_from_int32(packed) if ct else codes_from_row_pairs(packed)
        if ct:
            shape = take(".weight_shape").tolist()
            if shape != list(codes.shape):
                raise EvaluateError(f"{module}.weight_shape {shape} does not fit weight_packed {list(packed.shape)}")
        weight = dequantize_int4(codes, take(".weight_scale"))
        return DecodedLinear(weight, None, take_optional(".pre_quant_scale"))
    raise EvaluateError(f"{module}: scheme {scheme!r} has no decoder")


def decode_checkpoint(directory: Path) -> tuple[dict[str, DecodedLinear], dict[str, torch.Tensor]]:
    """(quantized Linears by module name, every other tensor by name) of a written checkpoint."""
    directory = Path(directory)
    layout = layout_of(directory)
    tensors = read_tensors(directory)
    linears: dict[str, DecodedLinear] = {}
    # Every scheme of both layouts carries `.weight_scale`; the config says which scheme it is.
    for module in sorted(n.removesuffix(".weight_scale") for n in list(tensors) if n.endswith(".weight_scale")):
        scheme = layout.scheme_of(module)
        if scheme is None:
            raise EvaluateError(f"{directory}: {module} has quantized tensors but no config group; run nvfp4_pp.verify")
        linears[module] = decode_linear(layout.method, scheme, module, tensors)
    for name in [n for n in tensors if n.endswith((".k_scale", ".v_scale"))]:
        tensors.pop(name)  # KV-cache scales: what the serving engine's cache uses, not weights
    return linears, tensors
