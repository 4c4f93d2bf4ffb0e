"""One rank's calibrated stage -> quantized tensors under their real global names.

The numbers come from modelopt's own export code (the per-module function its single-process
`export_hf_checkpoint` calls for every quantized Linear, and the same fusion steps before it), so
each stage's tensors equal the one-process export's, for every scheme a recipe produces (NVFP4,
NVFP4-AWQ, W4A16 NVFP4, FP8, MXFP4, INT4) and for KV-cache scales.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from .errors import CalibrationError
from .formats import CheckpointFormat
from .linear_stats import PendingStats, linear_stats, read_back
from .log import logger
from .progress import Progress
from .records import ExportResult
from .sizes import EXPORT_CHUNK_ELEMENTS
from .source import SourceCheckpoint
from .stage import Stage
from .writer import ShardWriter

STATIC_INPUT_SCALE = ("nvfp4", "nvfp4_awq", "fp8")
"""Schemes whose input scale comes from calibration (MXFP4 scales its inputs per block at run time)."""
KV_CACHE_MAX_BOUND = 448.0
"""modelopt's KV-cache scale is amax / 448 (the FP8 E4M3 maximum) for its FP8 KV format."""


def _quant_linears(stage: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from modelopt.torch.export.layer_utils import is_quantlinear
    from modelopt.torch.export.quant_utils import QUANTIZATION_NONE, get_quantization_format

    for name, module in stage.named_modules():
        if is_quantlinear(module) and get_quantization_format(module) != QUANTIZATION_NONE:
            yield name, module


def fuse_shared_inputs(stage: Stage, index: int, layer: nn.Module) -> None:
    """Prepare a decoder layer's Linears that read the same input (q/k/v, gate/up) as modelopt's export does.

    vLLM fuses them into one kernel with one global scale; modelopt's export unifies them by
    taking the max amax (FP8 excepted: vLLM requantizes FP8 parts itself). For AWQ it first folds
    pre-quant scales into the previous Linear where shapes allow, and those of a shared input into
    the layernorm before it. Groups are found as modelopt finds them: by hooking a dummy forward
    (here of the one layer). Every group lies inside one decoder layer.
    """
    from modelopt.torch.export.quant_utils import fuse_prequant_to_linear, get_quantization_format
    from modelopt.torch.export.unified_export_hf import _fuse_shared_input_modules, collect_shared_input_modules

    scheme = get_quantization_format(layer)
    if scheme is not None and "nvfp4_awq" in scheme:
        fuse_prequant_to_linear(layer)
    weight = next(layer.parameters())
    x = torch.zeros((1, 2, stage.hf_config.hidden_size), dtype=weight.dtype, device=weight.device)
    context = stage.context(x)
    input_to_linear, output_to_layernorm = collect_shared_input_modules(
        layer, lambda: stage.run_layer(index, layer, x, context), collect_layernorms=True)
    _fuse_shared_input_modules(layer, input_to_linear, output_to_layernorm, fuse_layernorms=True,
                               quantization_format=scheme)


def _nvfp4_in_row_chunks(name: str, module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Plain NVFP4 packed as modelopt's export packs it, a row chunk at a time.

    With the per-tensor scale fixed, block scales and codes of a row depend on that row alone, so
    the chunks together are modelopt's whole-tensor bytes while the temporaries stay bounded.
    """
    from modelopt.torch.export.quant_utils import (
        QUANTIZATION_NVFP4,
        get_activation_scaling_factor,
        get_weight_block_size,
        get_weight_scaling_factor_2,
        to_quantized_weight,
    )
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    quantizer = module.weight_quantizer
    weight_scale_2 = get_weight_scaling_factor_2(module).squeeze()
    global_scale = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
    block = get_weight_block_size(module)
    rows = max(1, EXPORT_CHUNK_ELEMENTS // module.weight.shape[1])
    scales, codes = [], []
    for start in range(0, module.weight.shape[0], rows):
        chunk = module.weight[start : start + rows].to(dtype)
        scale = NVFP4QTensor.get_weights_scaling_factor_from_quantizer(quantizer, chunk, global_scale.to(chunk.device))[0]
        codes.append(to_quantized_weight(chunk, scale, QUANTIZATION_NVFP4, weight_scale_2, block).cpu())
        scales.append(scale.cpu())
    return {
        f"{name}.weight": torch.cat(codes),
        f"{name}.weight_scale": torch.cat(scales),
        f"{name}.weight_scale_2": weight_scale_2.float().cpu(),
        f"{name}.input_scale": get_activation_scaling_factor(module).squeeze().float().cpu(),
    }


def _int4_in_row_chunks(name: str, module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """INT4 packed as modelopt's export packs it (`pack_int4_in_uint8`), an even row chunk at a time.

    The scales (amax / 7 per block of 128 inputs) come from the calibrated quantizer alone, and
    modelopt packs two output rows into one byte ([out/2, in]): chunks of an even number of rows give
    its whole-tensor bytes with bounded temporaries.
    """
    from modelopt.torch.export.quant_utils import (
        QUANTIZATION_INT4_AWQ,
        get_weight_block_size,
        get_weight_scaling_factor,
        to_quantized_weight,
    )

    scale = get_weight_scaling_factor(module)
    block = get_weight_block_size(module)
    rows = max(2, EXPORT_CHUNK_ELEMENTS // module.weight.shape[1] // 2 * 2)
    codes = [to_quantized_weight(module.weight[start : start + rows].to(dtype), scale[start : start + rows],
                                 QUANTIZATION_INT4_AWQ, None, block).cpu()
             for start in range(0, module.weight.shape[0], rows)]
    return {f"{name}.weight": torch.cat(codes), f"{name}.weight_scale": scale.cpu()}


def quantize_linear(name: str, module: nn.Module, dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
    """Pack one calibrated Linear with modelopt's per-module export; (scheme, tensors in modelopt's names).

    modelopt's `_export_quantized_weight` is what its `export_hf_checkpoint` runs on every quantized
    module: it replaces the weight by the packed one and registers the scales on the module. Plain
    NVFP4 (the bulk of every NVFP4 checkpoint) and INT4 (no AWQ pre-quant scale) are packed in row
    chunks with the same functions, giving the same bytes with bounded memory.
    """
    from modelopt.torch.export.quant_utils import (
        QUANTIZATION_INT4_AWQ,
        QUANTIZATION_NVFP4,
        get_quantization_format,
        postprocess_state_dict,
    )
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    scheme = get_quantization_format(module)
    if scheme in STATIC_INPUT_SCALE and module.input_quantizer.amax is None:
        raise CalibrationError(f"{name}: input quantizer has no calibrated amax; calibration saw no data: check the "
                               "calibration set (calibration.json) and the log's calibration health")
    if scheme == QUANTIZATION_NVFP4 and not NVFP4QTensor._is_static_quantizer(module.weight_quantizer):
        return scheme, _nvfp4_in_row_chunks(name, module, dtype)
    if scheme == QUANTIZATION_INT4_AWQ and getattr(module.input_quantizer, "pre_quant_scale", None) is None:
        return scheme, _int4_in_row_chunks(name, module, dtype)
    _export_quantized_weight(module, dtype)
    state = {f"{name}.{k}": v for k, v in module.state_dict().items()}
    # Drops quantizer internals (amaxes), renames an AWQ input pre-quant scale to `pre_quant_scale`.
    return scheme, postprocess_state_dict(state, KV_CACHE_MAX_BOUND, None)


def kv_cache_scales(layer: nn.Module, prefix: str) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(KV-cache format, K and V scales in modelopt's names) of a decoder layer's attention modules."""
    from modelopt.torch.export.quant_utils import get_kv_cache_dtype, postprocess_state_dict

    found, kv_format = {}, None
    for local, module in layer.named_modules():
        name = f"{prefix}.{local}"
        k_q, v_q = getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)
        if k_q is None or not (k_q.is_enabled or v_q.is_enabled):
            continue
        kv_format = get_kv_cache_dtype(module)
        for q_name, q in (("k_bmm_quantizer", k_q), ("v_bmm_quantizer", v_q)):
            if q.amax is None:
                raise CalibrationError(f"{name}.{q_name}: no calibrated amax; calibration saw no data: check the "
                                       "calibration set (calibration.json) and the log's calibration health")
            found[f"{name}.{q_name}._amax"] = q.amax
    return kv_format, postprocess_state_dict(found, KV_CACHE_MAX_BOUND, kv_format) if found else {}


