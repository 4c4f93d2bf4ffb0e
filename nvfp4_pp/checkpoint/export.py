"""One rank's calibrated stage -> quantized tensors under their real global names.

The numbers come from modelopt's own export code (the per-module function its single-process
`export_hf_checkpoint` calls for every quantized Linear, and the same fusion steps before it), so
each stage's tensors equal the one-process export's, for every scheme a recipe produces (NVFP4,
NVFP4-AWQ, W4A16 NVFP4, FP8, MXFP4, INT4) and for KV-cache scales.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import torch
from torch import nn

from nvfp4_pp.errors import CalibrationError
from nvfp4_pp.checkpoint.formats import CheckpointFormat
from nvfp4_pp.checkpoint.linear_stats import PendingStats, linear_stats, read_back
from nvfp4_pp.log import logger
from nvfp4_pp.progress import Progress
from nvfp4_pp.runtime.host_malloc import give_back_freed_memory
from nvfp4_pp.records import ExportResult
from nvfp4_pp.sizes import EXPORT_CHUNK_ELEMENTS, EXPORT_QUEUE_LAYERS
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import Stage
from nvfp4_pp.checkpoint.writer import ShardWriter

STATIC_INPUT_SCALE = ("nvfp4", "nvfp4_awq", "fp8")
"""Schemes whose input scale comes from calibration (MXFP4 scales its inputs per block at run time)."""
COPY_THREADS = 4
"""Threads moving a packed layer from pinned to pageable memory (first-touching fresh pages is the cost)."""
COPY_SLICE_BYTES = 32 * 2**20
KV_CACHE_MAX_BOUND = 448.0
"""modelopt's KV-cache scale is amax / 448 (the FP8 E4M3 maximum) for its FP8 KV format."""


