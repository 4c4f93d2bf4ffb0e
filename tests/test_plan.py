"""Layer splits: contiguous, complete, and refused with the numbers when they cannot work."""

from __future__ import annotations

import pytest

from nvfp4_pp.arch import SUPPORTED
from nvfp4_pp.plan import PlanError, owner_of, split_layers


@pytest.mark.parametrize("layers,world,expected", [
    (30, 1, [(0, 30)]),
    (30, 3, [(0, 10), (10, 20), (20, 30)]),
    (30, 4, [(0, 7), (7, 14), (14, 22), (22, 30)]),
    (88, 3, [(0, 29), (29, 58), (58, 88)]),
])
def test_auto_split(layers, world, expected):
    assert split_layers(layers, world, "auto") == expected


def test_explicit_split():
    assert split_layers(88, 3, [41, 41, 6]) == [(0, 41), (41, 82), (82, 88)]


@pytest.mark.parametrize("args,message", [
    ((30, 31, "auto"), "31 ranks but the model has only 30 decoder layers; use at most 30 ranks"),
    ((30, 3, [10, 10]), "pipeline.layers has 2 entries but 3 ranks are running"),
    ((30, 3, [10, 10, 11]), "sums to 31 but the model has 30 decoder layers; make the counts sum to 30"),
    ((30, 3, [15, 0, 15]), "every rank needs at least one layer"),
])
def test_bad_splits(args, message):
    with pytest.raises(PlanError) as e:
        split_layers(*args)
    assert message in str(e.value)


def test_tensor_owners():
    arch = SUPPORTED["LlamaForCausalLM"]
    ranges = [(0, 10), (10, 20), (20, 30)]
    assert owner_of("model.embed_tokens.weight", arch, ranges) == 0
    assert owner_of("model.layers.9.mlp.up_proj.weight", arch, ranges) == 0
    assert owner_of("model.layers.10.self_attn.q_proj.weight", arch, ranges) == 1
    assert owner_of("model.layers.29.input_layernorm.weight", arch, ranges) == 2
    assert owner_of("model.norm.weight", arch, ranges) == 2
    assert owner_of("lm_head.weight", arch, ranges) == 2
