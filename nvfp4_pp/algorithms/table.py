"""The one table of recipes and algorithms: every other place reads its names and facts from here.

The config's accepted names (config.py's `recipe`, `recipe_overrides`, `algorithm`, `auto.candidates`,
`kv_cache`), modelopt's preset for each (calibrate.modelopt_config), the card's words, the pairs
modelopt runs on CUDA only, the recipes each algorithm fits, the planner's memory terms and the
checks on group sizes all come from the entries below. A new recipe or algorithm is one entry here
plus its module (tests/test_algorithm_table.py ties the readers to the table).

Plain data, no torch, no modelopt: config.py reads it before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal


@dataclasses.dataclass(frozen=True, slots=True)
class Recipe:
    """A quantization recipe: one of modelopt's configs, or a mix of other recipes per module pattern."""

    preset: str
    """modelopt's config name (`mtq.<preset>`); for a mix, the one whose exclusions (lm_head, routers,
    vision towers) it keeps."""
    schemes: tuple[str, ...]
    """The schemes (modelopt's per-Linear names) it writes; the serving check reads the layout's config
    for them from vllm_contract."""
    card: str
    """The card's words for its Linears ("- Every decoder Linear: ...")."""
    per_tensor_scales: bool = True
    """Its Linears carry a per-tensor scale, which q/k/v and gate/up share (vLLM fuses them); False: only
    group scales, which each fused part keeps (the card says which)."""
    input_group: int | None = None
    """Inputs per weight scale: must divide every quantized Linear's input width (recipe_shapes)."""
    fp8_linears: bool = False
    """Some Linears are written as FP8 (about twice the bytes of FP4: the planner's disk estimate)."""
    fp8_kernels: bool = True
    """It needs modelopt's FP8 CUDA extension (FP8 values or scales), loaded before calibration."""
    mix: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """A mix of other recipes: module pattern -> recipe, every Linear pattern overridden."""

    @property
    def is_mix(self) -> bool:
        """A mix of other recipes (not itself allowed as a `recipe_overrides` value)."""
        return bool(self.mix)


@dataclasses.dataclass(frozen=True, slots=True)
class Memory:
    """What an algorithm holds beside the weights, as the planner counts it (planning/memory.py)."""

    hessians: bool = False
    """FP32 Hessians per Linear (GPTQ): the whole stage's when flat, one layer's when layer by layer."""
    trials: bool = False
    """Each candidate fits a copy of the layer, judged on held-out outputs (`auto`)."""
    smoothing: bool = False
    """A layer's group inputs (at most SMOOTHING_ROWS tokens) and the search's FP32 copies (`smooth`)."""


SMOOTHING_ROWS = 4096
"""Tokens of each group's inputs the smoothing search keeps (evenly thinned beyond): bounds its memory."""


@dataclasses.dataclass(frozen=True, slots=True)
class Algorithm:
    """How weights are fitted to a recipe's grid; its name is modelopt's calibration method."""

    card: str | None
    """The card's words for it ("- Weights: ..."); None: composed from what it chose (`auto`)."""
    recipes: tuple[str, ...] | None = None
    """The recipes whose weights it fits (in the order config errors list them); None: every recipe."""
    cuda_only: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Recipe -> what modelopt 0.47 runs on CUDA only for it (NVFP4's fake-quantized forward, whose CPU
    path stops with "amax must be a CUDA tensor" or "requires triton")."""
    scale_search: str | None = None
    """An NVFP4 weight-scale search: modelopt's config, whose weight quantizer (static per-block scales,
    which the search sets) and algorithm replace the recipe's, for W4A4 and W4A16 alike."""
    auto_candidate: bool = False
    """`algorithm: auto` may choose it per layer (by default, where it fits the recipe)."""
    memory: Memory = Memory()
    steps: tuple[str, ...] = ()
    """A stack: the algorithms it runs in order on each decoder layer (the project's composition, which
    modelopt 0.47 refuses); a step after a scale search keeps that search's scales (GPTQ included)."""
    layer_by_layer: bool = False
    """It works per decoder layer (`layerwise.enable`): smoothing and the stacks."""


_NVFP4 = ("nvfp4", "w4a16_nvfp4")


def _scale_search(card: str, preset: str, name: str, auto_candidate: bool = False) -> Algorithm:
    return Algorithm(card, recipes=_NVFP4, cuda_only=dict.fromkeys(_NVFP4, f"NVFP4 {name}"), scale_search=preset,
                     auto_candidate=auto_candidate)


