"""FP8 source checkpoints: which quantized sources nvfp4_pp reads, and their weights dequantised on load.

Large models are often released in FP8 only. Such a source is read like a BF16 one: every FP8
weight is multiplied by its own scale while its stage loads it and rounded once to the model dtype,
so calibration and export see exactly the BF16 model the FP8 checkpoint stands for. The source's
scale tensors, activation scales and KV-cache scales describe the old quantization, not the model:
they are left out of the tensor map, so no stage loads them and no export copies them.

Recognised (config.json `quantization_config`, else modelopt's `hf_quant_config.json`, else FP8
weights with scales in the safetensors headers):
- `quant_method: fp8` (transformers' fine-grained FP8: DeepSeek-V3, Qwen3, Mistral releases):
  `weight_scale_inv`, one per tensor (`weight_block_size: null`) or one per 128x128 block;
- `quant_method: modelopt`, `quant_algo: FP8`: `weight_scale`, one per tensor;
- `quant_method: compressed-tensors`, 8-bit float weights (format `float-quantized`): `weight_scale`
  per tensor, per output channel or per block.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from nvfp4_pp.errors import NvFp4PpError

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_NAMES = ("weight_scale_inv", "weight_scale")
"""The scale stored beside an FP8 `weight`; the dequantised weight is weight x scale for both names."""
AUXILIARY_NAMES = frozenset({*SCALE_NAMES, "input_scale", "activation_scale", "output_scale", "k_scale",
                             "v_scale", "q_scale", "kv_scale", "prob_scale", "weight_zero_point",
                             "input_zero_point"})
"""Last name components of a quantized source's tensors that belong to its quantization, not the model."""
CONFIG_KEYS = ("quantization_config", "compression_config")
"""config.json keys that describe the source's quantization (compression_config: older compressed-tensors)."""
CONFIG_FILES = ("hf_quant_config.json", "recipe.yaml")
"""Side files that describe the source's quantization (modelopt's config, llm-compressor's recipe)."""
DEFAULT_BLOCK = (128, 128)
SUPPORTED = ("BF16/FP16/FP32 sources, and FP8 sources dequantised on load: quant_method 'fp8' "
             "(weight_scale_inv per tensor or per 128x128 block), modelopt quant_algo 'FP8' (weight_scale per "
             "tensor), compressed-tensors 8-bit float weights (weight_scale per tensor, channel or block)")
CHUNK_ELEMENTS = 1 << 22
"""Elements dequantised at once: bounds the float64 temporaries to 32 MiB each, whatever the Linear's size."""


class UnsupportedSource(NvFp4PpError):
    """The source is quantized in a way nvfp4_pp cannot read; the message names what it can read."""


@dataclasses.dataclass(frozen=True, slots=True)
class Fp8Source:
    """How a source stores its FP8 weights."""

    method: str
    """The source's quantization, as its config names it (for messages and the run log)."""
    block: tuple[int, int]
    """Rows x columns one 2-D scale entry covers, when a scale is neither per tensor nor per channel."""


def _refuse(what: str) -> UnsupportedSource:
    return UnsupportedSource(f"the source checkpoint is quantized ({what}); nvfp4_pp reads {SUPPORTED}. "
                             "Point 'model' at the BF16 release of this model")


def _compressed_tensors(qc: dict) -> Fp8Source:
    """compressed-tensors: every config group must hold 8-bit float weights (tensor, channel or block)."""
    fmt = qc.get("format")
    block = None
    for name, group in (qc.get("config_groups") or {}).items():
        weights = (group or {}).get("weights") or {}
        strategy = weights.get("strategy")
        if weights.get("num_bits") != 8 or weights.get("type") != "float" or strategy not in ("tensor", "channel",
                                                                                                  "block"):
            raise _refuse(f"compressed-tensors format {fmt!r}, group {name!r}: {weights.get('num_bits')}-bit "
                          f"{weights.get('type')} weights, strategy {strategy!r}")
        if strategy == "block":
            block = tuple(weights.get("block_structure") or DEFAULT_BLOCK)
    if not qc.get("config_groups"):
        raise _refuse(f"compressed-tensors format {fmt!r} without config_groups")
    return Fp8Source(f"compressed-tensors {fmt}", block or DEFAULT_BLOCK)


