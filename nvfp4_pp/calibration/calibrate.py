"""modelopt glue: insert quantizers on a stage and calibrate them through the pipeline."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from nvfp4_pp.algorithms.table import ALGORITHMS, CUDA_ONLY, KV_CACHES, RECIPES
from nvfp4_pp.config import ConfigError
from nvfp4_pp.errors import CalibrationError
from nvfp4_pp.algorithms.gptq import SolveTimes
from nvfp4_pp.log import logger
from nvfp4_pp.records import Health

if TYPE_CHECKING:
    from nvfp4_pp.model.stage import Stage

_LINEAR_QUANTIZERS = ("*weight_quantizer", "*input_quantizer")


def _preset(name: str) -> dict:
    import modelopt.torch.quantization as mtq

    return copy.deepcopy(getattr(mtq, name))


def _linear_entries(recipe: str) -> dict[str, dict]:
    """`recipe`'s own `*weight_quantizer` / `*input_quantizer` entries (those its preset has)."""
    return {e["quantizer_name"]: e for e in _preset(RECIPES[recipe].preset)["quant_cfg"]
            if e.get("quantizer_name") in _LINEAR_QUANTIZERS}


def _pattern_entries(recipe: str, pattern: str) -> list[dict]:
    """`recipe`'s weight and input quantizer settings, restricted to modules matching `pattern`."""
    entries = _linear_entries(recipe)
    out = []
    for name in _LINEAR_QUANTIZERS:
        scoped = f"{pattern}.{name.lstrip('*')}"
        entry = entries.get(name)
        out.append({**entry, "quantizer_name": scoped} if entry else {"quantizer_name": scoped, "enable": False})
    return out


