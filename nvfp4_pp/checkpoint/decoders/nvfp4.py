"""The NVFP4 number format in plain torch, written from the format's definition (no modelopt).

Used to decode written checkpoints and to emulate W4A4 activation quantization, so quality
numbers come from the bytes on disk, independently of the code that produced them.
"""

from __future__ import annotations

import torch

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
"""Magnitudes of codes 0..7; bit 3 is the sign."""
_CODE_VALUES = torch.cat((E2M1_VALUES, -E2M1_VALUES))
_BYTE_VALUES = torch.stack((_CODE_VALUES.repeat(16), _CODE_VALUES.repeat_interleave(16)), dim=-1)
"""[256, 2]: the two values of one byte, low nibble first."""


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> float32 [..., n]: element 2j is the low nibble, 2j+1 the high nibble."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 weights must be uint8, got {packed.dtype}")
    return _BYTE_VALUES.to(packed.device)[packed.long()].flatten(-2)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code (as hardware and modelopt round), saturating at 6.

    E2M1 is evenly spaced within each binade: 0.5 apart below 2, 1 apart in [2, 4), 2 apart in
    [4, 6]; rounding half to even on that grid gives the even code at every midpoint.
    """
    a = x.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, x)


def _step(block_scale: torch.Tensor, tensor_scale: torch.Tensor, global_form: bool) -> torch.Tensor:
    """Size of one E2M1 unit per block: block x scale (modelopt), or block / global scale (compressed-tensors)."""
    s = tensor_scale.float().reshape(())
    return block_scale.float() / s if global_form else block_scale.float() * s


def dequantize_weight(
    packed: torch.Tensor, block_scale: torch.Tensor, tensor_scale: torch.Tensor, global_form: bool = False
) -> torch.Tensor:
    """float32 [out, in] = e2m1 x fp8 block scale x per-tensor scale.

    `tensor_scale` is modelopt's `weight_scale_2` (amax / 2688), or with `global_form` the
    compressed-tensors `weight_global_scale` (2688 / amax), divided by as its readers do.
    """
    values = unpack_e2m1(packed)
    out, inp = values.shape
    if block_scale.shape != (out, inp // BLOCK):
        raise ValueError(f"block scales {tuple(block_scale.shape)} do not fit weights [{out}, {inp}]")
    return values * _step(block_scale, tensor_scale, global_form).repeat_interleave(BLOCK, dim=1)


def fake_quantize_activation(x: torch.Tensor, tensor_scale: torch.Tensor, global_form: bool = False) -> torch.Tensor:
    """What an NVFP4 W4A4 kernel sees of `x`: per-16 blocks along the last dim, FP8 block scales
    computed at run time, and the static per-tensor scale from calibration (orientation as in
    `dequantize_weight`)."""
    shape, dtype = x.shape, x.dtype
    if shape[-1] % BLOCK:
        raise ValueError(f"activation width {shape[-1]} is not a multiple of {BLOCK}")
    s = tensor_scale.float().reshape(())
    blocks = x.float().reshape(-1, BLOCK)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    wanted = block_amax / E2M1_MAX * s if global_form else block_amax / E2M1_MAX / s
    block_scale = wanted.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    step = _step(block_scale, tensor_scale, global_form)
    q = torch.where(step > 0, round_to_e2m1(blocks / torch.where(step > 0, step, 1.0)), 0.0)
    return (q * step).reshape(shape).to(dtype)
