"""`auto`'s run-level guard: one candidate also runs alone beside `auto`, and the run keeps the better.

Choosing per layer by each layer's own held-out output error is greedy: a layer can pick the candidate
that errs least there and cost more downstream (NVFP4 W4A4 on SmolLM2: `auto` 0.178 against its fullest
candidate alone, 0.173; docs/quality.md). So, layer by layer, the guarded candidate (`auto.guard`) also
runs alone, on its own layers' outputs, in two copies: one fitted on the micro-batches `auto` does not
hold out (the side that is judged) and one fitted on all of them (the layers that are kept if it wins:
exactly what a run of it alone writes). `auto`'s side is its path through the trial copies its choices
were judged by, fitted on the same micro-batches; a BF16 stream follows the held-out micro-batches.
Fitted on everything, GPTQ-like candidates looked far better on the held-out calibration tokens than on
held-out text (SmolLM2, 8 x 128 tokens): both sides are judged out of sample.

With the sequential boundary the streams travel from stage to stage and the last stage puts them through
the source's final norm and lm_head: the model's mean next-token KL to BF16 per held-out token (the figure
`evaluate` reports on held-out text) decides for every stage. With the parallel boundary each stage
starts from BF16 inputs and judges its own output (the last stage by KL, the others by the relative
squared error of their outputs), keeping its better. The kept candidate's layers wait in host memory
until the verdict (the planner counts them); a streaming stage has no room for them and skips the guard.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from nvfp4_pp.calibration.layer_choice import relative_error
from nvfp4_pp.calibration.layerwise import LayerAlgorithm, LayerInputs, quantizers_off
from nvfp4_pp.log import logger
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import Stage
from nvfp4_pp.records import AutoGuard

AUTO_PATH = "auto"
"""The name of `auto`'s own layers in the guard's figures."""


class GuardRun:
    """The guarded candidate run alone through one stage, beside `auto`, and the BF16 held-out stream."""

    def __init__(self, stage: Stage, name: str, algorithm: LayerAlgorithm, judged: list[torch.Tensor],
                 kept: list[torch.Tensor], auto: list[torch.Tensor], reference: list[torch.Tensor], held_out: int):
        """`judged`, `kept`: the candidate's two streams into this stage (every micro-batch); `auto`,
        `reference`: the last `held_out` micro-batches on `auto`'s trial path and in BF16."""
        self.stage, self.name, self.algorithm, self.held_out = stage, name, algorithm, held_out
        self.judged, self.kept = LayerInputs(stage, judged), LayerInputs(stage, kept)
        self.auto, self.reference = LayerInputs(stage, auto), LayerInputs(stage, reference)
        self.layers: dict[int, nn.Module] = {}
        """The kept copy's fitted layers, in host memory until the verdict."""

    def layer(self, index: int, layer: nn.Module) -> None:
        """Before `auto` fits layer `index` (its quantizers as inserted): the judged copy fits on its
        stream's micro-batches but the held-out ones, the kept copy on all of its own, each stream advances
        through its copy (quantizers on), and the BF16 held-out stream through the layer (quantizers off)."""
        cut = len(self.judged.hidden) - self.held_out
        fit = LayerInputs(self.stage, self.judged.hidden[:cut], self.judged.contexts[:cut])
        judged = self._fitted(index, layer, fit)
        self.judged.advance(index, judged)
        judged.to_empty(device="meta")  # modelopt's quantizer states hold their module: free the tensors now
        kept = self._fitted(index, layer, self.kept)
        self.kept.advance(index, kept)
        self.layers[index] = kept.to("cpu")
        with torch.no_grad(), quantizers_off(layer):
            self.reference.advance(index, layer)

    def _fitted(self, index: int, layer: nn.Module, inputs: LayerInputs) -> nn.Module:
        fitted = copy.deepcopy(layer)
        self.algorithm.calibrate(fitted, lambda module: inputs.replay(index, module))
        return fitted

    def auto_layer(self, index: int, trial: nn.Module) -> None:
        """`auto`'s held-out path through the trial it chose for layer `index`."""
        self.auto.advance(index, trial)

    def errors(self, head: ModelHead | None) -> dict[str, float | None]:
        """Held-out error of `auto`'s side and the candidate's: mean KL per token to BF16 through `head`,
        or (none) the relative squared error of this stage's outputs; None: not finite."""
        paths = {AUTO_PATH: self.auto.hidden, self.name: self.judged.hidden[-self.held_out:]}
        out: dict[str, float | None] = {}
        for name, hidden in paths.items():
            error = head.kl(hidden, self.reference.hidden) if head else relative_error(hidden, self.reference.hidden)
            out[name] = error if math.isfinite(error) else None
        return out

    def outputs(self) -> list[torch.Tensor]:
        """What the next stage needs: the judged copy's and the kept copy's streams (every micro-batch each),
        then `auto`'s trial path and BF16's (the held-out micro-batches each)."""
        return self.judged.hidden + self.kept.hidden + self.auto.hidden + self.reference.hidden

    def keep(self, device: torch.device) -> list[tuple[int, nn.Module]]:
        """The kept copy's layers, on the stage's device, to replace `auto`'s."""
        return [(index, layer.to(device)) for index, layer in sorted(self.layers.items())]


