"""The plain-torch NVFP4 decoder against the libraries that define the format (modelopt, compressed-tensors)."""

from __future__ import annotations

import torch

from nvfp4_pp.checkpoint.decoders.nvfp4 import fake_quantize_activation, round_to_e2m1, unpack_e2m1


def test_rounding_equals_modelopt_including_every_midpoint():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([torch.linspace(-7, 7, 20001), midpoints, -midpoints])
    codes = NVFP4QTensor._cast_fp4(x.clone())  # casts in place
    assert torch.equal(round_to_e2m1(x), NVFP4QTensor.get_e2m1_values("cpu")[codes.long()])


def test_nibble_order_equals_compressed_tensors_packing():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    values = round_to_e2m1(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 3)
    assert torch.equal(unpack_e2m1(pack_fp4_to_uint8(values)), values)


def test_activation_quantization_equals_modelopt_block_quantization():
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 4
    scale = x.abs().max() * 1.5 / (6 * 448)  # calibrated on a larger amax than this input's
    packed, block_scale, _ = NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=scale)
    theirs = packed.dequantize(dtype=torch.float32, scale=block_scale, double_scale=scale, block_sizes={-1: 16})
    assert torch.equal(fake_quantize_activation(x, scale), theirs)
    # compressed-tensors stores the reciprocal; the same input quantizes to the same values.
    ours_global = fake_quantize_activation(x, (1 / scale.double()).float(), global_form=True)
    assert torch.allclose(ours_global, theirs, rtol=1e-6, atol=0)
