"""nvfp4_pp.algorithms.gptq's solve against modelopt 0.47's own GPTQ, byte for byte, on SmolLM2's trained weights.

One down_proj (INT4 W4A16 g128, the recipe modelopt runs GPTQ for on CPU) with the Hessian of its
real inputs (layer 0's gate/up applied to the embeddings of real tokens): the solve equals modelopt's
`gptq_blockwise_update`. Then two Linears that read one input (the down_proj's rows split in two,
as q/k/v or gate/up share theirs): solved together through the package's calibration entry, their
weights equal modelopt's `gptq` entry point run on a copy. End to end across 3 ranks, flat and layer
by layer, the identity is tests/test_algorithms.py's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

IN = 640


@pytest.fixture(scope="module")
def down_proj(smol_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's down_proj cut to its first IN input channels (BF16, 576 x 640: a sixth of modelopt's
    reference update's time, whose cost grows with the square of the input width) and 256 real inputs."""
    from safetensors.torch import load_file

    tensors = load_file(smol_dir / "model.safetensors")
    layer = "model.layers.0.mlp."
    gate, up = (tensors[f"{layer}{n}_proj.weight"].float() for n in ("gate", "up"))
    ids = _token_ids(smol_dir, 256)
    x = tensors["model.embed_tokens.weight"].float()[ids]
    inputs = (nn.functional.silu(x @ gate.t()) * (x @ up.t())).to(torch.bfloat16)
    return tensors[f"{layer}down_proj.weight"][:, :IN].contiguous(), inputs[:, :IN].contiguous()


def _token_ids(smol_dir, n: int) -> torch.Tensor:
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    text = " ".join(topics[k] for k in sorted(topics))[:20000]
    return torch.tensor(AutoTokenizer.from_pretrained(smol_dir)(text)["input_ids"][:n])


def _int4_linears(weights: list[torch.Tensor]) -> nn.Module:
    """Linears with modelopt's INT4 g128 weight quantizers, inserted by modelopt, not calibrated."""
    import modelopt.torch.quantization as mtq

    model = nn.ModuleDict({f"part{i}": nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
                           for i, w in enumerate(weights)})
    for linear, w in zip(model.values(), weights):
        linear.weight.data = w.clone()
    mtq.quantize(model, {**copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), "algorithm": None}, None)
    return model


def test_solve_equals_modelopts_blockwise_update(down_proj):
    from modelopt.torch.quantization.model_calib import max_calibrate
    from modelopt.torch.quantization.utils.calib_utils import (compute_hessian_inverse, gptq_blockwise_update,
                                                               update_hessian)

    from nvfp4_pp.algorithms.gptq import column_quantizer, solve

    weight, inputs = down_proj
    model = _int4_linears([weight])
    max_calibrate(model, None)  # GPTQ's first step: static block scales from the weights
    quantizer = model["part0"].weight_quantizer
    hessian, _ = update_hessian(inputs, torch.zeros(IN, IN), 0)
    w = weight.float()
    h_inv = compute_hessian_inverse(hessian, w, 0.01)
    theirs, ours = w.clone(), w.clone()
    # GPTQ blocks of 256 columns: two quantization groups each, and a last block of one group
    gptq_blockwise_update(theirs, h_inv, 256, quantizer)
    solve(ours, h_inv, 256, column_quantizer([quantizer], [576], IN, 256))
    assert not torch.equal(theirs, w)  # the update changed the weights
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} weights differ"


def test_linears_sharing_an_input_are_solved_together_as_modelopt_solves_each(down_proj):
    import modelopt.torch.quantization as mtq

    from nvfp4_pp.algorithms.gptq import SolveTimes
    from nvfp4_pp.calibration.layerwise import LayerAlgorithm

    weight, inputs = down_proj
    halves = [weight[:320], weight[320:]]  # two Linears of one input, uneven like q and k/v
    batches = inputs.reshape(4, 64, -1)

    def loop(model: nn.Module) -> None:
        for batch in batches:
            for linear in model.values():
                linear(batch)

    theirs = _int4_linears(halves)
    mtq.quantize(theirs, {**copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG), "algorithm": {"method": "gptq"}},
                 loop)
    ours = _int4_linears(halves)
    times = SolveTimes(prefix="model.layers.3.mlp.")
    LayerAlgorithm({"method": "gptq"}, times).calibrate(ours, loop)
    for name in ("part0", "part1"):
        assert not torch.equal(ours[name].weight.data, halves[int(name[-1])])  # GPTQ changed the weights
        assert torch.equal(ours[name].weight, theirs[name].weight), name
        assert torch.equal(ours[name].weight_quantizer._amax, theirs[name].weight_quantizer._amax)
    assert set(times.linears) == {"model.layers.3.mlp.part0", "model.layers.3.mlp.part1"}
    assert set(times.per_layer()) == {3} and times.inverses == 1  # one inverse served both
