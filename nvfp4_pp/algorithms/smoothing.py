"""Smoothing (`smooth`): per-channel scales moved from a decoder layer's Linear inputs into their weights,
searched with the activations quantized as served, and folded exactly into the module before them.

NVFP4 W4A4's error is half the weights', half the activations' (docs/quality.md): an activation channel
with outliers forces a large block scale on its neighbours. Dividing input channel j by s_j and
multiplying weight column j by s_j leaves the product unchanged and moves range from the activations to
the weights. AWQ-lite (modelopt) searches s = mean|x|^a / mean|w|^(1-a) for the exponent a with the input
quantizer disabled, and keeps s as a `pre_quant_scale` the checkpoint must carry (vLLM 0.34 has no
NVFP4_AWQ loader). Here the search quantizes both sides (the recipe's own weight and input quantizers,
calibrated on each candidate's scaled tensors), keeps no smoothing where none helps, and the scales are
folded where the algebra is exact, so the checkpoint stays the recipe's plain layout:
- q/k/v behind the layer's input RMSNorm, gate/up behind its post-attention RMSNorm: the norm's weight
  divided by s (an RMSNorm whose output is `weight * normalized`);
- down_proj behind up_proj: up_proj's output rows divided by s (`down(act(gate) * up)` is linear in up).
o_proj (behind v_proj through the attention) is not smoothed. Layers of other shapes are left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from nvfp4_pp.algorithms.table import SMOOTHING_ROWS

FOLDABLE_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""RMSNorm classes whose output is `weight * normalized(x)` (Gemma's is `(1 + weight) * ...`: not listed)."""

ALPHAS = tuple(i / 20 for i in range(21))
"""The exponents searched (AWQ-lite's formula), besides no smoothing at all."""

ROWS_PER_BATCH = 256
"""Tokens kept per micro-batch for the search (evenly spaced): the search sees every micro-batch."""


@dataclasses.dataclass(frozen=True, slots=True)
class SmoothGroup:
    """Linears that read one input, and the module whose output that input is (scaled by 1/s)."""

    name: str
    source: nn.Module
    """An RMSNorm (its weight divided by s) or a Linear (its output rows divided by s)."""
    linears: tuple[nn.Linear, ...]
    """Their weight columns are multiplied by s; the first one's input is what the search sees."""


@dataclasses.dataclass(frozen=True, slots=True)
class GroupSmoothing:
    """What the search chose for one group: its exponent (None: no smoothing) and output errors."""

    group: str
    alpha: float | None
    error: float
    """Squared output error of the group's quantized Linears with the chosen scales, over the BF16 outputs'."""
    unsmoothed: float
    """The same without smoothing."""


def smoothing_groups(layer: nn.Module) -> list[SmoothGroup]:
    """The groups of a Llama-shaped decoder layer whose scales fold exactly (see the module text)."""
    groups: list[SmoothGroup] = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norm = getattr(layer, "input_layernorm", None)
    if attn is not None and isinstance(norm, nn.Module) and type(norm).__name__ in FOLDABLE_NORMS:
        qkv = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        linears = tuple(m for m in qkv if isinstance(m, nn.Linear))
        if len(linears) == 3:
            groups.append(SmoothGroup("input_layernorm -> q/k/v_proj", norm, linears))
    norm = getattr(layer, "post_attention_layernorm", None)
    if mlp is not None:
        gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if (isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(norm, nn.Module)
                and type(norm).__name__ in FOLDABLE_NORMS):
            groups.append(SmoothGroup("post_attention_layernorm -> gate/up_proj", norm, (gate, up)))
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and hasattr(mlp, "act_fn"):
            groups.append(SmoothGroup("up_proj -> down_proj", up, (down,)))
    return groups


@torch.no_grad()
def smooth_layer(layer: nn.Module, forward_loop: Callable[[nn.Module], None], weight_cfg: dict,
                 input_cfg: dict | None, alphas: tuple[float, ...] = ALPHAS) -> list[GroupSmoothing]:
    """Search and fold each group's scales; `forward_loop(layer)` runs the calibration micro-batches.

    `weight_cfg` / `input_cfg`: the recipe's modelopt quantizer settings (`cfg` of its `*weight_quantizer`
    and `*input_quantizer` entries; None: inputs not quantized, a weight-only recipe). The layer's own
    quantizers are off while its inputs are read and are not touched: the next step calibrates them; a group
    none of whose Linears quantizes its weight (`ignore`) is left alone, and a Linear whose input quantizer
    is off (a weight-only recipe, `ignore`) is judged with its inputs as they are."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    groups = [g for g in smoothing_groups(layer) if any(_quantized(m, "weight") for m in g.linears)]
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(groups))}
    thinning = {i: 1 for i in kept}

    def keep(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            step = max(1, x.shape[0] // ROWS_PER_BATCH)
            # copies, not views: a view would keep the whole micro-batch's input alive
            kept[i].append(x[::step][:ROWS_PER_BATCH][::thinning[i]].clone())
            if sum(len(k) for k in kept[i]) > SMOOTHING_ROWS:  # every other kept token dropped, and from now on
                kept[i] = [k[::2].clone() for k in kept[i]]
                thinning[i] *= 2
        return hook

    handles = [g.linears[0].register_forward_pre_hook(keep(i)) for i, g in enumerate(groups)]
    try:
        with set_quantizer_by_cfg_context(layer, [{"quantizer_name": "*", "enable": False}]):
            forward_loop(layer)
    finally:
        for handle in handles:
            handle.remove()
    chosen = []
    for i, group in enumerate(groups):  # (the quantizers are as inserted again: on where the recipe has them)
        weight_cfgs = [weight_cfg if _quantized(m, "weight") else None for m in group.linears]
        result, scales = _search(group, torch.cat(kept.pop(i)), weight_cfgs,
                                 input_cfg if _quantized(group.linears[0], "input") else None, alphas)
        if scales is not None:
            fold(group, scales)
        chosen.append(result)
    return chosen


def _quantized(linear: nn.Linear, which: str) -> bool:
    """Whether the Linear's `weight` / `input` quantizer (as modelopt inserted it) is on."""
    return bool(getattr(getattr(linear, f"{which}_quantizer", None), "is_enabled", False))