def excluded_modules(owned: list[str], source: SourceCheckpoint, quantized: dict[str, str],
                     lm_head: str | None) -> tuple[str, ...]:
    """Modules this rank writes in BF16 that a loader could take for quantized Linears: every 2-D
    weight it owns and did not quantize (embeddings; an image-text model's vision tower and
    projector), and `lm_head` (tied or not) when this rank writes the model's end."""
    out = {n.removesuffix(".weight") for n in owned if n.endswith(".weight") and len(source.shape(n)) == 2}
    return tuple(sorted((out - set(quantized)) | ({lm_head} if lm_head else set())))


def embedding_modules(stage: nn.Module, excluded: tuple[str, ...]) -> tuple[str, ...]:
    """The excluded modules that are embeddings (any nn.Embedding, Gemma's scaled one included)."""
    return tuple(sorted(n for n, m in stage.named_modules() if isinstance(m, nn.Embedding) and n in excluded))


class StageExporter:
    """Writes one rank's tensors: each decoder layer's (packed Linears, KV scales, norms) as soon as
    the layer is calibrated, then every other tensor the rank owns.

    Tensors the stage holds are written from it (AWQ folds scales into layernorms; everything else
    there equals the source), the rest (lm_head, final norm) are copied from the source.
    """

    def __init__(self, stage: Stage, owned: list[str], source: SourceCheckpoint, fmt: CheckpointFormat,
                 writer: ShardWriter):
        self.stage, self.owned, self.source, self.fmt, self.writer = stage, owned, source, fmt, writer
        self.owned_set = set(owned)
        self.schemes: dict[str, str] = {}
        self.stats: dict[str, PendingStats] = {}
        """Each Linear's error and amax as device scalars, read back once in `finish`."""
        self.kv_formats: set[str] = set()
        self.written: set[str] = set()
        self.started = time.perf_counter()
        # Sized from the source (a streaming stage's layers are not loaded yet): its layers' 2-D weights.
        prefixes = tuple(stage.layer_prefixes())
        linears = [n for n in owned if n.startswith(prefixes) and n.endswith(".weight") and len(source.shape(n)) == 2]
        self.progress = Progress("export", sum(source.nbytes(n) for n in linears), "GB", scale=1e9,
                                 steps=len(linears), step_unit="Linears")

    def layer(self, index: int, layer: nn.Module) -> None:
        """Pack and write decoder layer `index`; its weights are freed as they are written."""
        prefix = self.stage.layer_prefix(index)
        fuse_shared_inputs(self.stage, index, layer)
        dtype = next(layer.parameters()).dtype
        for local, module in _quant_linears(layer):
            name = f"{prefix}.{local}"
            module.name = name
            weight = module.weight  # packing replaces the parameter; the BF16 tensor is measured against
            scheme, tensors = quantize_linear(name, module, dtype)
            self.writer.add(self.fmt.linear_tensors(name, scheme, tensors))
            self.written.update(tensors)
            self.schemes[name] = scheme
            self.stats[name] = linear_stats(name, module, weight, scheme, tensors)
            self.progress.advance(weight.numel() * weight.element_size())
            del weight
            # Free the packed weight once written: peak memory stays near the stage's weights.
            module.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=module.weight.device), requires_grad=False)
        kv_format, kv = kv_cache_scales(layer, prefix)
        if kv:
            self.kv_formats.add(kv_format)
            self.writer.add(self.fmt.kv_cache_tensors(kv))
        self._write_held(layer, f"{prefix}.")

    def _write_held(self, module: nn.Module, prefix: str) -> None:
        """Norms and other unquantized tensors, copied: on a CPU stage they are views into the memory
        map of the shard their layer was read from, which the writer's buffer would keep alive (a
        streaming stage would then hold every layer it has freed)."""
        held = {f"{prefix}{k}": v.detach().clone() for k, v in module.state_dict().items()
                if f"{prefix}{k}" in self.owned_set and f"{prefix}{k}" not in self.written}
        self.writer.add(held)
        self.written.update(held)

    def finish(self, lm_head: str | None) -> ExportResult:
        """Everything else the rank owns; `lm_head` is the head's module name on the last rank (listed
        as BF16), None elsewhere."""
        self._write_held(self.stage, "")
        rest = [n for n in self.owned if n not in self.written]
        for start in range(0, len(rest), 64):
            self.writer.add(self.source.load(rest[start : start + 64], "cpu"))
        self.writer.close()
        total = sum(s.bytes for s in self.writer.shards)
        logger.info("export: %d Linears packed and %.2f GB written in %.1f s (writer threads busy %.1f s "
                    "writing and checksumming)", len(self.schemes), total / 1e9, time.perf_counter() - self.started,
                    self.writer.write_seconds)
        if len(self.kv_formats) > 1:
            raise RuntimeError(f"layers of one stage got different KV-cache formats {sorted(self.kv_formats)}")
        excluded = excluded_modules(self.owned, self.source, self.schemes, lm_head)
        return ExportResult(tuple(self.writer.shards), self.schemes, next(iter(self.kv_formats), None), excluded,
                            embedding_modules(self.stage, excluded), read_back(self.stats))


def export_stage(stage: Stage, owned: list[str], source: SourceCheckpoint, fmt: CheckpointFormat,
                 writer: ShardWriter, lm_head: str | None) -> ExportResult:
    """Write this rank's tensors (a resident stage: every layer calibrated already)."""
    exporter = StageExporter(stage, owned, source, fmt, writer)
    for index, layer in stage.layers():
        exporter.layer(index, layer)
    return exporter.finish(lm_head)
