"""modelopt glue: insert quantizers on a stage and calibrate them through the pipeline."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

RECIPES = ("nvfp4",)


def modelopt_config(recipe: str = "nvfp4") -> dict:
    """modelopt's config for `recipe`, with cross-rank amax syncing switched off.

    modelopt all-reduces every amax over the data-parallel group, which is the whole world once
    torch.distributed is up: in a pipeline that would mix amaxes of different layers across ranks.
    Each stage's statistics are already complete, so the sync must not run.
    """
    import modelopt.torch.quantization as mtq

    if recipe != "nvfp4":
        raise ValueError(f"unknown recipe {recipe!r}; valid options are {list(RECIPES)}")
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    cfg["algorithm"] = {"method": "max", "distributed_sync": False}
    return cfg


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
            raise RuntimeError(
                f"padded micro-batch, but quantizers {self.unmaskable[:3]} collect statistics that cannot skip "
                "pad positions; use calibration.batch_size: 1 or calibration.pack: true")
        self.mask = mask


def calibrate(stage: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None],
              valid: ValidTokens | None = None) -> None:
    """Insert quantizers into `stage` and collect statistics inside `forward_loop`.

    The loop must run inside `mtq.quantize`: statistics are gathered only while modelopt drives
    it (a loop run afterwards records nothing, the public Ray pipeline's bug).
    """
    import modelopt.torch.quantization as mtq

    def loop(model: torch.nn.Module) -> None:
        with running_max_collection(model, valid or ValidTokens()):
            forward_loop(model)

    mtq.quantize(stage, modelopt_config(), loop)


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
                and not input_q.is_static_block_quant and input_q.pre_quant_scale is None
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


def calibration_health(stage: torch.nn.Module, max_named: int = 20) -> dict:
    """Counts of enabled static quantizers with a usable amax ("good"), none or zero ("zero"), NaN/inf
    ("nan"), and the names of the first `max_named` unusable ones ("bad")."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    health: dict = {"good": 0, "zero": 0, "nan": 0, "bad": []}
    for name, module in stage.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and not module._dynamic:
            amax = getattr(module, "_amax", None)
            if amax is None or bool((amax == 0).all()):
                kind = "zero"
            elif not bool(torch.isfinite(amax).all()):
                kind = "nan"
            else:
                kind = "good"
            health[kind] += 1
            if kind != "good" and len(health["bad"]) < max_named:
                health["bad"].append(name)
    return health
