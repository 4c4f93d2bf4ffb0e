"""`auto`'s run-level guard: every candidate also runs alone beside `auto`, and the run keeps the better.

Choosing per layer by each layer's own held-out output error is greedy: a layer can pick the candidate
that errs least there and cost more downstream (NVFP4 W4A4 on SmolLM2: `auto` 0.178 against its best
candidate alone, 0.173; docs/quality.md). So, layer by layer, each candidate also fits its own copy of
the layer on its own stream of inputs (its predecessors' quantized outputs, exactly as it runs alone)
and a BF16 stream follows the held-out micro-batches, all travelling from stage to stage (sequential
boundary: the parallel one starts each stage from BF16 inputs and has no end-to-end stream). The last
stage puts each stream through the source's final norm and lm_head (read for this only) and compares
next-token distributions with BF16's: mean KL per held-out token, the figure `evaluate` reports on
held-out text. `auto`'s layers stay unless a candidate alone has less, whose layers then replace them.

All are judged on micro-batches no fit saw: each candidate alone fits every layer on the micro-batches
`auto` does not hold out, and `auto`'s side is the path through the trial copies its choices were
judged by (fitted on those same micro-batches); fitted on everything, GPTQ-like candidates looked far
better on the held-out calibration tokens than on held-out text (SmolLM2, 8 x 128 tokens). A kept
candidate's layers are those copies. They wait in host memory (the planner counts them); a resumed or
streaming run has no copies and skips the guard, saying so.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from nvfp4_pp.calibration.layerwise import LayerAlgorithm, LayerInputs, quantizers_off
from nvfp4_pp.log import logger
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.model.stage import Stage
from nvfp4_pp.records import AutoGuard

AUTO_PATH = "auto"
"""The name of `auto`'s own layers among the paths compared."""


class CandidateRuns:
    """Each candidate run alone through one stage, beside `auto`, and the BF16 held-out stream."""

    def __init__(self, stage: Stage, candidates: dict[str, LayerAlgorithm], streams: dict[str, list[torch.Tensor]],
                 auto: list[torch.Tensor], reference: list[torch.Tensor], held_out: int):
        """`streams`: each candidate's inputs for this stage's first layer (every micro-batch); `auto` and
        `reference`: the inputs of the last `held_out` micro-batches on `auto`'s trial path and in BF16."""
        self.stage, self.candidates, self.held_out = stage, candidates, held_out
        self.streams = {name: LayerInputs(stage, hidden) for name, hidden in streams.items()}
        self.auto = LayerInputs(stage, auto)
        self.reference = LayerInputs(stage, reference)
        self.fitted: dict[str, dict[int, nn.Module]] = {name: {} for name in candidates}

    def layer(self, index: int, layer: nn.Module) -> None:
        """Before `auto` fits layer `index` (its quantizers as inserted): each candidate fits a copy on its
        own stream's micro-batches but the held-out ones, and the whole stream advances through it
        (quantizers on); the BF16 held-out stream advances (quantizers off)."""
        cut = len(next(iter(self.streams.values())).hidden) - self.held_out
        for name, algorithm in self.candidates.items():
            stream = self.streams[name]
            fit = LayerInputs(self.stage, stream.hidden[:cut], stream.contexts[:cut])
            fitted = copy.deepcopy(layer)
            algorithm.calibrate(fitted, lambda module: fit.replay(index, module))
            stream.advance(index, fitted)
            self.fitted[name][index] = fitted.to("cpu")  # waits in host memory until the guard decides
        with torch.no_grad(), quantizers_off(layer):
            self.reference.advance(index, layer)

    def auto_layer(self, index: int, trial: nn.Module) -> None:
        """`auto`'s held-out path through the trial it chose for layer `index` (fitted on the same
        micro-batches as the candidates' copies)."""
        self.auto.advance(index, trial)

    def errors(self, head: ModelHead) -> dict[str, float | None]:
        """The last stage's verdict figures: mean KL per held-out token of `auto` and of every candidate alone
        against BF16 (None: not finite)."""
        paths = {AUTO_PATH: self.auto.hidden, **{name: s.hidden[-self.held_out:] for name, s in self.streams.items()}}
        reference = [head.log_probs(h) for h in self.reference.hidden]
        out: dict[str, float | None] = {}
        for name, hidden in paths.items():
            error = head.kl(hidden, reference)
            out[name] = error if math.isfinite(error) else None
        return out

    def outputs(self) -> list[torch.Tensor]:
        """What the next stage needs: every candidate's stream, then `auto`'s held-out trial path and the BF16 one."""
        return [h for s in self.streams.values() for h in s.hidden] + self.auto.hidden + self.reference.hidden

    def keep(self, name: str, device: torch.device) -> list[tuple[int, nn.Module]]:
        """Candidate `name`'s fitted layers, on the stage's device, to replace `auto`'s."""
        return [(index, layer.to(device)) for index, layer in sorted(self.fitted[name].items())]


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
        norm = getattr(layer, "input_layernorm")
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

    def kl(self, hidden: list[torch.Tensor], reference: list[list[torch.Tensor]]) -> float:
        """Mean KL(BF16 || path) per token over the micro-batches."""
        total, count = 0.0, 0
        for h, ref in zip(hidden, reference):
            for lp, r in zip(self.log_probs(h), ref):
                total += float((r.exp() * (r - lp)).sum())
                count += len(r)
        return total / max(count, 1)


def decide(errors: dict[str, float | None], judged_on: int) -> AutoGuard:
    """The guard's verdict from the last stage's figures: `auto` unless a candidate alone errs less."""
    total = errors
    finite = {n: e for n, e in total.items() if e is not None}
    kept = min(finite, key=lambda n: (finite[n], n != AUTO_PATH)) if finite else AUTO_PATH
    verdict = AutoGuard(errors=total, kept=kept, judged_on=judged_on)
    auto = total.get(AUTO_PATH)
    if kept == AUTO_PATH:
        logger.info("auto guard: auto's layers kept (held-out KL to BF16 %s; each candidate alone: %s)",
                    _text(auto), ", ".join(f"{n} {_text(e)}" for n, e in total.items() if n != AUTO_PATH))
    else:
        logger.info("auto guard: %s alone errs less than auto on held-out tokens (%s against %s, %.1f%% less): "
                    "its layers are kept", kept, _text(finite[kept]), _text(auto),
                    100 * (1 - finite[kept] / auto) if auto else 0.0)
    return verdict


def _text(error: float | None) -> str:
    return "non-finite" if error is None else f"{error:.4g}"