def _quant_linears(stage: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The stage's quantized Linears (modelopt's QuantLinear, an nn.Linear), by name."""
    from modelopt.torch.export.layer_utils import is_quantlinear
    from modelopt.torch.export.quant_utils import QUANTIZATION_NONE, get_quantization_format

    for name, module in stage.named_modules():
        if is_quantlinear(module) and get_quantization_format(module) != QUANTIZATION_NONE:
            yield name, cast(nn.Linear, module)


@dataclasses.dataclass(frozen=True, slots=True)
class SharedInputGroup:
    """Linears of one decoder layer that read the same input (q/k/v, gate/up), by local name, and the
    layernorm that produces that input (None if it is not a layernorm's output)."""

    linears: tuple[str, ...]
    layernorm: str | None


def _layer_signature(layer: nn.Module) -> tuple:
    """What decides a layer's shared-input groups: its layernorms and its Linears with an enabled quantizer
    (modelopt's discovery hooks exactly these), by local name and class."""
    from modelopt.torch.export.layer_utils import is_layernorm, is_quantlinear
    from modelopt.torch.export.unified_export_hf import _is_enabled_quantizer

    return tuple((name, type(m).__name__) for name, m in layer.named_modules()
                 if is_layernorm(m) or (is_quantlinear(m) and (_is_enabled_quantizer(m.input_quantizer)
                                                               or _is_enabled_quantizer(m.weight_quantizer))))


def discover_shared_inputs(stage: Stage, index: int, layer: nn.Module) -> tuple[SharedInputGroup, ...]:
    """A decoder layer's shared-input groups, found as modelopt finds them: by hooking a dummy forward
    of the layer (quantizers off). Every group lies inside one decoder layer, and layers of the same
    signature have the same groups, so a stage runs this once per signature (`StageExporter`)."""
    from modelopt.torch.export.unified_export_hf import collect_shared_input_modules

    weight = next(layer.parameters())
    x = torch.zeros((1, 2, stage.hf_config.hidden_size), dtype=weight.dtype, device=weight.device)
    context = stage.context(x)
    input_to_linear, output_to_layernorm = collect_shared_input_modules(
        layer, lambda: stage.run_layer(index, layer, x, context), collect_layernorms=True)
    names = {id(m): name for name, m in layer.named_modules()}
    groups = []
    for tensor, modules in input_to_linear.items():
        if len(modules) > 1:
            norm = output_to_layernorm.get(tensor) if tensor in output_to_layernorm else None
            groups.append(SharedInputGroup(tuple(names[id(m)] for m in modules),
                                           None if norm is None else names[id(norm)]))
    return tuple(groups)


def fuse_shared_inputs(layer: nn.Module, groups: tuple[SharedInputGroup, ...]) -> None:
    """Prepare a decoder layer's Linears that read the same input (q/k/v, gate/up) as modelopt's export does.

    vLLM fuses them into one kernel with one global scale; modelopt's export unifies them by
    taking the max amax (FP8 excepted: vLLM requantizes FP8 parts itself). For AWQ it first folds
    pre-quant scales into the previous Linear where shapes allow, and those of a shared input into
    the layernorm before it. `groups` are the layer's (`discover_shared_inputs`), given to modelopt's
    own fusion step as its discovery would.
    """
    from modelopt.torch.export.quant_utils import fuse_prequant_to_linear, get_quantization_format
    from modelopt.torch.export.unified_export_hf import _fuse_shared_input_modules

    scheme = get_quantization_format(layer)
    if scheme is not None and "nvfp4_awq" in scheme:
        fuse_prequant_to_linear(layer)
    input_to_linear: dict[int, list[nn.Module]] = {}
    output_to_layernorm: dict[int, nn.Module] = {}
    for key, group in enumerate(groups):
        input_to_linear[key] = []
        for local in group.linears:
            module = layer.get_submodule(local)
            setattr(module, "name", local)  # modelopt's fusion reads a `name` attribute
            input_to_linear[key].append(module)
        if group.layernorm is not None:
            norm = layer.get_submodule(group.layernorm)
            setattr(norm, "name", group.layernorm)  # (as above)
            output_to_layernorm[key] = norm
    _fuse_shared_input_modules(layer, input_to_linear, output_to_layernorm, fuse_layernorms=True,
                               quantization_format=scheme)


def _nvfp4_in_row_chunks(name: str, module: nn.Linear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
        codes.append(to_quantized_weight(chunk, scale, QUANTIZATION_NVFP4, weight_scale_2, block))
        scales.append(scale)
    return {
        f"{name}.weight": torch.cat(codes),
        f"{name}.weight_scale": torch.cat(scales),
        f"{name}.weight_scale_2": weight_scale_2.float(),
        f"{name}.input_scale": get_activation_scaling_factor(module).squeeze().float(),
    }


def _int4_in_row_chunks(name: str, module: nn.Linear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
                                 QUANTIZATION_INT4_AWQ, None, block)
             for start in range(0, module.weight.shape[0], rows)]
    return {f"{name}.weight": torch.cat(codes), f"{name}.weight_scale": scale}


def quantize_linear(name: str, module: nn.Linear, dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]]:
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
        if k_q is None or v_q is None or not (k_q.is_enabled or v_q.is_enabled):  # modelopt makes both or neither
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

    A layer handed to `layer()` is exported by a thread of its own, off the caller's critical path:
    on a GPU it is packed on a CUDA stream of its own (after the compute stream's work on it), the
    layer is released (a streaming stage frees it) as soon as every kernel reading it is queued, the
    packed tensors are copied asynchronously into pinned host memory, and once there the thread
    moves them to pageable memory and hands them to the ShardWriter. At most `EXPORT_QUEUE_LAYERS` layers wait for the thread: when the disk is
    slower than the compute, the writer blocks the thread and `layer()` blocks the caller
    (back-pressure) instead of letting memory grow. Each layer is packed from its own tensors with
    modelopt's functions, so the bytes do not depend on the overlap. Shared-input groups are found
    once per layer signature (a dummy forward of the first such layer), not per layer.

    Tensors the stage holds are written from it (AWQ folds scales into layernorms; everything else
    there equals the source), the rest (lm_head, final norm) are copied from the source.
    """

    def __init__(self, stage: Stage, owned: list[str], source: SourceCheckpoint, fmt: CheckpointFormat,
                 writer: ShardWriter, device: torch.device):
        self.stage, self.owned, self.source, self.fmt, self.writer = stage, owned, source, fmt, writer
        self.owned_set = set(owned)
        self.schemes: dict[str, str] = {}
        self.stats: dict[str, PendingStats] = {}
        """Each Linear's error and amax as device scalars, read back once in `finish`."""
        self.kv_formats: set[str] = set()
        self.written: set[str] = set()
        self.started = time.perf_counter()
        self.groups: dict[tuple, tuple[SharedInputGroup, ...]] = {}
        """Shared-input groups per layer signature (discovered once each)."""
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.busy_seconds = 0.0
        """Seconds the export thread worked (packing, copies, waiting for the writer), overlapping the caller."""
        # Sized from the source (a streaming stage's layers are not loaded yet): its layers' 2-D weights.
        prefixes = tuple(stage.layer_prefixes())
        linears = [n for n in owned if n.startswith(prefixes) and n.endswith(".weight") and len(source.shape(n)) == 2]
        self.progress = Progress("export", sum(source.nbytes(n) for n in linears), "GB", scale=1e9,
                                 steps=len(linears), step_unit="Linears")
        self._queue: queue.Queue = queue.Queue(EXPORT_QUEUE_LAYERS)
        self._error: BaseException | None = None
        self._counts = threading.Condition()
        self._queued = self._packed = 0
        self._handoff: queue.Queue = queue.Queue(EXPORT_QUEUE_LAYERS)
        """Packed layers on their way to pinned memory, waiting for the copy-out thread."""
        self._copiers = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="copy-out") if self.stream else None
        self._thread = threading.Thread(target=self._work, name="layer-export", daemon=True)
        self._copier = threading.Thread(target=self._copy_out, name="layer-copy-out", daemon=True)
        self._thread.start()
        self._copier.start()

    def layer(self, index: int, layer: nn.Module,
              release: Callable[[nn.Module, torch.cuda.Event | None], None] | None = None) -> None:
        """Queue decoder layer `index` for export (blocking while the queue is full); its weights are
        freed as they are packed. `release(layer, packed)` is called from the export thread once every
        kernel reading the layer is queued (`packed`: their event on a GPU): a streaming stage frees it."""
        self._raise()
        ready = None
        if self.stream is not None:  # the calibration's kernels on this layer come first
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.stream.device))
        with self._counts:
            self._queued += 1
        self._queue.put((index, layer, ready, release))

    def wait_packed(self) -> None:
        """Until every queued layer is packed (its quantizers final, its kernels queued and the layer
        released); its host copies may still be on their way to the writer."""
        with self._counts:
            self._counts.wait_for(lambda: self._packed == self._queued or self._error is not None)
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        """The export thread: layers in order until `None`; after a failure it only drains the queue."""
        while (item := self._queue.get()) is not None:
            index, layer, ready, release = item
            released = []

            def release_once(module: nn.Module, packed: torch.cuda.Event | None) -> None:
                released.append(True)
                if release is not None:
                    release(module, packed)

            t0 = time.perf_counter()
            try:
                if self._error is None:
                    with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                        self._export_layer(index, layer, ready, release_once)
            except BaseException as e:  # raised in the caller's thread at its next call
                self._fail(e)
            finally:  # a failed or skipped layer is released too: a read waiting for its slot must not hang
                if not released:
                    release_once(layer, None)
            self.busy_seconds += time.perf_counter() - t0
        self._handoff.put(None)

    def _fail(self, error: BaseException) -> None:
        self._error = self._error or error
        with self._counts:
            self._counts.notify_all()

    def _copy_out(self) -> None:
        """The copy-out thread: each packed layer, once in pinned memory, moved to pageable memory (a few
        threads at once: first-touching fresh pages runs at about 1 GB/s a thread) and handed to the writer,
        while the export thread packs the next layer."""
        while (item := self._handoff.get()) is not None:
            if self._error is None:
                try:
                    self._write_layer(*item)
                except BaseException as e:
                    self._fail(e)

    def _export_layer(self, index: int, layer: nn.Module, ready: torch.cuda.Event | None,
                      release: Callable[[nn.Module, torch.cuda.Event | None], None]) -> None:
        started = time.perf_counter()
        if ready is not None:  # recorded on the compute stream only when this exporter has a stream of its own
            assert self.stream is not None
            self.stream.wait_event(ready)
        signature = _layer_signature(layer)
        if signature not in self.groups:  # a dummy forward on the export stream, once per signature
            self.groups[signature] = discover_shared_inputs(self.stage, index, layer)
        prefix = self.stage.layer_prefix(index)
        fuse_shared_inputs(layer, self.groups[signature])
        dtype = next(layer.parameters()).dtype
        packed: list[tuple[str, str, dict[str, torch.Tensor], int]] = []
        for local, module in _quant_linears(layer):
            name = f"{prefix}.{local}"
            setattr(module, "name", name)  # modelopt's export reads a `name` attribute
            weight = module.weight  # packing replaces the parameter; the BF16 tensor is measured against
            scheme, tensors = quantize_linear(name, module, dtype)
            packed.append((name, scheme, tensors, weight.numel() * weight.element_size()))
            self.written.update(tensors)
            self.stats[name] = linear_stats(name, module, weight, scheme, tensors)
            self.schemes[name] = scheme
            if self.stream is not None:  # allocated for another stream: kept until this one is done with it
                weight.record_stream(self.stream)
            del weight, tensors
            # Free the packed weight once written: peak memory stays near the stage's weights.
            module.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=module.weight.device), requires_grad=False)
        kv_format, kv = kv_cache_scales(layer, prefix)
        held = self._held(layer, f"{prefix}.")
        done = None
        if self.stream is not None:  # every kernel reading the layer's weights is queued
            done = torch.cuda.Event()
            done.record(self.stream)
        if self.stream is not None:
            for tensor in [*layer.parameters(), *layer.buffers()]:
                if tensor.device.type == "cuda":
                    tensor.record_stream(self.stream)
        release(layer, done)
        give_back_freed_memory()  # the packing temporaries' (and on a CPU stage the calibration's) freed pages
        with self._counts:
            self._packed += 1
            self._counts.notify_all()
        packed_at = time.perf_counter()
        # Asynchronous copies into pinned memory on the export stream; the copy-out thread moves them to
        # pageable memory for the writer, so the pinned blocks are reused layer after layer (pinning the
        # writer's gigabytes as it holds them cost 0.3-0.8 s a layer on an H200).
        staged = [(name, scheme, _to_pinned(tensors, self.stream), nbytes) for name, scheme, tensors, nbytes in packed]
        kv, held = _to_pinned(kv, self.stream), _to_pinned(held, self.stream)
        del packed
        copied = None
        if self.stream is not None:
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self._handoff.put((index, started, packed_at, staged, kv_format, kv, held, copied))

    def _write_layer(self, index: int, started: float, packed_at: float, staged: list, kv_format: str | None,
                     kv: dict[str, torch.Tensor], held: dict[str, torch.Tensor],
                     copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        for name, scheme, tensors, nbytes in staged:
            self.writer.add(self.fmt.linear_tensors(name, scheme, _pageable(tensors, self._copiers)))
            self.progress.advance(nbytes)
        if kv:
            assert kv_format is not None, "K/V scales come with their format"
            self.kv_formats.add(kv_format)
            self.writer.add(self.fmt.kv_cache_tensors(_pageable(kv, self._copiers)))
        held = _pageable(held, self._copiers)
        self.writer.add(held)
        self.written.update(held)
        logger.info("layer %d exported in %.2f s (pack %.2f by the export thread; copy to host and hand to the "
                    "writer %.2f by the copy-out thread)", index, time.perf_counter() - started,
                    packed_at - started, time.perf_counter() - packed_at)

    def _held(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """Norms and other unquantized tensors, copied: on a CPU stage they are views into the memory
        map of the shard their layer was read from, which the writer's buffer would keep alive (a
        streaming stage would then hold every layer it has freed)."""
        return {f"{prefix}{k}": v.detach().clone() for k, v in module.state_dict().items()
                if f"{prefix}{k}" in self.owned_set and f"{prefix}{k}" not in self.written}

    def wait(self) -> None:
        """Until every queued layer is exported (packed and handed to the writer); its failure raised."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
            self._copier.join()
            if self._copiers is not None:
                self._copiers.shutdown()
        self._raise()

    def finish(self, lm_head: str | None) -> ExportResult:
        """Everything else the rank owns; `lm_head` is the head's module name on the last rank (listed
        as BF16), None elsewhere."""
        self.wait()
        held = self._held(self.stage, "")
        self.writer.add(held)
        self.written.update(held)
        rest = [n for n in self.owned if n not in self.written]
        for start in range(0, len(rest), 64):
            self.writer.add(self.source.load(rest[start : start + 64], "cpu"))
        self.writer.close()
        total = sum(s.bytes for s in self.writer.shards)
        logger.info("export: %d Linears packed and %.2f GB written in %.1f s (export thread busy %.1f s packing "
                    "and copying; writer threads busy %.1f s writing and checksumming)", len(self.schemes),
                    total / 1e9, time.perf_counter() - self.started, self.busy_seconds, self.writer.write_seconds)
        if len(self.kv_formats) > 1:
            raise RuntimeError(f"layers of one stage got different KV-cache formats {sorted(self.kv_formats)}")
        excluded = excluded_modules(self.owned, self.source, self.schemes, lm_head)
        return ExportResult(tuple(self.writer.shards), self.schemes, next(iter(self.kv_formats), None), excluded,
                            embedding_modules(self.stage, excluded), read_back(self.stats))


def _to_pinned(tensors: dict[str, torch.Tensor], stream: torch.cuda.Stream | None) -> dict[str, torch.Tensor]:
    """Device tensors copied into pinned host memory on `stream`, asynchronously (read them after the
    stream is synchronized); host tensors as they are."""
    out = {}
    for name, tensor in tensors.items():
        if stream is None or tensor.device.type != "cuda":
            out[name] = tensor.detach().to("cpu")
            continue
        out[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out[name].copy_(tensor.detach(), non_blocking=True)
    return out


def _pageable(tensors: dict[str, torch.Tensor], pool: ThreadPoolExecutor | None) -> dict[str, torch.Tensor]:
    """Pinned tensors copied to pageable memory by `pool`'s threads, in slices of COPY_SLICE_BYTES (their
    pinned blocks go back to torch's cache); others as they are."""
    out, copies = {}, []
    for name, t in tensors.items():
        if pool is None or not t.is_pinned():
            out[name] = t
            continue
        out[name] = torch.empty(t.shape, dtype=t.dtype)
        src, dst = t.reshape(-1), out[name].reshape(-1)
        step = max(1, COPY_SLICE_BYTES // t.element_size())
        copies += [pool.submit(dst[i : i + step].copy_, src[i : i + step]) for i in range(0, src.numel(), step)]
    for copy in copies:
        copy.result()
    return out


def export_stage(stage: Stage, owned: list[str], source: SourceCheckpoint, fmt: CheckpointFormat,
                 writer: ShardWriter, lm_head: str | None, device: torch.device) -> ExportResult:
    """Write this rank's tensors (a resident stage: every layer calibrated already)."""
    exporter = StageExporter(stage, owned, source, fmt, writer, device)
    for index, layer in stage.layers():
        exporter.layer(index, layer)
    return exporter.finish(lm_head)