def detect(path: Path, config: dict, dtypes: set[str]) -> Fp8Source | None:
    """The source's FP8 scheme, None for an unquantized source, or one refusal naming what is supported.

    `dtypes`: the safetensors dtypes of the source's tensors (an FP8 source without a config is
    recognised by them).
    """
    qc = next((config[k] for k in CONFIG_KEYS if isinstance(config.get(k), dict)), None)
    modelopt_file = path / "hf_quant_config.json"
    if qc is None and modelopt_file.is_file():
        qc = {"quant_method": "modelopt", **json.loads(modelopt_file.read_text()).get("quantization", {})}
    if qc is None:
        return Fp8Source("FP8 weights with scales", DEFAULT_BLOCK) if dtypes & FP8_DTYPES.keys() else None
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        block = qc.get("weight_block_size")
        return Fp8Source("quant_method fp8" + (f", {block[0]}x{block[1]} blocks" if block else ", per tensor"),
                         tuple(block) if block else DEFAULT_BLOCK)
    if method == "modelopt":
        algo = qc.get("quant_algo")
        if algo != "FP8":
            raise _refuse(f"modelopt quant_algo {algo!r}")
        return Fp8Source("modelopt FP8", DEFAULT_BLOCK)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise _refuse(f"quant_method {qc.get('quant_method')!r}")


def scale_layout(weight_shape: list[int], scale_shape: list[int], block: tuple[int, int]) -> str | None:
    """'tensor', 'block' or 'channel' for a scale of `scale_shape` beside a 2-D weight; None if none fits."""
    rows, cols = weight_shape
    if math.prod(scale_shape) == 1:
        return "tensor"
    if list(scale_shape) == [math.ceil(rows / block[0]), math.ceil(cols / block[1])]:
        return "block"
    if list(scale_shape) in ([rows, 1], [rows]):
        return "channel"
    return None


def pair_scales(tensors: dict[str, dict], block: tuple[int, int]) -> dict[str, str]:
    """FP8 weight name -> its scale's name, checking each FP8 weight has exactly one scale of a known layout.

    `tensors`: name -> safetensors header entry, for every tensor of the source.
    """
    scales = {}
    for name, meta in tensors.items():
        if meta["dtype"] not in FP8_DTYPES or name.rpartition(".")[2] in AUXILIARY_NAMES:
            continue
        prefix, _, leaf = name.rpartition(".")
        found = [f"{prefix}.{s}" for s in SCALE_NAMES if f"{prefix}.{s}" in tensors]
        if leaf != "weight" or len(found) != 1 or len(meta["shape"]) != 2:
            what = "two scales" if len(found) > 1 else "no weight_scale or weight_scale_inv beside it"
            raise UnsupportedSource(
                f"tensor {name!r} is {meta['dtype']} {meta['shape']} with {what}; only 2-D FP8 Linear weights "
                "with one scale each are dequantised"
            )
        shape = tensors[found[0]]["shape"]
        if scale_layout(meta["shape"], shape, block) is None:
            rows, cols = meta["shape"]
            raise UnsupportedSource(
                f"{found[0]!r} has shape {shape}, which fits none of per tensor [1], per channel [{rows}, 1] or "
                f"per {block[0]}x{block[1]} block [{math.ceil(rows / block[0])}, {math.ceil(cols / block[1])}]"
            )
        scales[name] = found[0]
    return scales


def _round_to_odd_float32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding to odd: a later rounding to BF16/FP16 then equals the exact one."""
    nearest = x.to(torch.float32)
    back = nearest.to(torch.float64)
    bits = nearest.view(torch.int32)
    bits = torch.where(back.abs() > x.abs(), bits - 1, bits)  # truncate toward zero
    return torch.where(back != x, bits | 1, bits).view(torch.float32)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """weight x scale (per tensor, per channel or per block; last blocks may be partial), rounded once to `dtype`.

    FP8 x FP32 products are exact in float64; rounding them through float32 to odd keeps the final
    rounding to `dtype` the only one (torch's float64 -> bfloat16 rounds twice).
    """
    rows, cols = weight.shape
    layout = scale_layout(list(weight.shape), list(scale.shape), block)
    assert layout is not None, "pair_scales checks every scale's shape first"
    scale = scale.to(device=weight.device, dtype=torch.float64)
    scale = scale.reshape(1, 1) if layout == "tensor" else scale.reshape(rows, 1) if layout == "channel" else scale
    step = max(block[0], CHUNK_ELEMENTS // max(cols, 1) // block[0] * block[0])
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        if layout == "block":
            part = scale[start // block[0] : math.ceil(stop / block[0])]
            part = part.repeat_interleave(block[0], 0)[: stop - start].repeat_interleave(block[1], 1)[:, :cols]
        else:
            part = scale if layout == "tensor" else scale[start:stop]
        exact = weight[start:stop].to(torch.float64) * part
        out[start:stop] = exact.to(dtype) if dtype in (torch.float32, torch.float64) else \
            _round_to_odd_float32(exact).to(dtype)
    return out
