"""One rank's calibrated stage -> NVFP4 tensors under their real global names.

The numbers come from modelopt's own export helpers (the same functions its single-process
`export_hf_checkpoint` calls), so each stage's tensors equal the one-process export's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from .formats import CheckpointFormat, QuantizedLinear
from .log import logger
from .source import SourceCheckpoint
from .writer import ShardWriter


def _quant_linears(stage: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from modelopt.torch.export.layer_utils import is_quantlinear
    from modelopt.torch.export.quant_utils import QUANTIZATION_NONE, get_quantization_format

    for name, module in stage.named_modules():
        if is_quantlinear(module) and get_quantization_format(module) != QUANTIZATION_NONE:
            yield name, module


def dummy_input(stage) -> torch.Tensor:
    """A two-token input of the right kind for this stage (ids first, hidden states after)."""
    device = next(stage.parameters()).device
    if stage.is_first:
        return torch.ones((1, 2), dtype=torch.long, device=device)
    dtype = next(stage.parameters()).dtype
    return torch.zeros((1, 2, stage.hf_config.hidden_size), dtype=dtype, device=device)


def fuse_shared_inputs(stage: nn.Module) -> list[list[str]]:
    """Give Linears that read the same input (q/k/v, gate/up) one shared input and weight amax.

    vLLM fuses them into one kernel with one global scale; modelopt's export unifies them by
    taking the max. Groups are found as modelopt finds them: by hooking a dummy forward. A
    stage never cuts a decoder layer, so every group lies inside one stage.
    """
    from modelopt.torch.export.quant_utils import (
        QUANTIZATION_FP8,
        QUANTIZATION_NONE,
        get_quantization_format,
        preprocess_linear_fusion,
    )
    from modelopt.torch.export.unified_export_hf import collect_shared_input_modules

    x = dummy_input(stage)
    input_to_linear, _ = collect_shared_input_modules(stage, lambda: stage(x))
    groups = []
    for modules in input_to_linear.values():
        if len(modules) > 1 and get_quantization_format(modules[0]) not in (QUANTIZATION_FP8, QUANTIZATION_NONE):
            preprocess_linear_fusion(modules)
            groups.append([m.name for m in modules])
    return groups


EXPORT_CHUNK_ELEMENTS = 2**25
"""Weight elements packed at once. modelopt's packing holds ~13 bytes per element in temporaries
(fp32 copies, bucket indices); a 28672 x 8192 Linear at once would add 3 GB to the stage's peak."""


def quantize_linear(module: nn.Module, dtype: torch.dtype) -> QuantizedLinear:
    """Pack one calibrated Linear as NVFP4 with modelopt's scale and packing functions.

    With the per-tensor scale fixed, block scales and codes of a row depend on that row alone, so
    packing row chunks gives modelopt's whole-tensor bytes with a bounded temporary.
    """
    from modelopt.torch.export.quant_utils import (
        QUANTIZATION_NVFP4,
        get_activation_scaling_factor,
        get_quantization_format,
        get_weight_block_size,
        get_weight_scaling_factor,
        get_weight_scaling_factor_2,
        to_quantized_weight,
    )
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    fmt = get_quantization_format(module)
    if fmt != QUANTIZATION_NVFP4:
        raise NotImplementedError(f"quantization format {fmt!r} is not exported yet; only NVFP4 is")
    input_scale = get_activation_scaling_factor(module)
    if input_scale is None:
        raise RuntimeError(f"{module.name}: input quantizer has no calibrated amax; calibration saw no data")
    weight_scale_2 = get_weight_scaling_factor_2(module).squeeze()
    block = get_weight_block_size(module)
    quantizer = module.weight_quantizer
    if NVFP4QTensor._is_static_quantizer(quantizer):  # per-block amaxes stored whole: pack whole
        weight_scale = get_weight_scaling_factor(module)
        packed = to_quantized_weight(module.weight.to(dtype), weight_scale, fmt, weight_scale_2, block).cpu()
        weight_scale = weight_scale.cpu()
    else:
        global_scale = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
        rows = max(1, EXPORT_CHUNK_ELEMENTS // module.weight.shape[1])
        scales, codes = [], []
        for start in range(0, module.weight.shape[0], rows):
            chunk = module.weight[start : start + rows].to(dtype)
            scale = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(
                quantizer, chunk, global_scale.to(chunk.device))[0]
            codes.append(to_quantized_weight(chunk, scale, fmt, weight_scale_2, block).cpu())
            scales.append(scale.cpu())
        packed, weight_scale = torch.cat(codes), torch.cat(scales)
    return QuantizedLinear(
        weight=packed,
        weight_scale=weight_scale,
        weight_scale_2=weight_scale_2.float().cpu(),
        input_scale=input_scale.squeeze().float().cpu(),
    )


def export_stage(
    stage: nn.Module,
    owned: list[str],
    source: SourceCheckpoint,
    fmt: CheckpointFormat,
    writer: ShardWriter,
) -> dict[str, list[str]]:
    """Write this rank's tensors: quantized Linears packed, every other owned tensor copied from source.

    Returns the module names that were quantized and the shared-input groups (for the config).
    """
    started = time.perf_counter()
    fused = fuse_shared_inputs(stage)
    dtype = next(stage.parameters()).dtype
    quantized = []
    for name, module in _quant_linears(stage):
        module.name = name
        writer.add(fmt.linear_tensors(name, quantize_linear(module, dtype)))
        quantized.append(name)
        # Free the BF16 weight once packed: peak memory stays near the stage's weights.
        module.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=module.weight.device), requires_grad=False)
    replaced = {f"{n}.weight" for n in quantized}
    passthrough = [n for n in owned if n not in replaced]
    for start in range(0, len(passthrough), 64):
        writer.add(source.load(passthrough[start : start + 64], "cpu"))
    writer.close()
    total = sum(s["bytes"] for s in writer.shards)
    logger.info("export: %d Linears packed and %.2f GB written in %.1f s (writer threads busy %.1f s "
                "writing and checksumming)", len(quantized), total / 1e9, time.perf_counter() - started,
                writer.write_seconds)
    return {"quantized": quantized, "fused_groups": fused}
