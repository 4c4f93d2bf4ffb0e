"""Every recipe x layout against vLLM 0.34's pinned loader tables, at config time: loadable, or refused
with one line naming the layout that works before anything is read, unless `serving.target` names
another reader. The written configs are held to the same tables by the runs in test_recipes.py,
test_int4.py, test_identity.py and the `ct_output` fixture (`verify` checks them for target vllm)."""

from __future__ import annotations

import pytest

from nvfp4_pp.algorithms.table import RECIPES
from nvfp4_pp.config import ConfigError, config_from_dict
from nvfp4_pp.run import main
from nvfp4_pp.vllm_contract import CT_SCHEMES, VLLM_RELEASE, ct_vllm_schemes, declared_config, vllm_method, vllm_problems

LAYOUTS = ("compressed-tensors", "modelopt")
NOT_LOADED = {("nvfp4_awq", "modelopt"), ("mxfp4", "modelopt"), ("mxfp4_mlp_fp8_attn", "modelopt"),
              ("w4a16_int4", "modelopt")}
"""What vLLM 0.34.0 does not load (docs/serving.md's table); nvfp4_awq has no compressed-tensors layout."""
NO_LAYOUT = {("nvfp4_awq", "compressed-tensors")}
BASE = {"model": "/nonexistent/model", "output": "/nonexistent/out"}


def test_pinned_release_is_the_one_the_docs_name():
    assert VLLM_RELEASE == "0.34.0"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_recipe_and_layout_is_loadable_or_refused(recipe, layout):
    data = {**BASE, "recipe": recipe, "format": layout}
    if (recipe, layout) in NO_LAYOUT:
        with pytest.raises(ConfigError, match="set 'format: modelopt' with a 'serving.target'"):
            config_from_dict(data)
    elif (recipe, layout) in NOT_LOADED:
        with pytest.raises(ConfigError) as refused:
            config_from_dict(data)
        line = str(refused.value)
        assert "\n" not in line and f"in the {layout} layout is not loadable by vLLM {VLLM_RELEASE}" in line
        fix = "choose recipe nvfp4" if recipe == "nvfp4_awq" else "set 'format: compressed-tensors', which it loads"
        assert fix in line and "'serving.target'" in line
        for reader in ("tensorrt-llm", "sglang", "none"):  # another reader named: written as asked
            assert config_from_dict({**data, "serving": {"target": reader}}).serving.target == reader
    else:
        cfg = config_from_dict(data)
        qc = declared_config(layout, cfg.schemes)
        assert vllm_problems(qc) == []
        assert (vllm_method(qc) is None) == (layout == "compressed-tensors")


def test_refused_before_the_source_is_read(tmp_path, capsys):
    """The model directory does not exist: the serving line comes first, so nothing was loaded."""
    config = tmp_path / "run.yaml"
    config.write_text("model: /nonexistent/model\noutput: /nonexistent/out\nformat: modelopt\nrecipe: mxfp4\n")
    assert main([str(config)]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(errors) == 1 and "recipe mxfp4 in the modelopt layout is not loadable by vLLM 0.34.0" in errors[0]


def test_transformers_reads_compressed_tensors_only():
    with pytest.raises(ConfigError, match="transformers has no loader for the modelopt layout"):
        config_from_dict({**BASE, "format": "modelopt", "serving": {"target": "transformers"}})
    assert config_from_dict({**BASE, "serving": {"target": "transformers"}}).serving.target == "transformers"


def test_overrides_count_toward_the_layout():
    with pytest.raises(ConfigError, match="with recipe_overrides in the modelopt layout is not loadable"):
        config_from_dict({**BASE, "format": "modelopt", "recipe_overrides": {"*mlp*": "mxfp4"}})
    cfg = config_from_dict({**BASE, "format": "modelopt", "recipe_overrides": {"*mlp*": "fp8"}})
    assert vllm_method(declared_config("modelopt", cfg.schemes)) == "modelopt_mixed"


def test_compressed_tensors_groups_meet_vllms_schemes():
    """The groups the contract expects, through vLLM 0.34's scheme dispatch (the pinned predicates)."""
    got = {scheme: ct_vllm_schemes(fmt, weights, inputs) for scheme, (fmt, weights, inputs) in CT_SCHEMES.items()}
    assert got == {"nvfp4": ("CompressedTensorsW4A4Fp4",), "w4a16_nvfp4": ("CompressedTensorsW4A4Fp4",),
                   "fp8": ("CompressedTensorsW8A16Fp8", "CompressedTensorsW8A8Fp8"),
                   "mxfp4": ("CompressedTensorsW4A4Mxfp4",), "int4_awq": ("CompressedTensorsWNA16",)}
    fmt, weights, inputs = CT_SCHEMES["mxfp4"]
    assert ct_vllm_schemes(fmt, {**weights, "group_size": 16}, inputs) == ()  # no MXFP4 with blocks of 16
    assert ct_vllm_schemes("pack-quantized", CT_SCHEMES["int4_awq"][1], {"num_bits": 4, "type": "float"}) == ()