_SMOOTHING = ("per-channel smoothing scales searched per decoder layer through the recipe's own quantizers "
              "(AWQ-lite's formula; weights and, where the recipe quantizes them, activations), folded into the RMSNorm before q/k/v and "
              "gate/up and into up_proj before down_proj (the checkpoint carries no pre-quant scale)")
_LOCAL_HESSIAN = ("NVFP4 block scales searched to minimize each block's output error weighted by its local Hessian "
                  "(modelopt's local_hessian, FP8 scale sweep)")

RECIPES: dict[str, Recipe] = {
    "nvfp4": Recipe(
        "NVFP4_DEFAULT_CFG", ("nvfp4",),
        "FP4 E2M1 weights and activations (W4A4), FP8 E4M3 scales per block of 16, FP32 per-tensor "
        "scales; static per-tensor input scales from modelopt's max calibration on the data below"),
    "nvfp4_awq": Recipe(
        "NVFP4_AWQ_LITE_CFG", ("nvfp4_awq",),
        "NVFP4 W4A4 as `nvfp4`, with AWQ-lite pre-quant scales searched on the data below (folded "
        "into the preceding layer where shapes allow)"),
    "fp8": Recipe(
        "FP8_DEFAULT_CFG", ("fp8",),
        "FP8 E4M3 weights and activations (W8A8), per-tensor static scales calibrated on the data below",
        fp8_linears=True),
    "w4a16_nvfp4": Recipe(
        "W4A16_NVFP4_CFG", ("w4a16_nvfp4",),
        "NVFP4 weights (E2M1, FP8 per-16 block scales, FP32 per-tensor scale), BF16 activations"),
    "mxfp4": Recipe(
        "MXFP4_DEFAULT_CFG", ("mxfp4",), "MXFP4 weights and activations: E2M1 in blocks of 32 with E8M0 scales"),
    "mxfp4_mlp_fp8_attn": Recipe(  # the seed Mistral-Medium mix
        "MXFP4_DEFAULT_CFG", ("mxfp4", "fp8"),
        "MLP Linears MXFP4 (E2M1, blocks of 32, E8M0 scales); attention Linears FP8 W8A8 "
        "with per-tensor static scales calibrated on the data below", fp8_linears=True,
        mix={"*mlp*": "mxfp4", "*self_attn*": "fp8"}),
    "w4a16_int4": Recipe(
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", ("int4_awq",),
        "INT4 weights (symmetric, one BF16/FP32 scale per 128 input channels), BF16 activations",
        per_tensor_scales=False, input_group=128, fp8_kernels=False),
}
"""Every recipe, in the order the config reference lists them (docs/recipes.md)."""

AUTO = "auto"
"""`algorithm: auto`: per decoder layer, whichever of its candidates errs least (layer_choice.py)."""

