"""FP8 (E4M3, per-tensor scale) and MXFP4 (E2M1 in blocks of 32, E8M0 scales) in plain torch.

Written from the formats' definitions (no modelopt), like nvfp4.py, to decode written checkpoints
and emulate their activation quantization in `evaluate`.
"""

from __future__ import annotations

import torch

from nvfp4_pp.checkpoint.decoders.nvfp4 import E2M1_MAX, round_to_e2m1, unpack_e2m1

FP8_MAX = 448.0
MX_BLOCK = 32
E8M0_BIAS = 127


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] = fp8 value x per-tensor scale (both layouts store amax / 448)."""
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 weights must be float8_e4m3fn, got {weight.dtype}")
    return weight.float() * scale.float().reshape(())


def fake_quantize_fp8_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What a static per-tensor FP8 W8A8 kernel sees of `x`: x / scale cast to E4M3 (saturating), times scale."""
    s = scale.float().reshape(())
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).to(x.dtype)


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents -> float32 powers of two (0xFF is NaN in E8M0)."""
    if scale.dtype != torch.uint8:
        raise TypeError(f"E8M0 scales must be uint8, got {scale.dtype}")
    value = torch.exp2(scale.float() - E8M0_BIAS)
    return torch.where(scale == 255, torch.nan, value)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] = e2m1 (low nibble first) x 2^(scale - 127) per block of 32 along the input."""
    values = unpack_e2m1(packed)
    out, inp = values.shape
    if scale.shape != (out, inp // MX_BLOCK):
        raise ValueError(f"E8M0 scales {tuple(scale.shape)} do not fit weights [{out}, {inp}]")
    return values * e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=1)


def fake_quantize_mxfp4_activation(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP4 of `x` along its last dim: per block of 32 the scale is the smallest power of two
    with amax / scale <= 6 (no saturation; modelopt's rule), elements rounded to E2M1."""
    shape, dtype = x.shape, x.dtype
    if shape[-1] % MX_BLOCK:
        raise ValueError(f"activation width {shape[-1]} is not a multiple of {MX_BLOCK}")
    blocks = x.float().reshape(-1, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / E2M1_MAX)).clamp(min=-E8M0_BIAS)
    scale = torch.exp2(torch.where(amax > 0, exponent, torch.zeros_like(exponent)))
    return (round_to_e2m1(blocks / scale) * scale).reshape(shape).to(dtype)
