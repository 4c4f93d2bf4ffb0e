"""modelopt's layout (quant_method "modelopt", quant_algo "NVFP4"), as vLLM's ModelOptNvFp4 loader reads it."""

from __future__ import annotations

import torch

from .base import CheckpointFormat, QuantizedLinear

GROUP_SIZE = 16


class ModeloptFormat(CheckpointFormat):
    name = "modelopt"

    def linear_tensors(self, module_name: str, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
        return {
            f"{module_name}.weight": linear.weight,
            f"{module_name}.weight_scale": linear.weight_scale,
            f"{module_name}.weight_scale_2": linear.weight_scale_2,
            f"{module_name}.input_scale": linear.input_scale,
        }

    def quantization_config(self, exclude: list[str], producer: dict) -> dict:
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
        return {
            "config_groups": {
                "group_0": {"input_activations": dict(fp4), "weights": dict(fp4), "targets": ["Linear"]}
            },
            # vLLM reads `exclude_modules` (0.10-0.11), `ignore` (0.12-0.32) or either (0.33+).
            "ignore": list(exclude),
            "exclude_modules": list(exclude),
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": GROUP_SIZE,
            "producer": producer,
            "quant_method": "modelopt",
        }

    def extra_files(self, exclude: list[str], producer: dict) -> dict[str, dict]:
        return {
            "hf_quant_config.json": {
                "producer": producer,
                "quantization": {
                    "quant_algo": "NVFP4",
                    "kv_cache_quant_algo": None,
                    "group_size": GROUP_SIZE,
                    "exclude_modules": list(exclude),
                },
            }
        }
