"""The numbers of one NVFP4 Linear, independent of layout, and the small interface a layout implements."""

from __future__ import annotations

import abc
import dataclasses

import torch


@dataclasses.dataclass(frozen=True, slots=True)
class QuantizedLinear:
    """One NVFP4 Linear in modelopt's terms (all on CPU).

    Dequantised weight = e2m1(weight) x float(weight_scale) x weight_scale_2.
    """

    weight: torch.Tensor
    """uint8 [out, in/2], element 2j in the low nibble, 2j+1 in the high nibble."""
    weight_scale: torch.Tensor
    """float8_e4m3fn [out, in/16] per-block scales."""
    weight_scale_2: torch.Tensor
    """float32 scalar: weight amax / (6 * 448)."""
    input_scale: torch.Tensor
    """float32 scalar: calibrated input amax / (6 * 448)."""


class CheckpointFormat(abc.ABC):
    """A layout: tensor names per quantized Linear, and the config blocks that describe it."""

    name: str

    @abc.abstractmethod
    def linear_tensors(self, module_name: str, linear: QuantizedLinear) -> dict[str, torch.Tensor]:
        """The tensors written for one quantized Linear, under their final names."""

    @abc.abstractmethod
    def quantization_config(self, exclude: list[str], producer: dict) -> dict:
        """The `quantization_config` block of config.json."""

    def extra_files(self, exclude: list[str], producer: dict) -> dict[str, dict]:
        """Additional JSON files (name -> content) the layout needs besides config.json."""
        return {}
