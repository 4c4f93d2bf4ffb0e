"""GPTQ at the cost of its arithmetic: modelopt 0.47's algorithm, each column quantized on its own.

modelopt's unfused `gptq_blockwise_update` fake-quantizes the whole weight matrix once per column and
keeps that column: O(in² × out) memory traffic, 66 s for one Llama-70B layer on an H200 (INT4), where
the arithmetic is a few seconds. After GPTQ's max calibration the weight quantizer's block scales are
static, so a column's quantized values depend on that column and its blocks' scales alone. Here each
column goes through the very function modelopt's quantizer calls (`fake_tensor_quant` for INT4,
`static_blockwise_fp4_fake_quant` for NVFP4) given only those scales: O(in × out) in all.

Every other step is modelopt's own: `max_calibrate`, the Hessians (its `GPTQHelper` hooks, weight
quantizers off), `compute_hessian_inverse`, and the update's floating-point operations one for one
(the same products with the same shapes), so the weights are byte-identical to modelopt's GPTQ
(tests/test_gptq.py against `gptq_blockwise_update`; tests/test_algorithms.py end to end).

Linears that read the same input (q/k/v, gate/up) collect equal Hessians: one inverse serves them
and their columns are solved in one pass, rows stacked (GPTQ treats rows independently; only the
elementwise steps see the stack, each Linear's block update keeps its own matrix product).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from nvfp4_pp.log import logger
from nvfp4_pp.progress import Progress

if TYPE_CHECKING:  # modelopt ships no type information: mypy reads its quantizer as Any
    from modelopt.torch.quantization.nn import TensorQuantizer

@dataclass
class SolveTimes:
    """Where GPTQ's solve time went, for the log and the run record: seconds per Linear (its share of
    its group's inverse and update), and of all inverses."""

    linears: dict[str, float] = field(default_factory=dict)
    inverse_s: float = 0.0
    inverses: int = 0
    """Damped inverses computed: one per group of Linears that share an input."""
    prefix: str = ""
    """Put before each Linear's name (the layer's, when gptq() sees one layer at a time)."""
    progress: Progress | None = None
    """A progress line over many gptq() calls (a stage solved layer by layer); else one per call."""

    def per_layer(self) -> dict[int, float]:
        """Seconds per decoder layer (from `layers.<i>.` in the Linears' names)."""
        out: dict[int, float] = {}
        for name, seconds in self.linears.items():
            found = _LAYER.search(name)
            if found:
                out[int(found.group(1))] = out.get(int(found.group(1)), 0.0) + seconds
        return out


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ColumnQuantizer:
    """The fake quantization modelopt's weight quantizers apply, for one column at a time of their
    Linears' weights stacked by rows, from that column's quantization group alone.

    - static blocks along the input (INT4; NVFP4 with static two-level scales): the column with its
      group's amaxes, through `fake_tensor_quant` / `static_blockwise_fp4_fake_quant`;
    - NVFP4 with dynamic block scales (the nvfp4 and w4a16_nvfp4 recipes): a block's scale comes from
      its current values, so the column's whole group of 16, as it stands in the GPTQ block being
      solved, goes through `dynamic_block_quant`, and the column is kept.

    `start_block(start)` puts the amaxes of the GPTQ block at column `start` where the calls read
    them (one buffer for every block: what a CUDA graph of the block replays).
    """

    def __init__(self, kind: str, quantizers: list[TensorQuantizer], rows: list[int], block_size: int):
        first = quantizers[0]
        self.kind, self.group, self.first = kind, first.block_sizes[-1], first
        self.amax: torch.Tensor | None = None
        self.block_amax: torch.Tensor | None = None
        if kind != "dynamic_fp4":
            # per quantization group, every stacked row's amax, contiguous (the kernels index it flat)
            self.amax = torch.cat([q._amax.reshape(r, -1) for q, r in zip(quantizers, rows)]).t().contiguous()
            self.block_amax = torch.empty_like(self.amax[:block_size // self.group]).unsqueeze(-1)

    def start_block(self, start: int) -> None:
        if self.amax is not None:
            assert self.block_amax is not None  # set with amax
            amax = self.amax[start // self.group:][:len(self.block_amax)]  # a last block may be narrower
            self.block_amax[:len(amax)].copy_(amax.unsqueeze(-1))

    def __call__(self, work: torch.Tensor, i: int) -> torch.Tensor:
        from modelopt.torch.quantization.tensor_quant import (dynamic_block_quant, fake_tensor_quant,
                                                             static_blockwise_fp4_fake_quant)
        from modelopt.torch.quantization.utils.numeric_utils import fp8_max_for_normalization

        q, group = self.first, self.group
        if self.kind == "dynamic_fp4":
            g0 = i - i % group  # blocks start on a group (block_size is a multiple of it)
            values = work[:, g0:g0 + group].contiguous()  # [rows, group], as it stands now
            return dynamic_block_quant(values, group, q._amax, None, q._num_bits, q.block_sizes["scale_bits"],
                                       q._trt_high_precision_dtype, getattr(q, "_onnx_quantizer_type", None),
                                       q._pass_through_bwd)[:, i - g0]
        assert self.block_amax is not None  # static kinds have block amaxes
        column, amax = work[:, i:i + 1].contiguous(), self.block_amax[i // group]
        if self.kind == "int":
            return fake_tensor_quant(column, amax, None, q._num_bits, q._unsigned, q._narrow_range,
                                     q._trt_high_precision_dtype, q._pass_through_bwd, group, 0).squeeze(-1)
        return static_blockwise_fp4_fake_quant(column, amax, q.global_amax, True, fp8_max_for_normalization(q),
                                               work.dtype, q._pass_through_bwd).squeeze(-1)


def column_quantizer(quantizers: list[TensorQuantizer], rows: list[int], in_features: int,
                     block_size: int) -> ColumnQuantizer | None:
    """A `ColumnQuantizer` for these Linears' weight quantizers stacked by rows; None where a column
    is not known to quantize from its group alone, or the quantizers do not stack (then each Linear
    goes alone, or through modelopt's own update)."""
    first = quantizers[0]
    kind = _block_kind(first, in_features)
    if kind is None or block_size % first.block_sizes[-1] or any(
            _block_kind(q, in_features) != kind or _settings(q) != _settings(first) for q in quantizers):
        return None
    if kind == "dynamic_fp4" and not all(torch.equal(q._amax, first._amax) for q in quantizers):
        return None  # per-tensor amaxes (the second-level scale) differ
    if kind == "fp4" and len({float(q.global_amax) for q in quantizers}) != 1:
        return None
    return ColumnQuantizer(kind, quantizers, rows, block_size)


def _block_kind(q: TensorQuantizer, in_features: int) -> str | None:
    """"int" (INT4 static blocks), "fp4" (NVFP4 two-level static blocks), "dynamic_fp4" (NVFP4 blocks
    scaled from their values) or None (anything else: modelopt's own update)."""
    sizes = q.block_sizes or {}
    group = sizes.get(-1)
    if (not q.is_static_block_quant and sizes.get("type") == "dynamic" and q._num_bits == (2, 1)
            and sizes.get("scale_bits") == (4, 3) and set(sizes) == {-1, "type", "scale_bits"} and group
            and in_features % group == 0 and q._fake_quant and getattr(q, "_amax", None) is not None
            and q.backend is None and q.bias_calibrator is None and q.pre_quant_scale is None
            and not q.rotate_is_enabled and not q._use_constant_amax):
        return "dynamic_fp4"
    plain = (q.is_static_block_quant and set(sizes) <= {-1, "type", "scale_bits"} and group
             and in_features % group == 0 and getattr(q, "_amax", None) is not None and q.backend is None
             and q.bias_calibrator is None and q.pre_quant_scale is None and not q.rotate_is_enabled
             and not q._use_constant_amax and not getattr(q, "_lsq", False)
             and not getattr(q, "_padding", None))
    if not plain:
        return None
    if isinstance(q._num_bits, int) and sizes.get("scale_bits") is None:
        return "int"
    if getattr(q, "_is_nvfp4_static_quantizer", False) and q.is_nvfp4_static and q.global_amax is not None:
        return "fp4"
    return None


def _settings(q: TensorQuantizer) -> tuple:
    return (q._num_bits, q._unsigned, q._narrow_range, q._trt_high_precision_dtype, q._pass_through_bwd,
            tuple(sorted((str(k), str(v)) for k, v in q.block_sizes.items())))


def solve(weight: torch.Tensor, h_inv: torch.Tensor, block_size: int, quantize: ColumnQuantizer,
          stacked: list[int] | None = None, graphs: bool = True) -> None:
    """GPTQ's lazy-batch update of `weight` [rows, in] (FP32, in place) as modelopt's
    `gptq_blockwise_update` does it, each column quantized from its group alone.

    The operations are modelopt's one for one, in its layouts (a CPU's vector and scalar loops may
    round a fused multiply-add differently: a transposed block gave other bytes), on the block's
    columns only. The update of the columns after the block is modelopt's matrix product with
    modelopt's shapes, once per Linear of the stack (`stacked`: their row counts): one product over
    all stacked rows may be computed in another order. On a GPU (`graphs`) the per-column steps of a
    block are recorded once as a CUDA graph and replayed for every full block: the same kernels on
    the same values, without a launch from Python per step.
    """
    rows, columns = weight.shape
    bounds = _row_bounds(stacked or [rows])
    work = torch.empty(rows, block_size, dtype=weight.dtype, device=weight.device)
    errors = torch.empty_like(work)
    quantized = torch.empty_like(work)
    # the graph's copy of a block of the inverse keeps its layout (modelopt's is column-major, a transposed
    # Cholesky factor): a CPU's addr fuses the multiply-add for a contiguous row, not for a strided one
    h_block = torch.empty(block_size, block_size, dtype=h_inv.dtype, device=h_inv.device)
    if h_inv.stride(0) == 1 and h_inv.stride(1) != 1:
        h_block = h_block.t()
    graph = None
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        n = end - start
        quantize.start_block(start)
        if n < block_size:  # a last, narrower block: views of its width
            block = (weight[:, start:end].clone(), torch.zeros_like(errors[:, :n]), quantized[:, :n],
                     h_inv[start:end, start:end])
            _block_steps(*block, quantize)
            weight[:, start:end] = block[2]
            errors_used = block[1]
        else:
            work.copy_(weight[:, start:end])
            if graph is None and graphs and weight.is_cuda and start > 0:  # after one eager block (kernels built)
                graph = _record(lambda: _block_steps(work, errors, quantized, h_block, quantize), weight.device)
            if graph is not None:
                h_block.copy_(h_inv[start:end, start:end])
                graph.replay()
            else:
                _block_steps(work, errors, quantized, h_inv[start:end, start:end], quantize)
            weight[:, start:end] = quantized
            errors_used = errors
        if end < columns:
            for a, b in bounds:
                weight[a:b, end:].addmm_(errors_used[a:b], h_inv[start:end, end:], alpha=-1)


def _block_steps(work: torch.Tensor, errors: torch.Tensor, quantized: torch.Tensor, h_block: torch.Tensor,
                 quantize: ColumnQuantizer) -> None:
    """modelopt's column loop over one block: quantize, keep, error, spread it over the columns after."""
    for i in range(work.shape[1]):
        q = quantize(work, i)
        quantized[:, i] = q
        error = (work[:, i] - q) / h_block[i, i]
        work[:, i:].addr_(error, h_block[i, i:], alpha=-1)
        errors[:, i] = error


def _record(steps: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph | None:
    """`steps` recorded as a CUDA graph (nothing runs while recording); None where recording fails."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls unaffected
            steps()
    except RuntimeError as e:
        logger.debug("GPTQ: the block's steps could not be recorded as a CUDA graph (%s); running them eagerly", e)
        return None
    return graph


def _row_bounds(counts: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for n in counts:
        out.append((a, a + n))
        a += n
    return out


@torch.no_grad()
def gptq(model: nn.Module, forward_loop: Callable[[nn.Module], None], perc_damp: float = 0.01,
         block_size: int = 128, fused: bool = False, times: SolveTimes | None = None,
         keep_scales: bool = False) -> None:
    """modelopt 0.47's `gptq()` (same signature, same steps, same bytes) with this module's solve.

    With `fused`, Linears modelopt would give its fused NVFP4 kernel keep it; Linears whose quantizer
    this module does not know are updated by modelopt's own `GPTQHelper`. `keep_scales`: the quantizers
    were calibrated by a scale search (a stack's step before GPTQ): no max calibration first, GPTQ rounds
    to the searched block scales (modelopt's GPTQ always starts from max's)."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context
    from modelopt.torch.quantization.model_calib import max_calibrate
    from modelopt.torch.quantization.utils import is_quantized_linear
    from modelopt.torch.quantization.utils.calib_utils import GPTQHelper

    if not keep_scales:
        max_calibrate(model, forward_loop=forward_loop)
    linears = [(n, m) for n, m in model.named_modules()
               if is_quantized_linear(m) and m.weight_quantizer.is_enabled]
    if not linears:
        return
    helpers = [GPTQHelper(m, n, offload_to_cpu=True, fused=fused) for n, m in linears]
    for helper in helpers:
        helper.setup()
    try:
        with set_quantizer_by_cfg_context(model, [{"quantizer_name": "*weight_quantizer", "enable": False}]):
            forward_loop(model)
    finally:
        for helper in helpers:
            helper.cleanup()
    times = times if times is not None else SolveTimes()
    progress = times.progress or Progress("GPTQ solve", sum(m.weight.numel() for _, m in linears), "M weights",
                                          scale=1e6, steps=len(linears), step_unit="Linears")
    for group in shared_input_groups(helpers, block_size):
        solve_group(group, block_size, perc_damp, times, progress)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def solve_progress(stage, solved: set[int]) -> Progress:
    """One progress line (rate, ETA) over the GPTQ solves of a stage's layers not `solved` before."""
    from modelopt.torch.quantization.utils import is_quantized_linear

    linears = [m for index, layer in stage.layers() if index not in solved for m in layer.modules()
               if is_quantized_linear(m) and m.weight_quantizer.is_enabled]
    return Progress("GPTQ solve", sum(m.weight.numel() for m in linears), "M weights", scale=1e6,
                    steps=len(linears), step_unit="Linears")


def shared_input_groups(helpers: list, block_size: int) -> list[list]:
    """The Linears in groups that share one damped inverse: equal Hessians (the same input) and equal
    all-zero weight columns, each quantizer one this module solves; every other Linear alone (modelopt's
    fused NVFP4 kernel and quantizers this module does not know: modelopt's own update). Each group
    stands where its first member was."""
    groups: list[list] = []
    for helper in helpers:
        if _own_quantizer(helper, block_size) is None:
            groups.append([helper])
            continue
        for group in groups:
            if _own_quantizer(group[0], block_size) is not None and _same_input(group[0], helper):
                group.append(helper)
                break
        else:
            groups.append([helper])
    return groups


def _own_quantizer(helper, block_size: int) -> ColumnQuantizer | None:
    module = helper.module
    if helper.fused and getattr(module.weight_quantizer, "_is_nvfp4_static_quantizer", False):
        return None  # modelopt's fused kernel, as modelopt would run it
    return column_quantizer([module.weight_quantizer], [module.weight.shape[0]], module.weight.shape[-1], block_size)


def _same_input(a, b) -> bool:
    """Equal Hessians and equal all-zero weight columns: one damped inverse serves both."""
    return (a.hessian.shape == b.hessian.shape and a.hessian.device == b.hessian.device
            and a.module.weight.device == b.module.weight.device and torch.equal(a.hessian, b.hessian)
            and torch.equal(a.module.weight.eq(0).all(dim=0), b.module.weight.eq(0).all(dim=0)))


def rows_stack_exactly(device: torch.device) -> bool:
    """Whether stacking Linears' rows leaves every elementwise result as it is alone. A GPU computes
    each element alike; a CPU splits an elementwise loop among its threads by element count, and where
    a split falls decides which elements take the vector or the scalar loop, which round a fused
    multiply-add differently (seen: other bytes with 2 threads). One thread splits nothing."""
    return device.type == "cuda" or torch.get_num_threads() == 1


def solve_group(group: list, block_size: int, perc_damp: float, times: SolveTimes, progress: Progress) -> None:
    """One damped inverse of the group's shared Hessian; its Linears solved together (rows stacked) where
    that is exact, else one after another; weights written back."""
    from modelopt.torch.quantization.utils.calib_utils import compute_hessian_inverse

    started = time.perf_counter()
    if _own_quantizer(group[0], block_size) is None:  # modelopt's own update
        helper = group[0]
        helper.update_weights(block_size, perc_damp)
        helper.free()
        _done(group, times, progress, started, 0.0)
        return
    modules = [h.module for h in group]
    in_features, device = modules[0].weight.shape[-1], modules[0].weight.device
    stacked = None
    if len(group) > 1 and rows_stack_exactly(device):
        stacked = column_quantizer([m.weight_quantizer for m in modules], [m.weight.shape[0] for m in modules],
                                   in_features, block_size)
    parts = [(modules, stacked)] if stacked else [([m], _own_quantizer(h, block_size)) for h, m in zip(group, modules)]
    hessian = group[0].hessian.to(device)
    for helper in group:
        helper.free()
    # dead columns are those of every member (checked equal): the first's weight stands for all
    h_inv = compute_hessian_inverse(hessian, modules[0].weight.data.float(), perc_damp)
    del hessian
    inverse_s = _now(device) - started
    for members, quantize in parts:
        rows = [m.weight.shape[0] for m in members]
        weight = torch.empty(sum(rows), in_features, dtype=torch.float32, device=device)
        for (a, b), module in zip(_row_bounds(rows), members):
            weight[a:b].copy_(module.weight.data.reshape(b - a, in_features))
        assert quantize is not None  # shared_input_groups puts only Linears this module solves in a group
        solve(weight, h_inv, block_size, quantize, rows)
        for (a, b), module in zip(_row_bounds(rows), members):
            module.weight.data = weight[a:b].reshape(module.weight.shape).to(module.weight.dtype)
        del weight
    del h_inv
    _done(group, times, progress, started, inverse_s)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()


def _done(group: list, times: SolveTimes, progress: Progress, started: float, inverse_s: float) -> None:
    """Each Linear's share of the group's time (by rows) into `times`, and a progress step per Linear."""
    elapsed = _now(group[0].module.weight.device) - started
    total_rows = sum(h.module.weight.shape[0] for h in group)
    times.inverse_s += inverse_s
    times.inverses += 1
    for helper in group:
        times.linears[times.prefix + helper.name] = elapsed * helper.module.weight.shape[0] / total_rows
        progress.advance(helper.module.weight.numel())
    if len(group) > 1:
        logger.debug("GPTQ: %s share one input: one inverse (%.2f s), solved together in %.2f s",
                    ", ".join(h.name for h in group), inverse_s, elapsed)
