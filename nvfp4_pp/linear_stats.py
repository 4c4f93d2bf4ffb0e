"""How far each written Linear is from its BF16 weight, measured at export for the card's chart.

The packed tensors are decoded with the independent decoders (evaluate/decode.py), a row chunk at a
time on the weight's own device, so the measure is of what was written and its temporaries stay
below the export's own (a quarter of its chunk, at about 20 bytes per element against packing's 13).
"""

from __future__ import annotations

import torch
from torch import nn

from .evaluate.decode import EvaluateError, decode_linear
from .records import LinearStats
from .sizes import EXPORT_CHUNK_ELEMENTS


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
def weight_error(name: str, scheme: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> float | None:
    """‖W − decoded‖ / ‖W‖ for one Linear given its modelopt-named tensors (None: no decoder for the scheme).

    An AWQ Linear's decoded weight is compared after its pre-quant scale, as the kernel applies it.
    """
    out = weight.shape[0]
    rows = max(2, EXPORT_CHUNK_ELEMENTS // 4 // weight.shape[1] // 2 * 2)  # ~20 bytes per element: under packing's peak
    diff = norm = 0.0
    for start in range(0, out, rows):
        chunk = _rows(tensors, out, start, start + rows, weight.device)
        try:
            decoded = decode_linear("modelopt", scheme, name, chunk)
        except EvaluateError:
            return None
        w = weight[start : start + rows].float()
        d = decoded.weight if decoded.pre_scale is None else decoded.weight * decoded.pre_scale.float().reshape(1, -1)
        diff += float(torch.linalg.vector_norm(d.sub_(w))) ** 2
        norm += float(torch.linalg.vector_norm(w)) ** 2
    return (diff / norm) ** 0.5 if norm else 0.0


def linear_stats(name: str, module: nn.Module, weight: torch.Tensor, scheme: str,
                 tensors: dict[str, torch.Tensor]) -> LinearStats:
    """The Linear's scheme, weight error (`weight`: the BF16 weight it was packed from) and input amax."""
    quantizer = getattr(module, "input_quantizer", None)
    amax = getattr(quantizer, "amax", None) if quantizer is not None and quantizer.is_enabled else None
    return LinearStats(scheme, weight_error(name, scheme, weight, tensors),
                       float(amax.float().max()) if amax is not None else None)
