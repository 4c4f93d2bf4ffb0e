"""modelopt glue: insert quantizers on a stage and calibrate them through the pipeline."""

from __future__ import annotations

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


def calibrate(stage: torch.nn.Module, forward_loop: Callable[[torch.nn.Module], None]) -> None:
    """Insert quantizers into `stage` and collect statistics inside `forward_loop`.

    The loop must run inside `mtq.quantize`: statistics are gathered only while modelopt drives
    it (a loop run afterwards records nothing, the public Ray pipeline's bug).
    """
    import modelopt.torch.quantization as mtq

    mtq.quantize(stage, modelopt_config(), forward_loop)


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
