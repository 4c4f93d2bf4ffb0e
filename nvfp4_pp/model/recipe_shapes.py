"""Linear shapes a recipe cannot quantize, found from the safetensors headers before any weight loads.

INT4 with one scale per 128 inputs needs every quantized Linear's input width to be a multiple of
128: modelopt's export refuses partial groups (after the whole calibration), and vLLM's WNA16
kernels refuse them at load. SmolLM2's 576-wide Linears, for one, cannot be quantized that way.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from nvfp4_pp.algorithms.table import RECIPES
from nvfp4_pp.model.arch import Architecture
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.model.source import SourceCheckpoint

GROUP_SIZE = {name: recipe.input_group for name, recipe in RECIPES.items() if recipe.input_group}
"""Recipe -> inputs per weight scale that must divide every quantized Linear's input width."""


class RecipeShapeError(NvFp4PpError):
    """The recipe cannot quantize some of the model's Linears: fixed by `ignore` or another recipe."""


def _matches(module: str, pattern: str) -> bool:
    """modelopt's rule: a pattern `p` of `recipe_overrides` / `ignore` covers the quantizers `p.*`."""
    return fnmatch.fnmatch(f"{module}.weight_quantizer", f"{pattern}.*")


def recipe_of(module: str, recipe: str, overrides: Mapping[str, str], ignore: list[str]) -> str | None:
    """The recipe that quantizes `module` (the last matching override wins, `ignore` over all)."""
    if any(_matches(module, p) for p in ignore):
        return None
    for pattern, name in overrides.items():
        if _matches(module, pattern):
            recipe = name
    return recipe


def check_recipe_shapes(source: SourceCheckpoint, arch: Architecture, recipe: str, overrides: Mapping[str, str],
                        ignore: list[str]) -> None:
    """Refuse, in one line, decoder Linears whose input width the recipe's group size does not divide."""
    if not set(GROUP_SIZE) & {recipe, *overrides.values()}:
        return
    bad: dict[str, list[str]] = {}
    for name in source.weight_map:
        if not name.endswith(".weight") or arch.layer_of(name) is None or len(source.shape(name)) != 2:
            continue
        module = name.removesuffix(".weight")
        group = GROUP_SIZE.get(recipe_of(module, recipe, overrides, ignore) or "")
        if group and source.shape(name)[1] % group:
            leaf = module.rpartition(".")[2]
            bad.setdefault(f"{leaf} (in {source.shape(name)[1]}, groups of {group})", []).append(module)
    if bad:
        what = "; ".join(f"{k} x{len(v)}" for k, v in bad.items())
        example = next(iter(bad.values()))[0].rpartition(".")[2]
        raise RecipeShapeError(f"recipe {recipe}: input width not a multiple of the group size for {what}; "
                               f"keep them in BF16 with `ignore` (e.g. \"*{example}\") or choose another recipe")
