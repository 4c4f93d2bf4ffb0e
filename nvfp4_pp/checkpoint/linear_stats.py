"""How far each written Linear is from its BF16 weight, measured at export for the card's chart.

The packed tensors are decoded with the independent decoders (evaluate/decode.py), a row chunk at a
time on the weight's own device, so the measure is of what was written and its temporaries stay
below the export's own (a quarter of its chunk, at about 20 bytes per element against packing's 13).
The sums stay on the device (`PendingStats`) and are read back for every Linear at once
(`read_back`): a host sync per chunk would stall the device between a streaming stage's layers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nvfp4_pp.checkpoint.decoders.decode import EvaluateError, decode_linear
from nvfp4_pp.records import LinearStats
from nvfp4_pp.sizes import EXPORT_CHUNK_ELEMENTS


@dataclasses.dataclass(frozen=True, slots=True)
class PendingStats:
    """One Linear's stats as float64 device scalars, not yet read back."""

    scheme: str
    error_sums: torch.Tensor | None
    """(Σ‖W − decoded‖², Σ‖W‖²) over the row chunks; None for a scheme without an independent decoder."""
    input_amax: torch.Tensor | None


def _rows(tensors: dict[str, torch.Tensor], out: int, start: int, stop: int, device) -> dict[str, torch.Tensor]:
    """Rows [start, stop) (`start` even) of every per-row tensor (weights, block scales; modelopt's INT4
    weights hold two rows per stored row); per-tensor scales as they are."""
    def part(v: torch.Tensor) -> torch.Tensor:
        if v.dim() >= 2 and v.shape[0] == out:
            return v[start:stop]
        if v.dim() >= 2 and v.shape[0] * 2 == out:
            return v[start // 2 : (stop + 1) // 2]
        return v

    return {k: part(v).to(device) for k, v in tensors.items()}


@torch.no_grad()
def weight_error_sums(name: str, scheme: str, weight: torch.Tensor,
                      tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(Σ‖W − decoded‖², Σ‖W‖²) for one Linear given its modelopt-named tensors, on the weight's device
    (None: no decoder for the scheme). Squares and sums are float64, in the order of the chunks.

    An AWQ Linear's decoded weight is compared after its pre-quant scale, as the kernel applies it.
    """
    out = weight.shape[0]
    rows = max(2, EXPORT_CHUNK_ELEMENTS // 4 // weight.shape[1] // 2 * 2)  # ~20 bytes per element: under packing's peak
    sums = torch.zeros(2, dtype=torch.float64, device=weight.device)
    for start in range(0, out, rows):
        chunk = _rows(tensors, out, start, start + rows, weight.device)
        try:
            decoded = decode_linear("modelopt", scheme, name, chunk)
        except EvaluateError:
            return None
        w = weight[start : start + rows].float()
        d = decoded.weight if decoded.pre_scale is None else decoded.weight * decoded.pre_scale.float().reshape(1, -1)
        sums[0] += torch.linalg.vector_norm(d.sub_(w)).double() ** 2
        sums[1] += torch.linalg.vector_norm(w).double() ** 2
    return sums


def linear_stats(name: str, module: nn.Module, weight: torch.Tensor, scheme: str,
                 tensors: dict[str, torch.Tensor]) -> PendingStats:
    """The Linear's scheme, weight error sums (`weight`: the BF16 weight it was packed from) and input amax."""
    quantizer = getattr(module, "input_quantizer", None)
    amax = getattr(quantizer, "amax", None) if quantizer is not None and quantizer.is_enabled else None
    return PendingStats(scheme, weight_error_sums(name, scheme, weight, tensors),
                        amax.float().max().double() if amax is not None else None)


def read_back(pending: dict[str, PendingStats]) -> dict[str, LinearStats]:
    """Every Linear's `LinearStats` (‖W − decoded‖ / ‖W‖ and the input amax), in one host sync."""
    scalars = [t.reshape(-1) for p in pending.values() for t in (p.error_sums, p.input_amax) if t is not None]
    values = iter(torch.cat(scalars).tolist() if scalars else [])  # one stage's: all on its device
    out = {}
    for name, p in pending.items():
        error = None
        if p.error_sums is not None:
            diff, norm = next(values), next(values)
            error = (diff / norm) ** 0.5 if norm else 0.0
        out[name] = LinearStats(p.scheme, error, next(values) if p.input_amax is not None else None)
    return out
