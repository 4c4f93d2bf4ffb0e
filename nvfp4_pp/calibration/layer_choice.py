"""`algorithm: auto`: per decoder layer, the candidate algorithm whose quantized layer errs least on
calibration tokens it was not fitted on.

Which algorithm helps differs by layer and model (measured on SmolLM2, docs/algorithms.md), so each is
tried where it matters. Every candidate fits a copy of the layer (its quantizers inserted, not yet
calibrated) on the calibration micro-batches but the last few; on those held-out ones the copy's
output, quantizers on, is compared with the BF16 layer's output. The layer itself is then fitted by the
winner on every micro-batch (layerwise.Solver), exactly as a run of that algorithm alone would fit it
from the same inputs. Every layer's inputs are its predecessors' quantized outputs, whatever they chose
(what it sees when served; on SmolLM2 this judged better than feeding BF16 outputs after max or AWQ layers).

The held-out share is a trade: a candidate fitted on fewer tokens than the final fit uses looks worse
than it will be, most for GPTQ, whose Hessian needs many tokens per input channel.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.calibration.layerwise import LayerAlgorithm, LayerInputs, quantizers_off
from nvfp4_pp.log import logger
from nvfp4_pp.records import LayerChoice
from nvfp4_pp.model.stage import Stage


class NonFiniteLayer(NvFp4PpError):
    """No candidate quantized a layer to finite outputs: a source problem, not one a rerun fixes."""


def held_out_count(micro_batches: int, share: float) -> int:
    """Micro-batches held out: `share` of them, at least one, and at least one left to fit on."""
    return min(micro_batches - 1, max(1, round(micro_batches * share)))


class LayerChooser:
    """Tries each candidate on a layer and says which one to keep (the caller fits the layer with it)."""

    def __init__(self, stage: Stage, candidates: dict[str, dict], held_out: int, keep_chosen: bool = False):
        """`candidates`: name -> modelopt algorithm config, in the order ties are broken; `keep_chosen`:
        the chosen candidate's trial copy stays in `chosen_trial` (`auto`'s guard follows it)."""
        self.stage, self.held_out, self.keep_chosen = stage, held_out, keep_chosen
        self.candidates = {name: LayerAlgorithm(algorithm) for name, algorithm in candidates.items()}
        self.chosen_trial: nn.Module | None = None

    def __call__(self, index: int, layer: nn.Module, inputs: LayerInputs) -> LayerChoice:
        cut = len(inputs.hidden) - self.held_out
        fit = LayerInputs(self.stage, inputs.hidden[:cut], inputs.contexts[:cut])
        judged = list(zip(inputs.hidden[cut:], inputs.contexts[cut:]))
        with torch.no_grad(), quantizers_off(layer):
            reference = [self.stage.run_layer(index, layer, h, c) for h, c in judged]
        errors: dict[str, float | None] = {}
        started = time.perf_counter()
        best: tuple[float, nn.Module] | None = None
        for name, algorithm in self.candidates.items():
            trial = copy.deepcopy(layer)  # quantizers as inserted: each candidate starts from the same layer
            algorithm.calibrate(trial, lambda module: fit.replay(index, module))
            with torch.no_grad():
                outputs = [self.stage.run_layer(index, trial, h, c) for h, c in judged]
            error = relative_error(outputs, reference)
            errors[name] = error if math.isfinite(error) else None  # JSON has no NaN; never chosen
            del outputs
            if self.keep_chosen and math.isfinite(error) and (best is None or error < best[0]):
                if best is not None:
                    _drop(best[1])
                best = (error, trial)
            else:
                _drop(trial)
            del trial
        finite = {n: e for n, e in errors.items() if e is not None}
        if not finite:
            raise NonFiniteLayer(f"layer {index}: every auto candidate ({', '.join(errors)}) gave NaN or inf outputs "
                                 "on held-out tokens; check the source's weights for NaN or inf (or use one algorithm)")
        chosen = min(finite, key=finite.__getitem__)
        self.chosen_trial = best[1] if best is not None else None
        logger.info("layer %d: auto chose %s (held-out output error %s; %d candidates in %.2f s)", index, chosen,
                    ", ".join(f"{n} {e:.3g}" if e is not None else f"{n} non-finite" for n, e in errors.items()),
                    len(errors), time.perf_counter() - started)
        return LayerChoice(layer=index, chosen=chosen, errors=errors, fitted_on=cut, judged_on=self.held_out)


def _drop(trial: nn.Module) -> None:
    """modelopt's shared quantizer states hold their parent module: a cycle that would keep the copy's
    tensors until a garbage collection; drop them now."""
    trial.to_empty(device="meta")


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Sum of squared differences over the sum of squared reference values, in FP32."""
    diff = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outputs, reference))
    norm = sum(float(r.float().pow(2).sum()) for r in reference)
    return diff / norm if norm else diff