ALGORITHMS: dict[str, Algorithm] = {
    "max": Algorithm(
        "rounded to the nearest grid point of the scale each block's maximum sets (max calibration)",
        cuda_only={"nvfp4_awq": "NVFP4 AWQ-lite"}, auto_candidate=True),
    "gptq": Algorithm(
        "GPTQ (modelopt): each rounding error compensated in the columns not yet rounded, from the Hessian of "
        "the layer's calibration inputs",
        recipes=("w4a16_int4", *_NVFP4), cuda_only=dict.fromkeys(_NVFP4, "NVFP4 gptq"), auto_candidate=True,
        memory=Memory(hessians=True)),
    "awq_lite": Algorithm(
        "AWQ-lite (modelopt): per-channel pre-scales searched on the calibration data",
        recipes=("w4a16_int4",), auto_candidate=True),  # NVFP4 with AWQ-lite is recipe nvfp4_awq
    "local_hessian": _scale_search(_LOCAL_HESSIAN, "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", "local_hessian", auto_candidate=True),
    "mse": _scale_search(
        "NVFP4 block scales searched to minimize the weight's squared error over the FP8 scale values "
        "(modelopt's mse, FP8 scale sweep)", "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "mse"),
    "four_over_six": _scale_search(
        "Four-Over-Six: per block, the FP4 grid's maximum mapped to 4 or 6, whichever errs less "
        "(modelopt's NVFP4_FOUR_OVER_SIX_CFG)", "NVFP4_FOUR_OVER_SIX_CFG", "four_over_six"),
    "smooth": Algorithm(
        f"{_SMOOTHING}; then rounded to the nearest grid point of the scale each block's maximum sets",
        recipes=("w4a16_int4", *_NVFP4), cuda_only=dict.fromkeys(_NVFP4, "NVFP4 fake quantization in the search"),
        auto_candidate=True, memory=Memory(smoothing=True), steps=("smooth", "max"), layer_by_layer=True),
    "smooth+gptq": Algorithm(
        f"{_SMOOTHING}; then GPTQ (modelopt's, each rounding error compensated in the columns not yet rounded) "
        "on the smoothed weights",
        recipes=("w4a16_int4", *_NVFP4), cuda_only=dict.fromkeys(_NVFP4, "NVFP4 gptq"), auto_candidate=True,
        memory=Memory(hessians=True, smoothing=True), steps=("smooth", "gptq"), layer_by_layer=True),
    "local_hessian+gptq": Algorithm(
        f"{_LOCAL_HESSIAN}; then GPTQ rounding to those scales (modelopt's GPTQ starts from max scales)",
        recipes=_NVFP4, cuda_only=dict.fromkeys(_NVFP4, "NVFP4 local_hessian"),
        scale_search="NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", auto_candidate=True, memory=Memory(hessians=True),
        steps=("local_hessian", "gptq"), layer_by_layer=True),
    "smooth+local_hessian": Algorithm(
        f"{_SMOOTHING}; then {_LOCAL_HESSIAN} on the smoothed weights",
        recipes=_NVFP4, cuda_only=dict.fromkeys(_NVFP4, "NVFP4 local_hessian"),
        scale_search="NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", auto_candidate=True, memory=Memory(smoothing=True),
        steps=("smooth", "local_hessian"),
        layer_by_layer=True),
    "smooth+local_hessian+gptq": Algorithm(
        f"{_SMOOTHING}; then {_LOCAL_HESSIAN} on the smoothed weights; then GPTQ rounding to those scales",
        recipes=_NVFP4, cuda_only=dict.fromkeys(_NVFP4, "NVFP4 local_hessian"),
        scale_search="NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", auto_candidate=True,
        memory=Memory(hessians=True, smoothing=True), steps=("smooth", "local_hessian", "gptq"), layer_by_layer=True),
    AUTO: Algorithm(None, memory=Memory(trials=True), layer_by_layer=True),
}
"""Every algorithm, in the order the config reference lists them (docs/algorithms.md)."""

KV_CACHES: dict[str, str] = {"fp8": "FP8_KV_CFG"}
"""KV-cache formats: modelopt's KV config, merged into the recipe as hf_ptq.py does."""

RECIPE_NAMES = tuple(RECIPES)
OVERRIDE_NAMES = tuple(name for name, recipe in RECIPES.items() if not recipe.is_mix)
ALGORITHM_NAMES = tuple(ALGORITHMS)
AUTO_CANDIDATES = tuple(name for name, algorithm in ALGORITHMS.items() if algorithm.auto_candidate)
GUARD_FULLEST, GUARD_NONE = "fullest", "none"
"""`auto.guard`'s words beside a candidate's name: the fullest candidate (the table lists stacks after their
steps, so the last that fits), or no guard."""
CUDA_ONLY: dict[tuple[str, str], str] = {
    (name, recipe): what for name, algorithm in ALGORITHMS.items() for recipe, what in algorithm.cuda_only.items()}
"""(algorithm, recipe) -> what modelopt 0.47 runs on CUDA only for that pair."""

if TYPE_CHECKING:  # a type checker reads names written out; the run's validation reads the table's
    RecipeName = str
    OverrideName = str
    AlgorithmName = str
    CandidateName = str
    GuardName = str
    KvCacheName = str
else:
    RecipeName = Literal[RECIPE_NAMES]
    OverrideName = Literal[OVERRIDE_NAMES]
    AlgorithmName = Literal[ALGORITHM_NAMES]
    CandidateName = Literal[AUTO_CANDIDATES]
    GuardName = Literal[(GUARD_FULLEST, GUARD_NONE) + AUTO_CANDIDATES]
    KvCacheName = Literal[tuple(KV_CACHES)]


def memory_terms(algorithms: Iterable[str]) -> Memory:
    """What the run's algorithm (with `auto`, also its candidates) holds, as the planner counts it."""
    terms = [ALGORITHMS[name].memory for name in algorithms]
    return Memory(hessians=any(t.hessians for t in terms), trials=any(t.trials for t in terms),
                  smoothing=any(t.smoothing for t in terms))
