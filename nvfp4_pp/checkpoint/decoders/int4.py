"""Symmetric INT4 weights with one scale per group of 128 inputs, in plain torch (no modelopt, no
compressed-tensors), from the two layouts' definitions, to decode written checkpoints in `evaluate`.

weight = code x scale of its group, code in [-8, 7]. modelopt stores two output rows per byte
(uint8 [out/2, in], row 2i in the low nibble, two's complement); compressed-tensors eight inputs
per int32 (int32 [out, in/8], input 8j+k in bits 4k..4k+3, stored as code + 8).
"""

from __future__ import annotations

import torch

GROUP = 128


def codes_from_row_pairs(packed: torch.Tensor) -> torch.Tensor:
    """modelopt: uint8 [out/2, in] -> int codes [out, in]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"modelopt INT4 weights must be uint8, got {packed.dtype}")
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=1).reshape(-1, packed.shape[1]).to(torch.int16)
    return nibbles - 16 * (nibbles >= 8)


def codes_from_int32(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors: int32 [out, in/8] -> int codes [out, in]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"compressed-tensors INT4 weights must be int32, got {packed.dtype}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask drops the sign bits
    return nibbles.reshape(packed.shape[0], -1).to(torch.int16) - 8


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] = code x its group's scale (the scale as stored, widened to float32)."""
    out, inp = codes.shape
    if scale.shape != (out, inp // GROUP) or inp % GROUP:
        raise ValueError(f"group scales {tuple(scale.shape)} do not fit weights [{out}, {inp}] in groups of {GROUP}")
    return codes.float() * scale.float().repeat_interleave(GROUP, dim=1)
