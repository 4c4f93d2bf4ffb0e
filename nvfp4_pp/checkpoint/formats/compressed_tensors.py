"""compressed-tensors' layout (quant_method "compressed-tensors"): one config group per scheme.

This is what llm-compressor writes and what vLLM's compressed-tensors schemes (W4A4Fp4, W4A16Fp4,
W8A8Fp8, MXFP4, WNA16) and transformers' CompressedTensorsConfig read. The numbers are modelopt's:
packed nibbles and block scales are the same bytes; NVFP4's two per-tensor scales are stored as
reciprocals (global scale = 6 * 448 / amax = 1 / modelopt's scale); FP8 scales keep modelopt's
orientation (dequantised = fp8 x scale), as a [1] tensor. INT4 (`pack-quantized`) keeps modelopt's
codes, repacked by compressed-tensors' own `pack_to_int32` (eight codes per int32 along the input,
stored as code + 8, low nibble first: [out, in/8]), with `weight_shape`, and the group scales in
BF16, the dtype llm-compressor writes and vLLM's WNA16 kernels hold them in (modelopt's FP32 scale,
rounded once).

Each group is compressed-tensors' preset scheme (`NVFP4`, `NVFP4A16`, `FP8`, `MXFP4`, `W4A16`) written with
only the fields every release since the scheme's support knows. The schema forbids unknown fields
(since 0.11), so `scale_dtype` / `zp_dtype` (added in 0.13; readers assume FP8 E4M3 for NVFP4 and
uint8 E8M0 for MXFP4 when absent) and `observer` (a calibration-time setting) are left out: a vLLM
pinned to an older compressed-tensors still loads the checkpoint, and a new one reads exactly the
preset (the tests check both). One scheme: one group targeting every `Linear` (not ignored).
Several: one group per scheme listing its modules by exact name, each with its own `format`, and
the top-level format `mixed-precision`.
"""

from __future__ import annotations

import torch

from nvfp4_pp.checkpoint.formats.base import CheckpointFormat, Layers

FP4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group"}
INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"}
MXFP4 = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group"}
FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}
GROUPS: dict[str, tuple[str, dict]] = {
    "nvfp4": ("nvfp4-pack-quantized", {"weights": {**FP4, "dynamic": False},
                                       "input_activations": {**FP4, "dynamic": "local"}}),
    "w4a16_nvfp4": ("nvfp4-pack-quantized", {"weights": {**FP4, "dynamic": False}, "input_activations": None}),
    "fp8": ("float-quantized", {"weights": {**FP8, "dynamic": False}, "input_activations": {**FP8, "dynamic": False}}),
    "mxfp4": ("mxfp4-pack-quantized", {"weights": {**MXFP4, "dynamic": False},
                                       "input_activations": {**MXFP4, "dynamic": True}}),
    "int4_awq": ("pack-quantized", {"weights": {**INT4, "dynamic": False}, "input_activations": None}),
}
"""Scheme -> (compression format, QuantizationArgs of its group)."""
KV_CACHE_SCHEMES = {"FP8": {**FP8, "dynamic": False}}
NAMES: dict[str, dict[str, str]] = {
    "nvfp4": {"weight": "weight_packed", "weight_scale": "weight_scale", "weight_scale_2": "weight_global_scale",
              "input_scale": "input_global_scale"},
    "w4a16_nvfp4": {"weight": "weight_packed", "weight_scale": "weight_scale", "weight_scale_2": "weight_global_scale"},
    "fp8": {"weight": "weight", "weight_scale": "weight_scale", "input_scale": "input_scale"},
    "mxfp4": {"weight": "weight_packed", "weight_scale": "weight_scale"},
    "int4_awq": {"weight": "weight_packed", "weight_scale": "weight_scale"},
}
"""Scheme -> modelopt tensor name -> compressed-tensors name."""
RECIPROCAL = {"weight_scale_2", "input_scale"}
"""NVFP4 per-tensor scales, stored as global scales (reciprocals)."""


