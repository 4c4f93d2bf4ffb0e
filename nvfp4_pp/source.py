"""Reading the source Hugging Face checkpoint: config, tensor index, and only the tensors a stage needs.

Tensor sizes come from the safetensors headers, so planning never reads a weight.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class SourceError(RuntimeError):
    """The source checkpoint is missing or malformed; the message says which file and why."""


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path} is truncated (shorter than a safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise SourceError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
            f.seek(0, 2)
            size = f.tell()
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read safetensors header of {path}: {e}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SourceError(
            f"{path} is truncated: its header promises {8 + n + end} bytes, the file has {size}; "
            "copy the shard again"
        )
    header.pop("__metadata__", None)
    return header


class SourceCheckpoint:
    """A BF16 checkpoint directory: config.json plus one or more safetensors shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SourceError(f"model directory {str(self.path)!r} does not exist; check config key 'model'")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SourceError(f"{config_path} is missing; 'model' must be a Hugging Face checkpoint directory")
        self.config: dict = json.loads(config_path.read_text())
        self._headers: dict[str, dict] = {}
        self.weight_map = self._read_weight_map()
        for file in sorted(set(self.weight_map.values())):
            self.header(file)  # a truncated or corrupt shard is named now, before any rank loads

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise SourceError(
                        f"{index} names shard {file!r}, which is missing from {self.path}; "
                        "download the checkpoint again"
                    )
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise SourceError(f"no *.safetensors files in {self.path}; only safetensors sources are supported")
        return {name: f.name for f in files for name in self.header(f.name)}

    @functools.cached_property
    def text_config(self) -> dict:
        """The language model's config: config.json itself, or for an image-text checkpoint its
        `text_config` completed by transformers (checkpoints omit fields left at their defaults, e.g.
        Gemma-3's attention heads), since sizes and layer counts are read from it."""
        if "text_config" not in self.config:
            return self.config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path).get_text_config().to_dict()

    def require_tokenizer(self) -> None:
        """vLLM cannot serve a checkpoint without its tokenizer; say so before any work is done."""
        has_config = (self.path / "tokenizer_config.json").is_file()
        if not (has_config and any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))):
            raise SourceError(
                f"{self.path} has no tokenizer (tokenizer_config.json and tokenizer.json or tokenizer.model); "
                "copy the tokenizer files of the base model into it"
            )

    def header(self, file: str) -> dict:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(self.path / file)
        return self._headers[file]

    def shape(self, name: str) -> list[int]:
        return self.header(self.weight_map[name])[name]["shape"]

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor, from its shard's header."""
        meta = self.header(self.weight_map[name])[name]
        start, end = meta["data_offsets"]
        return end - start

    def load(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read just `names`, shard by shard, onto `device`."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise SourceError(f"tensor {missing[0]!r} is not in the checkpoint at {self.path}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for file, file_names in sorted(by_file.items()):
            self.header(file)  # validates the shard is whole before reading it
            try:
                with safe_open(self.path / file, framework="pt", device=str(device)) as f:
                    for n in file_names:
                        out[n] = f.get_tensor(n)
            except Exception as e:  # safetensors raises its own error types
                raise SourceError(f"cannot read {n!r} from {self.path / file}: {e}") from e
        return out
