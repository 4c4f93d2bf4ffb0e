"""modelopt's layout (quant_method "modelopt"), as vLLM's ModelOpt loaders read it.

Tensors keep modelopt's own names. The config is what modelopt's export derives from the same
per-layer formats (`process_layer_quant_config`, `convert_hf_quant_config_format`): one scheme
gives its `quant_algo`; several give `MIXED_PRECISION` with a per-layer `quantized_layers` table.
On top, the excluded modules are written as both `ignore` and `exclude_modules` (vLLM reads
`exclude_modules` in 0.10-0.11, `ignore` in 0.12-0.32, either from 0.33), and a single scheme's
`group_size` and the KV-cache algorithm are kept at the top level, where older loaders look.
"""

from __future__ import annotations

import torch

from nvfp4_pp.checkpoint.formats.base import BLOCK_SIZE, SCHEMES, CheckpointFormat, Layers


def _quantization(layers: Layers) -> dict:
    """hf_quant_config.json's `quantization` block, computed by modelopt's own function."""
    from modelopt.torch.export.quant_utils import process_layer_quant_config

    per_layer: dict[str, str | int] = {}
    for module, scheme in layers.schemes.items():
        per_layer[f"{module}.quantization"] = scheme
        per_layer[f"{module}.awq_block_size"] = BLOCK_SIZE[scheme]
    quantization = process_layer_quant_config(per_layer)
    quantization.pop("exclude_modules", None)  # modelopt summarizes with wildcards; ours are exact names
    if quantization.get("quant_algo") != "MIXED_PRECISION":
        quantization["exclude_modules"] = list(layers.exclude)
    quantization["kv_cache_quant_algo"] = layers.kv_cache
    return quantization


class ModeloptFormat(CheckpointFormat):
    name = "modelopt"
    schemes = SCHEMES

    def linear_tensors(self, module_name: str, scheme: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_scheme(module_name, scheme)
        return dict(tensors)

    def kv_cache_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def quantization_config(self, layers: Layers, producer: dict) -> dict:
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

        quantization = _quantization(layers)
        config = convert_hf_quant_config_format({"producer": producer, "quantization": quantization})
        config["ignore"] = list(layers.exclude)
        config["exclude_modules"] = list(layers.exclude)
        config["kv_cache_quant_algo"] = layers.kv_cache
        if "group_size" in quantization:
            config["group_size"] = quantization["group_size"]
        return config

    def extra_files(self, layers: Layers, producer: dict) -> dict[str, dict]:
        return {"hf_quant_config.json": {"producer": producer, "quantization": _quantization(layers)}}