def _search(group: SmoothGroup, x: torch.Tensor, weight_cfgs: list[dict | None], input_cfg: dict | None,
            alphas: tuple[float, ...]) -> tuple[GroupSmoothing, torch.Tensor | None]:
    """The exponent whose scaled, quantized Linears give the group's BF16 outputs best; None if none beats
    no smoothing. `weight_cfgs`: each Linear's weight quantizer settings, in order (None: left unquantized)."""
    weights = [m.weight for m in group.linears]
    reference = [nn.functional.linear(x, w).float() for w in weights]
    norm = sum(float(r.pow(2).sum()) for r in reference) or 1.0
    act = x.abs().float().mean(0)
    w_stat = torch.cat([_weight_shape_stat(w) for w in weights]).mean(0)

    def error(scales: torch.Tensor | None) -> float:
        xs = x if scales is None else (x.float() / scales).to(x.dtype)
        xq = _fake_quantized(input_cfg, xs)
        total = 0.0
        for w, cfg, r in zip(weights, weight_cfgs, reference):
            ws = w if scales is None else (w.float() * scales).to(w.dtype)
            total += float((nn.functional.linear(xq, _fake_quantized(cfg, ws)).float() - r).pow(2).sum())
        return total / norm

    unsmoothed = best = error(None)
    best_alpha, best_scales = None, None
    for alpha in alphas:
        scales = awq_scales(act, w_stat, alpha)
        e = error(scales)
        if e < best:
            best, best_alpha, best_scales = e, alpha, scales
    return GroupSmoothing(group.name, best_alpha, best, unsmoothed), best_scales


def _weight_shape_stat(weight: torch.Tensor) -> torch.Tensor:
    """Each weight's magnitude relative to its row's maximum (AWQ-lite's weight statistic), [out, in]."""
    w = weight.abs().float()
    return w / (w.amax(dim=1, keepdim=True) + torch.finfo(torch.float32).tiny)


def awq_scales(act: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ-lite's per-channel scales for exponent `alpha`, normalized so that max * min = 1."""
    s = (act.pow(alpha) / (weight.pow(1 - alpha) + torch.finfo(torch.float32).tiny)).clamp(1e-4, 1e4)
    return s / (s.max() * s.min()).sqrt()


def _fake_quantized(cfg: dict | None, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` through a fresh modelopt quantizer of settings `cfg`, max-calibrated on it (None: as is)."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    if cfg is None or cfg.get("enable") is False:
        return tensor
    holder = nn.ModuleDict({"q": TensorQuantizer(QuantizerAttributeConfig(**cfg))}).to(tensor.device)
    enable_stats_collection(holder)
    holder["q"](tensor)
    finish_stats_collection(holder)
    return holder["q"](tensor)


def fold(group: SmoothGroup, scales: torch.Tensor) -> None:
    """Input channel j of the group's Linears divided by scales[j] at its source, their weight column j
    multiplied by it. A norm's rounded weight sets the factor its Linears get, so the product of the two
    stays the original's to the rounding of the Linears' weights alone."""
    source = group.source
    weight = source.weight
    assert isinstance(weight, torch.Tensor), f"{group.name}: its source has a weight"
    if isinstance(source, nn.Linear):  # its output rows (and bias) divided
        weight.copy_((weight.float() / scales[:, None]).to(weight.dtype))
        if source.bias is not None:
            source.bias.copy_((source.bias.float() / scales).to(source.bias.dtype))
        factor = scales
    else:
        old = weight.float()
        new = (old / scales).to(weight.dtype)
        weight.copy_(new)
        factor = torch.where(new.float() != 0, old / new.float(), scales)
    for linear in group.linears:
        linear.weight.copy_((linear.weight.float() * factor).to(linear.weight.dtype))