class ModelHead:
    """The source's final norm and lm_head on the last stage's device (no stage holds them): the model's
    next-token distribution from the last layer's output."""

    CHUNK = 256
    """Tokens whose logits are computed at once (bounds the FP32 [tokens, vocab] transient)."""

    def __init__(self, stage: Stage, source: SourceCheckpoint, device: torch.device):
        arch, layer = stage.arch, stage.layers()[-1][1]
        norm_name, head_name = f"{arch.decoder}.{arch.final_norm}.weight", f"{arch.lm_head}.weight"
        if head_name not in source.weight_map:  # tied to the embeddings
            head_name = f"{arch.decoder}.{arch.embeddings}.weight"
        weights = source.load([norm_name, head_name], device)
        config = stage.hf_config
        norm = getattr(layer, "input_layernorm")  # the final norm is the decoder layers' norm class
        self.norm = type(norm)(config.hidden_size, eps=getattr(config, "rms_norm_eps", 1e-6)).to(
            device=device, dtype=weights[norm_name].dtype)
        self.norm.weight.data.copy_(weights[norm_name])
        self.head = weights[head_name]

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """FP32 log-probabilities of one micro-batch, in chunks of tokens."""
        flat = self.norm(hidden).reshape(-1, hidden.shape[-1])
        return [torch.log_softmax((flat[i:i + self.CHUNK] @ self.head.t()).float(), dim=-1)
                for i in range(0, len(flat), self.CHUNK)]

    def kl(self, hidden: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        """Mean KL(BF16 || path) per token over the micro-batches."""
        total, count = 0.0, 0
        for h, r in zip(hidden, reference):
            for lp, rp in zip(self.log_probs(h), self.log_probs(r)):
                total += float((rp.exp() * (rp - lp)).sum())
                count += len(rp)
        return total / max(count, 1)


def decide(errors: dict[str, float | None], judged_on: int, by: str) -> AutoGuard:
    """The verdict from the figures: `auto` unless the candidate alone errs less."""
    finite = {n: e for n, e in errors.items() if e is not None}
    kept = min(finite, key=lambda n: (finite[n], n != AUTO_PATH)) if finite else AUTO_PATH
    auto = errors.get(AUTO_PATH)
    other = next(n for n in errors if n != AUTO_PATH)
    if kept == AUTO_PATH:
        logger.info("auto guard: auto's layers kept (held-out %s %s; %s alone %s)", by, _text(auto), other,
                    _text(errors[other]))
    else:
        logger.info("auto guard: %s alone errs less than auto on held-out tokens (%s %s against %s, %.1f%% less): "
                    "its layers are kept", kept, by, _text(finite[kept]), _text(auto),
                    100 * (1 - finite[kept] / auto) if auto else 0.0)
    return AutoGuard(errors=errors, kept=kept, judged_on=judged_on, measure=by)


def _text(error: float | None) -> str:
    return "non-finite" if error is None else f"{error:.4g}"