INT4_SCALE_DTYPE = torch.bfloat16


def int4_codes_from_modelopt(packed: torch.Tensor) -> torch.Tensor:
    """modelopt's INT4 bytes (uint8 [out/2, in]: row 2i in the low nibble, 2i+1 in the high, two's
    complement) -> int8 codes [out, in] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    codes = torch.stack((low, high), dim=1).reshape(-1, packed.shape[1])
    return torch.where(codes > 7, codes - 16, codes)


def int4_tensors(module_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One INT4 Linear in compressed-tensors' pack-quantized layout, from modelopt's tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = int4_codes_from_modelopt(tensors[f"{module_name}.weight"])
    return {f"{module_name}.weight_packed": pack_to_int32(codes, 4),
            f"{module_name}.weight_scale": tensors[f"{module_name}.weight_scale"].to(INT4_SCALE_DTYPE),
            f"{module_name}.weight_shape": torch.tensor(codes.shape, dtype=torch.int64)}


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """fp32 [1] holding 1/scale, rounded once from float64 (modelopt scale -> compressed-tensors global scale)."""
    return (1.0 / scale.double()).float().reshape(1)


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"
    schemes = tuple(GROUPS)

    def linear_tensors(self, module_name: str, scheme: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_scheme(module_name, scheme)
        names = NAMES[scheme]
        if scheme == "int4_awq":
            extra = set(tensors) - {f"{module_name}.{n}" for n in ("weight", "weight_scale", "bias")}
            if extra:
                raise ValueError(f"{sorted(extra)}: no compressed-tensors pack-quantized field for them")
            bias = {k: v for k, v in tensors.items() if k == f"{module_name}.bias"}
            return {**int4_tensors(module_name, tensors), **bias}
        out = {}
        for full, value in tensors.items():
            leaf = full.removeprefix(f"{module_name}.")
            if leaf == "bias":
                out[full] = value
            elif leaf not in names:
                raise ValueError(f"{full}: no compressed-tensors field for {scheme} tensor {leaf!r}")
            elif scheme != "fp8" and leaf in RECIPROCAL:
                out[f"{module_name}.{names[leaf]}"] = reciprocal(value)
            elif value.dtype == torch.float32 and value.dim() == 0:
                out[f"{module_name}.{names[leaf]}"] = value.reshape(1)  # per-tensor scales are [1] here
            else:
                out[f"{module_name}.{names[leaf]}"] = value
        return out

    def kv_cache_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # modelopt hangs the scales on k_proj / v_proj; compressed-tensors on the attention module.
        return {name.replace(".k_proj.k_scale", ".k_scale").replace(".v_proj.v_scale", ".v_scale"): value
                for name, value in tensors.items()}

    def quantization_config(self, layers: Layers, producer: dict) -> dict:
        # No "producer" key: older readers validate this block, and the run record names the producer.
        distinct = layers.distinct
        groups = {}
        for i, scheme in enumerate(distinct):
            fmt, args = GROUPS[scheme]
            targets = ["Linear"] if len(distinct) == 1 else sorted(m for m, s in layers.schemes.items() if s == scheme)
            groups[f"group_{i}"] = {"targets": targets, **args, "output_activations": None,
                                    **({"format": fmt} if len(distinct) > 1 else {})}
        return {
            "quant_method": "compressed-tensors",
            "format": GROUPS[distinct[0]][0] if len(distinct) == 1 else "mixed-precision",
            "quantization_status": "compressed",  # transformers refuses anything else for packed weights
            "config_groups": groups,
            "kv_cache_scheme": KV_CACHE_SCHEMES[layers.kv_cache] if layers.kv_cache else None,
            # Module names, matched exactly by vLLM and compressed-tensors (never `.weight` names); only
            # Linears, as llm-compressor writes it: older vLLM releases (0.7 to at least 0.9) gave every
            # listed layer a Linear method before looking at its type, which an embedding cannot run.
            "ignore": layers.linears_kept,
        }
