"""compressed-tensors' layout (quant_method "compressed-tensors", format "nvfp4-pack-quantized").

This is what llm-compressor writes and what vLLM's CompressedTensorsW4A4Fp4 scheme and
transformers' CompressedTensorsConfig read. The numbers are modelopt's: packed nibbles and FP8
block scales are the same bytes; the two per-tensor scales are stored as reciprocals
(global scale = 6 * 448 / amax = 1 / modelopt's scale).

The config group is compressed-tensors' preset scheme "NVFP4" written with only the fields every
compressed-tensors release since NVFP4 support (0.10) knows. The schema forbids unknown fields
(since 0.11), so `scale_dtype` / `zp_dtype` (added in 0.13, FP8 is what readers assume when they
are absent) and `observer` (a calibration-time setting, and its preset value "static_minmax" is
unknown to older releases) are left out: a vLLM pinned to an older compressed-tensors still loads
the checkpoint, and a new one reads exactly the preset (the tests check both).
"""

from __future__ import annotations

import torch

from .base import CheckpointFormat, QuantizedLinear

GROUP_SIZE = 16
FORMAT = "nvfp4-pack-quantized"
FP4_ARGS = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP_SIZE, "strategy": "tensor_group"}
"""QuantizationArgs fields shared by weights and activations of the NVFP4 preset."""


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """fp32 [1] holding 1/scale, rounded once from float64 (modelopt scale -> compressed-tensors global scale)."""
    return (1.0 / scale.double()).float().reshape(1)


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"

    def linear_tensors(self, module_name: str, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
        return {
            f"{module_name}.weight_packed": linear.weight,
            f"{module_name}.weight_scale": linear.weight_scale,
            f"{module_name}.weight_global_scale": reciprocal(linear.weight_scale_2),
            f"{module_name}.input_global_scale": reciprocal(linear.input_scale),
        }

    def quantization_config(self, exclude: list[str], producer: dict) -> dict:
        # No "producer" key: older readers validate this block, and the run record names the producer.
        return {
            "quant_method": "compressed-tensors",
            "format": FORMAT,
            "quantization_status": "compressed",  # transformers refuses anything else for packed weights
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**FP4_ARGS, "dynamic": False},
                    "input_activations": {**FP4_ARGS, "dynamic": "local"},
                    "output_activations": None,
                }
            },
            "kv_cache_scheme": None,
            # Module names, matched exactly by vLLM and compressed-tensors (never `.weight` names).
            "ignore": list(exclude),
        }