def modelopt_config(recipe: str = "nvfp4", overrides: Mapping[str, str] | None = None,
                    ignore: list[str] | tuple[str, ...] = (), kv_cache: str | None = None,
                    algorithm: str = "max", options: dict | None = None) -> dict:
    """modelopt's config for `recipe` (+ per-module overrides, ignored modules, KV cache), sync off;
    `algorithm` other than max replaces the recipe's calibration method, with modelopt's `options`
    (GPTQ: perc_damp, block_size; config.py checks which recipes each fits).

    modelopt all-reduces every amax over the data-parallel group, which is the whole world once
    torch.distributed is up: in a pipeline that would mix amaxes of different layers across ranks.
    Each stage's statistics are already complete, so the sync must not run. `overrides` maps module
    name patterns (`*mlp*`) to recipes; `ignore` lists module names or patterns left in BF16. Both
    are placed after the recipe's own quantizer entries and before its exclusions (lm_head, routers,
    vision towers), which therefore always win.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid options are {list(RECIPES)}")
    overrides = {**RECIPES[recipe].mix, **(overrides or {})}  # a mix: every Linear pattern overridden
    cfg = _preset(RECIPES[recipe].preset)
    entries = cfg["quant_cfg"]
    # Exclusions follow the leading "*" disable and the recipe's own Linear settings.
    first_exclusion = next((i for i, e in enumerate(entries) if i > 0 and e.get("enable") is False), len(entries))
    scoped = [e for pattern, name in overrides.items() for e in _pattern_entries(name, pattern)]
    entries[first_exclusion:first_exclusion] = scoped
    entries += [{"quantizer_name": f"{pattern}.*", "enable": False} for pattern in ignore]
    if kv_cache is not None:
        entries += _preset(KV_CACHES[kv_cache])["quant_cfg"]
    methods = {_preset(RECIPES[r].preset)["algorithm"] for r in [recipe, *overrides.values()] if not RECIPES[r].is_mix}
    method = "awq_lite" if "awq_lite" in methods else "max" if "max" in methods or kv_cache else None
    linear = _recipe_linear_settings(recipe)  # before a scale search replaces the weight quantizer's
    scale_search = ALGORITHMS[algorithm].scale_search
    if scale_search is not None:
        search = _preset(scale_search)
        weight = next(e for e in search["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
        for entry in entries:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"] = copy.deepcopy(weight["cfg"])
        cfg["algorithm"] = {**search["algorithm"], "distributed_sync": False}
    steps = ALGORITHMS[algorithm].steps
    if steps:  # a stack: its steps' settings in order (calibration/layerwise.LayerAlgorithm runs them)
        scale_step = cfg["algorithm"] if scale_search is not None else None
        cfg["algorithm"] = [_step_config(step, linear, scale_step, options) for step in steps]
        return cfg
    if scale_search is not None:
        return cfg
    if algorithm != "max":
        method = algorithm
    # GPTQ and AWQ-lite have no distributed_sync switch: their modules get a parallel state without
    # a data-parallel group instead (see `no_data_parallel_group`).
    settings = {"distributed_sync": False} if method == "max" else dict(options or {})
    cfg["algorithm"] = None if method is None else {"method": method, **settings}
    return cfg


def _recipe_linear_settings(recipe: str) -> dict[str, dict | None]:
    """The recipe's own weight and input quantizer settings (None: that quantizer off), for smoothing's search."""
    entries = _linear_entries(recipe)
    return {name: (entries[name].get("cfg") if name in entries and entries[name].get("enable", True) else None)
            for name in _LINEAR_QUANTIZERS}


def _step_config(step: str, linear: dict[str, dict | None], scale_step: dict | None, options: dict | None) -> dict:
    """One step of a stack: smoothing (with the recipe's quantizer settings its search uses), max, the
    scale search, or GPTQ (after a scale search, from that search's scales)."""
    if step == "smooth":
        return {"method": "smooth", "weight": linear["*weight_quantizer"], "input": linear["*input_quantizer"]}
    if step == "max":
        return {"method": "max", "distributed_sync": False}
    if step == "gptq":
        return {"method": "gptq", **(options or {})}
    assert scale_step is not None and scale_step["method"] == step, f"stack step {step} is its scale search"
    return scale_step


def check_algorithm_device(algorithm: str, recipe: str, rank: int, host: str, device: torch.device,
                           auto: bool = False) -> None:
    """A rank whose device cannot run the run's algorithm (or one of auto's candidates) is refused
    before any weight loads."""
    what = CUDA_ONLY.get((algorithm, recipe))
    if what and device.type != "cuda":
        other = f"'auto.candidates' without {algorithm}" if auto else "'algorithm: max'"
        raise ConfigError(f"rank {rank} on host {host} calibrates on {device.type}, but algorithm {algorithm} with "
                          f"recipe {recipe} ({what}) runs on CUDA only in modelopt 0.47; give every rank a CUDA "
                          f"device (pipeline.device) or choose recipe w4a16_int4 or {other}")


def algorithm_options(cfg, algorithm: str) -> dict:
    """modelopt's settings for one of the run's algorithms: GPTQ's damping and block size where given."""
    if algorithm != "gptq" and "gptq" not in ALGORITHMS[algorithm].steps:
        return {}
    named = {"perc_damp": cfg.gptq.damping, "block_size": cfg.gptq.block_size}
    return {k: v for k, v in named.items() if v is not None}


class ValidTokens:
    """Which positions of the micro-batch now running are real tokens; pads never reach an amax.

    The pipeline sets `mask` ([B, T] bool, None when nothing is padded) before each forward. Every
    quantized Linear of a decoder stage sees inputs shaped [B, T, features], so one mask serves
    q/k/v, o_proj, gate/up and down_proj alike.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.unmaskable: list[str] = []

    def set(self, mask: torch.Tensor | None) -> None:
        if mask is not None and self.unmaskable:
            raise CalibrationError(
                f"padded micro-batch, but quantizers {self.unmaskable[:3]} collect statistics that cannot skip "
                "pad positions; use calibration.batch_size: 1 or calibration.pack: true")
        self.mask = mask


def calibrate(stage: Stage, forward_loop: Callable[[torch.nn.Module], None], cfg: dict,
              valid: ValidTokens | None = None, solve_times: SolveTimes | None = None) -> float:
    """Insert the quantizers of modelopt config `cfg` into `stage`; collect statistics inside `forward_loop`.

    The loop must run inside `mtq.quantize`: statistics are gathered only while modelopt drives
    it (a loop run afterwards records nothing, the public Ray pipeline's bug). modelopt may call
    the loop more than once (AWQ-lite: once to cache statistics, once to search scales); every
    rank's modelopt makes the same calls, so each call is one more pass of the whole pipeline.
    KV-cache quantizers go into attention modules only once their class is registered, which
    modelopt does for a `PreTrainedModel` alone: a bare stage needs it done here. GPTQ is modelopt's
    with nvfp4_pp.algorithms.gptq's solve (same bytes; `solve_times` collects its seconds per Linear).
    """
    import modelopt.torch.quantization as mtq

    if _has_kv_quantizers(cfg):
        register_kv_attention(stage)
    method = (cfg.get("algorithm") or {}).get("method")
    valid = valid or ValidTokens()
    marks = [time.perf_counter()]

    def loop(model: torch.nn.Module) -> None:
        marks.append(time.perf_counter())
        no_data_parallel_group(model)
        if method == "max":
            with running_max_collection(model, valid):
                forward_loop(model)
        else:  # modelopt's own statistics (AWQ-lite's search too) cannot skip pads: padded batches refused
            valid.unmaskable = [f"every quantizer ({method} calibration)"]
            forward_loop(model)
        marks.append(time.perf_counter())

    if method == "gptq":
        from nvfp4_pp.calibration.layerwise import LayerAlgorithm

        mtq.quantize(stage, {**cfg, "algorithm": None}, None)
        LayerAlgorithm(cfg["algorithm"], solve_times).calibrate(stage, loop)
    else:
        mtq.quantize(stage, cfg, loop)
    marks.append(time.perf_counter())
    # Where the phase's time goes; returns the seconds spent in the loop(s).
    logger.info("calibration: %.1f s inserting quantizers and reading weight amaxes, %.1f s in %d loop(s), "
                "%.1f s closing statistics", marks[1] - marks[0], marks[-2] - marks[1], (len(marks) - 2) // 2,
                marks[-1] - marks[-2])
    return sum(b - a for a, b in zip(marks[1:-1:2], marks[2:-1:2]))


def load_cuda_extensions(device: torch.device, recipes: set[str]) -> float:
    """modelopt's CUDA extensions for `recipes` (INT4: its fake-quantization kernels; any other: the FP8
    ones too) loaded before calibration, the wait announced: on a machine without them modelopt compiles
    each at first use (about a minute each on an H200), which would otherwise stall the first pass
    without a word. Returns the seconds taken."""
    if device.type != "cuda":
        return 0.0
    from modelopt.torch.quantization.extensions import get_cuda_ext, get_cuda_ext_fp8

    logger.info("modelopt's CUDA extensions: loading (built on first use on a machine: about a minute each)")
    t0 = time.perf_counter()
    get_cuda_ext()
    if any(RECIPES[r].fp8_kernels for r in recipes):
        get_cuda_ext_fp8()
    seconds = time.perf_counter() - t0
    logger.info("modelopt's CUDA extensions: ready in %.1f s", seconds)
    return seconds


def insert_quantizers(stage: Stage, cfg: dict) -> None:
    """modelopt's quantizers of `cfg` in `stage`, uncalibrated (layer-by-layer calibration sets them)."""
    import modelopt.torch.quantization as mtq

    if _has_kv_quantizers(cfg):
        register_kv_attention(stage)
    mtq.quantize(stage, {**cfg, "algorithm": None}, None)


def _has_kv_quantizers(cfg: dict) -> bool:
    return any("bmm_quantizer" in e.get("quantizer_name", "") and e.get("enable", True) for e in cfg["quant_cfg"])


def register_kv_attention(stage: Stage) -> None:
    """Register the stage's attention classes for KV-cache quantizers, as modelopt does for a full model.

    modelopt's hook accepts only a `PreTrainedModel`; a meta-device copy of the model class (no
    memory) holds the same attention classes, and registration is per class.
    """
    from modelopt.torch.quantization.plugins.huggingface import register_hf_attentions_on_the_fly

    from nvfp4_pp.model.stage import model_skeleton

    register_hf_attentions_on_the_fly(model_skeleton(stage.hf_config, stage.arch, torch.bfloat16))


def no_data_parallel_group(model: torch.nn.Module) -> None:
    """Give every quantized module a parallel state without a data-parallel group.

    Algorithms without a sync switch (AWQ-lite) all-reduce statistics over the module's
    data-parallel group, which defaults to the whole world: in a pipeline, other ranks' layers.
    """
    from modelopt.torch.quantization.nn import QuantModule
    from modelopt.torch.utils.distributed import ParallelState

    for module in model.modules():
        if isinstance(module, QuantModule):
            module.parallel_state = ParallelState(data_parallel_group=-1, tensor_parallel_group=-1)


@contextlib.contextmanager
def running_max_collection(model: torch.nn.Module, valid: ValidTokens):
    """Collect per-tensor input amaxes on the device without syncs; hand modelopt the same values.

    During modelopt's max calibration every forward re-reduces each weight (already reduced once
    by modelopt before the loop) and each input quantizer checks its amax for NaN/inf, which
    blocks the host three times per quantizer per micro-batch. Here weight quantizers skip the
    repeat, and each eligible input quantizer's running max(|x|) stays on the device; at the end
    it is given to the quantizer's own calibrator once. Max is exact, so the amaxes (and every
    exported byte) equal modelopt's; quantizers of other kinds keep modelopt's own collection, which
    cannot skip pads: `valid` refuses padded batches while any such quantizer is calibrating.
    """
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    paused: list[TensorQuantizer] = []
    running: dict[TensorQuantizer, list[torch.Tensor | None]] = {}
    hooks = []
    for module in model.modules():
        weight_q = getattr(module, "weight_quantizer", None)
        input_q = getattr(module, "input_quantizer", None)
        if isinstance(weight_q, TensorQuantizer) and weight_q._if_calib and not weight_q._disabled:
            weight_q.disable_calib()  # its amax was collected from the weight before the loop
            paused.append(weight_q)
        if (isinstance(input_q, TensorQuantizer) and input_q._if_calib and not input_q._disabled
                and type(input_q._calibrator) is MaxCalibrator and input_q._calibrator._axis is None
                and not input_q._dynamic and not input_q.is_static_block_quant and input_q.pre_quant_scale is None
                and not input_q.rotate_is_enabled):
            input_q.disable_calib()
            paused.append(input_q)
            box: list[torch.Tensor | None] = [None]
            running[input_q] = box
            hooks.append(module.register_forward_pre_hook(_make_max_hook(box, valid)))
    valid.unmaskable = [name for name, m in model.named_modules()  # still collecting the modelopt way
                        if isinstance(m, TensorQuantizer) and m._if_calib and not m._disabled]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for quantizer in paused:
            quantizer.enable_calib()
        for quantizer, (amax,) in running.items():
            if amax is not None:
                quantizer._calibrator.collect(amax)


def _make_max_hook(box: list, valid: ValidTokens):
    def hook(module, args):
        x = args[0]
        if valid.mask is not None:
            if x.shape[:2] != valid.mask.shape:
                raise RuntimeError(f"input of shape {tuple(x.shape)} does not fit the token mask "
                                   f"{tuple(valid.mask.shape)}: pads could not be kept out of the amax")
            x = x[valid.mask.to(x.device)]  # [B, T, F] -> [real tokens, F]
        if x.numel():
            amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"))
            box[0] = amax if box[0] is None else torch.maximum(box[0], amax)

    return hook


def calibration_health(stage: torch.nn.Module, max_named: int = 20) -> Health:
    """Enabled static quantizers with a usable amax, none or zero, NaN/inf; the first `max_named`
    unusable names. MX quantizers (E8M0 block scales from each block's own values) use no amax and are
    not counted."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    counts = {"good": 0, "zero": 0, "nan": 0}
    bad: list[str] = []
    for name, module in stage.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and not module._dynamic and not module.is_mx_format:
            amax = getattr(module, "_amax", None)
            if amax is None or bool((amax == 0).all()):
                kind = "zero"
            elif not bool(torch.isfinite(amax).all()):
                kind = "nan"
            else:
                kind = "good"
            counts[kind] += 1
            if kind != "good" and len(bad) < max_named:
                bad.append(name)
    return Health(**counts, bad=tuple(bad))
