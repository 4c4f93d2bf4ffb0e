"""Smoothing (nvfp4_pp/algorithms/smoothing.py) on SmolLM2's trained layers: folded exactly, chosen honestly."""

from __future__ import annotations

import copy

import pytest
import torch

from nvfp4_pp.algorithms.smoothing import smooth_layer, smoothing_groups

LAYERS = (0, 17)
"""Two of SmolLM2's 30 layers: enough to see every group fold, a fraction of the search time."""


@pytest.fixture(scope="module")
def smoothed(smol_dir):
    """The BF16 model, and a copy with INT4 quantizers (every Linear, uncalibrated) whose LAYERS were smoothed
    on 2 x 128 tokens of real text; the logits of both, every quantizer off."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context
    from transformers import AutoModelForCausalLM

    from nvfp4_pp.data.samples import load_samples
    from nvfp4_pp.config import CalibrationConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor(load_samples(CalibrationConfig(samples=2, max_length=128), smol_dir).samples)
    quantized = copy.deepcopy(model)
    config = copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG)
    mtq.quantize(quantized, {**config, "algorithm": None})
    weight = next(e for e in config["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")["cfg"]
    off = [{"quantizer_name": "*", "enable": False}]

    def forward(_layer) -> None:  # the whole model, as far as the layer's inputs need it
        with torch.no_grad(), set_quantizer_by_cfg_context(quantized, off):
            quantized(ids, use_cache=False)

    chosen = {i: smooth_layer(quantized.model.layers[i], forward, weight, None) for i in LAYERS}
    rerounded = copy.deepcopy(model)  # the rounding floor: the same weights through BF16 at random scales
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in LAYERS:
            for p in rerounded.model.layers[i].parameters():
                if p.dim() == 2:
                    r = torch.exp(0.5 * torch.randn(p.shape[1], generator=generator))
                    p.copy_(((p.float() * r).to(p.dtype).float() / r).to(p.dtype))
        floor = rerounded(ids, use_cache=False).logits.float()
        with set_quantizer_by_cfg_context(quantized, off):
            logits = quantized(ids, use_cache=False).logits.float()
        before = model(ids, use_cache=False).logits.float()
    return model, quantized, chosen, before, logits, floor


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL(reference || logits) per token."""
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                            reduction="batchmean") / reference.shape[1])


def test_folded_smoothing_leaves_the_bf16_model_unchanged(smoothed):
    """The norms and up_proj took 1/s, the Linears s: with quantizers off the logits are the source's to
    BF16 rounding: as far from them as the same layers' weights rounded through BF16 at random scales
    (measured: KL 0.00192 both, 98% of next tokens the same)."""
    model, quantized, chosen, before, logits, floor = smoothed
    assert any(g.alpha is not None for groups in chosen.values() for g in groups), chosen
    for i, groups in chosen.items():
        layer, source = quantized.model.layers[i], model.model.layers[i]
        changed = {"input_layernorm -> q/k/v_proj": layer.input_layernorm.weight,
                   "post_attention_layernorm -> gate/up_proj": layer.post_attention_layernorm.weight,
                   "up_proj -> down_proj": layer.mlp.up_proj.weight}
        originals = {"input_layernorm -> q/k/v_proj": source.input_layernorm.weight,
                     "post_attention_layernorm -> gate/up_proj": source.post_attention_layernorm.weight,
                     "up_proj -> down_proj": source.mlp.up_proj.weight}
        for g in groups:
            assert torch.equal(changed[g.group], originals[g.group]) == (g.alpha is None), (i, g)
    assert _kl(logits, before) < 1.5 * _kl(floor, before), (_kl(logits, before), _kl(floor, before))
    def same_tokens(x: torch.Tensor) -> float:
        return float((x.argmax(-1) == before.argmax(-1)).float().mean())

    assert same_tokens(logits) >= same_tokens(floor) - 0.01, (same_tokens(logits), same_tokens(floor))


def test_smoothing_is_kept_only_where_it_lowers_the_quantized_output_error(smoothed):
    _, quantized, chosen, *_ = smoothed
    for i, groups in chosen.items():
        assert [g.group for g in groups] == [g.name for g in smoothing_groups(quantized.model.layers[i])]
        for g in groups:
            assert 0 < g.error <= g.unsmoothed and (g.alpha is None) == (g.error == g.unsmoothed), (i, g)
