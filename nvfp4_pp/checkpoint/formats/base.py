"""What a layout must say about a quantized checkpoint, and the schemes a Linear can have.

A scheme is modelopt's name for one Linear's quantization (`get_quantization_format`):
`nvfp4`, `nvfp4_awq`, `w4a16_nvfp4`, `fp8`, `mxfp4`, `int4_awq` (modelopt's name for every INT4
block-quantized weight, AWQ or not: the `w4a16_int4` recipe). The exporter hands a layout each Linear's
tensors under modelopt's names (`weight`, `weight_scale`, `weight_scale_2`, `input_scale`,
`pre_quant_scale`, plus an untouched `bias`); the layout renames and re-expresses them.
"""

from __future__ import annotations

import abc
import dataclasses

import torch

from nvfp4_pp.errors import NvFp4PpError

SCHEMES = ("nvfp4", "nvfp4_awq", "w4a16_nvfp4", "fp8", "mxfp4", "int4_awq")
BLOCK_SIZE = {"nvfp4": 16, "nvfp4_awq": 16, "w4a16_nvfp4": 16, "fp8": 0, "mxfp4": 32, "int4_awq": 128}
"""Elements per block scale along the input dimension (0: one per-tensor scale)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Layers:
    """Everything the config of a checkpoint needs to know about its modules."""

    schemes: dict[str, str]
    """Quantized Linear name -> scheme."""
    exclude: list[str]
    """Modules kept in BF16 (lm_head, embeddings, ignored Linears)."""
    kv_cache: str | None = None
    """KV-cache format (modelopt's name, "FP8") when K/V scales were calibrated."""
    embeddings: tuple[str, ...] = ()
    """The modules of `exclude` that are embeddings rather than Linears."""

    @property
    def linears_kept(self) -> list[str]:
        """`exclude` without the embeddings: the BF16 modules a reader would otherwise quantize."""
        return [m for m in self.exclude if m not in self.embeddings]

    @property
    def distinct(self) -> list[str]:
        return sorted(set(self.schemes.values()))


class UnsupportedScheme(NvFp4PpError):
    """A recipe asked for a scheme this layout has no field for."""


class CheckpointFormat(abc.ABC):
    """A layout: tensor names per quantized Linear and KV scales, and the config blocks that describe it."""

    name: str
    schemes: tuple[str, ...]
    """The schemes this layout can hold."""

    def check_scheme(self, module_name: str, scheme: str) -> None:
        if scheme not in self.schemes:
            raise UnsupportedScheme(f"{module_name}: scheme {scheme!r} has no {self.name} layout (it holds "
                                    f"{', '.join(self.schemes)}); choose another format or recipe")

    @abc.abstractmethod
    def linear_tensors(self, module_name: str, scheme: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors written for one quantized Linear (given under modelopt's names), under their final names."""

    @abc.abstractmethod
    def kv_cache_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """K/V scales (given as modelopt's `...k_proj.k_scale` / `...v_proj.v_scale`) under the layout's names."""

    @abc.abstractmethod
    def quantization_config(self, layers: Layers, producer: dict) -> dict:
        """The `quantization_config` block of config.json."""

    def extra_files(self, layers: Layers, producer: dict) -> dict[str, dict]:
        """Additional JSON files (name -> content) the layout needs besides config.json."""
        return {}
