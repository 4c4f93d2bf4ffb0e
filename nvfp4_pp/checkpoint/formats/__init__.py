"""On-disk layouts of a quantized checkpoint, one class each, chosen by name."""

from __future__ import annotations

from nvfp4_pp.checkpoint.formats.base import BLOCK_SIZE, SCHEMES, CheckpointFormat, Layers, UnsupportedScheme
from nvfp4_pp.checkpoint.formats.compressed_tensors import CompressedTensorsFormat
from nvfp4_pp.checkpoint.formats.modelopt import ModeloptFormat

FORMATS: dict[str, type[CheckpointFormat]] = {
    CompressedTensorsFormat.name: CompressedTensorsFormat,
    ModeloptFormat.name: ModeloptFormat,
}


def get_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; valid options are {sorted(FORMATS)}")
    return FORMATS[name]()


__all__ = ["BLOCK_SIZE", "SCHEMES", "CheckpointFormat", "Layers", "UnsupportedScheme", "FORMATS", "get_format"]
