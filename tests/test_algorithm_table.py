"""The algorithm table (nvfp4_pp/algorithms/table.py) is the only place recipes and algorithms are named:
the config accepts exactly its names, the card, modelopt presets, CUDA-only checks, group sizes and the
planner's memory terms read their facts from it, and no other module keeps a list of those names. Cheap:
no model, no run (modelopt imported once to check the presets exist)."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest

from nvfp4_pp.publish import card
from nvfp4_pp import config
from nvfp4_pp.model import recipe_shapes
from nvfp4_pp.algorithms.table import (
    ALGORITHMS,
    AUTO,
    AUTO_CANDIDATES,
    CUDA_ONLY,
    KV_CACHES,
    OVERRIDE_NAMES,
    RECIPES,
    memory_terms,
)
from nvfp4_pp.config import ConfigError, config_from_dict
from nvfp4_pp.planning.memory import ModelSizes, Workload, algorithm_bytes, written_bytes

PACKAGE = Path(__file__).resolve().parents[1] / "nvfp4_pp"


def _accepted(key_type) -> tuple:
    """The names a config type accepts, as its validation reads them (Literal, inside Optional/dict/list)."""
    origin = typing.get_origin(key_type)
    if origin is typing.Literal:
        return typing.get_args(key_type)
    return tuple(a for arg in typing.get_args(key_type) for a in _accepted(arg))


def test_the_config_accepts_exactly_the_tables_names():
    hints = typing.get_type_hints(config.RunConfig)
    assert _accepted(hints["recipe"]) == tuple(RECIPES)
    assert _accepted(hints["recipe_overrides"]) == OVERRIDE_NAMES == tuple(n for n, r in RECIPES.items() if not r.is_mix)
    assert _accepted(hints["algorithm"]) == tuple(ALGORITHMS)
    assert _accepted(hints["kv_cache"]) == tuple(KV_CACHES)
    assert _accepted(typing.get_type_hints(config.AutoConfig)["candidates"]) == AUTO_CANDIDATES
    with pytest.raises(ConfigError, match="config key 'recipe' must be one of 'nvfp4', 'nvfp4_awq'"):
        config_from_dict({"model": "m", "output": "o", "recipe": "nvfp5"})
    with pytest.raises(ConfigError, match="config key 'algorithm' must be one of 'max', 'gptq'"):
        config_from_dict({"model": "m", "output": "o", "algorithm": "gptq2"})


def test_every_recipe_has_its_card_text_preset_and_schemes():
    import modelopt.torch.quantization as mtq

    from nvfp4_pp.checkpoint.formats.base import SCHEMES

    for name, recipe in RECIPES.items():
        assert card.RECIPE_TEXT[name] == recipe.card and recipe.card
        assert all(part in RECIPES and not RECIPES[part].is_mix for part in recipe.mix.values())
        assert isinstance(getattr(mtq, recipe.preset), dict), name
        assert recipe.schemes and set(recipe.schemes) <= set(SCHEMES), name
        assert (name in card.GROUP_SCALES_ONLY) == (not recipe.per_tensor_scales)
        assert recipe_shapes.GROUP_SIZE.get(name) == recipe.input_group
    assert all(isinstance(getattr(mtq, preset), dict) for preset in KV_CACHES.values())


def test_every_algorithm_has_its_card_text_recipes_and_preset():
    import modelopt.torch.quantization as mtq

    for name, algorithm in ALGORITHMS.items():
        if name == AUTO:  # composed from the layers' choices
            assert algorithm.card is None and name not in card._ALGORITHM_TEXT
            continue
        assert card._ALGORITHM_TEXT[name] == algorithm.card and algorithm.card
        assert algorithm.recipes is None or set(algorithm.recipes) <= set(RECIPES), name
        assert set(algorithm.cuda_only) <= set(algorithm.recipes or RECIPES), name
        if algorithm.scale_search is not None:
            assert isinstance(getattr(mtq, algorithm.scale_search), dict), name
    assert set(AUTO_CANDIDATES) <= set(ALGORITHMS) - {AUTO}


@pytest.mark.parametrize("algorithm,recipe", sorted(CUDA_ONLY))
def test_a_cuda_only_pair_is_refused_on_cpu(algorithm, recipe):
    import torch

    from nvfp4_pp.calibration.calibrate import check_algorithm_device

    with pytest.raises(ConfigError, match=re.escape(f"algorithm {algorithm} with recipe {recipe} (") + ".* runs on CUDA only"):
        check_algorithm_device(algorithm, recipe, 0, "h", torch.device("cpu"))
    check_algorithm_device(algorithm, recipe, 0, "h", torch.device("cuda"))  # no error: CUDA runs it


def test_the_planner_counts_each_algorithms_memory_terms():
    sizes = ModelSizes(layer_bytes=(100,) * 4, layer_linear_bytes=(80,) * 4, layer_linears=7, largest_linear=20,
                       embed_bytes=50, head_bytes=50, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4,
                       layer_hessian_bytes=1000, largest_hessian_bytes=300)

    def held(*names: str) -> int:
        terms = memory_terms(names)
        return algorithm_bytes(sizes, Workload(1, 16, 64, terms.hessians, True, terms.trials, terms.smoothing),
                               layers=4)

    base = held("max")
    assert held("gptq") > base and held(AUTO, "max", "awq_lite") > base and held("smooth") > base
    assert held("smooth+gptq") == held("gptq") + held("smooth") - base  # the stack's terms add up
    assert held(AUTO, "max", "gptq") > held(AUTO, "max", "awq_lite") > held("awq_lite") == base
    for name in RECIPES:  # FP8 Linears are counted at FP8's size on disk
        fp8 = written_bytes(sizes, name, 0, 4, False, False) > written_bytes(sizes, "nvfp4", 0, 4, False, False)
        assert fp8 == RECIPES[name].fp8_linears, name


def test_no_other_module_keeps_a_list_of_the_names():
    """A literal collection naming two algorithms (other than the words max and auto), or a recipe only a
    recipe is called (not also a scheme) beside another recipe, belongs in the table."""
    algorithms = set(ALGORITHMS) - {"max", AUTO}
    recipe_only = {"w4a16_int4", "mxfp4_mlp_fp8_attn"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "algorithms":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if not isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)) or items is None:
                continue
            names = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            if len(names & algorithms) >= 2 or (names & recipe_only and len(names & set(RECIPES)) >= 2):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"names kept outside nvfp4_pp/algorithms/table.py: {found}"
