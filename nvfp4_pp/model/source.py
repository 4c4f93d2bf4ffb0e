"""Reading the source Hugging Face checkpoint: config, tensor index, and only the tensors a stage needs.

Tensor sizes come from the safetensors headers, so planning never reads a weight. An FP8 source
(fp8_source.py) is seen through the same interface as the BF16 model it stands for: its tensor
map holds only model tensors, sizes are the dequantised ones, and `load` dequantises.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from nvfp4_pp.model import fp8_source
from nvfp4_pp.errors import NvFp4PpError

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class SourceError(NvFp4PpError):
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


SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def check_finite(name: str, tensor: torch.Tensor, file: Path) -> None:
    """A NaN or infinite source weight poisons every amax it reaches (modelopt then fails deep inside
    calibration): name it as it is read. Two reductions, no copy of the tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if bool(torch.isfinite(tensor.amax())) and bool(torch.isfinite(tensor.amin())):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    raise SourceError(f"source tensor {name!r} in {file} holds {nan} NaN and {inf} infinite values; the checkpoint "
                      "is damaged: download it again or repair that tensor")


class SourceCheckpoint:
    """A BF16 (or FP8, dequantised on load) checkpoint directory: config.json plus safetensors shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SourceError(f"model directory {str(self.path)!r} does not exist; check config key 'model'")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SourceError(f"{config_path} is missing; 'model' must be a Hugging Face checkpoint directory")
        self.config: dict = json.loads(config_path.read_text())
        self._headers: dict[str, dict] = {}
        self._stored = self._read_weight_map()
        """Every tensor in the shards -> its file."""
        for file in sorted(set(self._stored.values())):
            self.header(file)  # a truncated or corrupt shard is named now, before any rank loads
        self.dtype: torch.dtype = getattr(torch, self.config.get("dtype") or self.config.get("torch_dtype")
                                          or "bfloat16")
        """The model dtype: what FP8 weights are dequantised to."""
        tensors = {name: self.header(file)[name] for name, file in self._stored.items()}
        try:
            self.fp8 = fp8_source.detect(self.path, self.config, {meta["dtype"] for meta in tensors.values()})
            self.fp8_scales = fp8_source.pair_scales(tensors, self.fp8.block) if self.fp8 else {}
            """FP8 weight name -> the name of its scale (empty for an unquantized source)."""
        except fp8_source.UnsupportedSource as e:
            raise SourceError(f"{self.path}: {e}") from None
        self.weight_map = {n: f for n, f in self._stored.items()
                           if not self.fp8 or n.rpartition(".")[2] not in fp8_source.AUXILIARY_NAMES}
        """Model tensors -> file: an FP8 source's scales, activation and KV scales are not model tensors."""

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

    def require_sizes(self) -> None:
        """The sizes the split, the planner and the model skeleton come from. transformers fills a missing
        one with its class default (Llama's 4096 hidden units) and fails far from the cause, or not at all."""
        missing = [k for k in SIZE_KEYS if k not in self.text_config]
        if missing:
            raise SourceError(f"{self.path / 'config.json'} has no {', '.join(missing)}; is it a decoder LLM's "
                              "config? Restore the missing key(s) from the base model's config.json")

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

    def _meta(self, name: str) -> dict:
        return self.header(self._stored[name])[name]

    def shape(self, name: str) -> list[int]:
        return list(self._meta(name)["shape"])

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor as loaded (an FP8 weight at the model dtype), from its shard's header."""
        if name in self.fp8_scales:
            return math.prod(self.shape(name)) * self.dtype.itemsize
        start, end = self._meta(name)["data_offsets"]
        return end - start

    def config_without_quantization(self) -> dict:
        """config.json minus the source's own quantization block (the output gets its own)."""
        return {k: v for k, v in self.config.items() if k not in fp8_source.CONFIG_KEYS}

    def load(self, names: list[str], device: torch.device | str = "cpu",
             loaded: Callable[[int], None] | None = None,
             transfer: Callable[[torch.Tensor], torch.Tensor] | None = None,
             stored: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Read just `names`, shard by shard, onto `device`; FP8 weights come dequantised to `dtype`.

        Each FP8 weight is dequantised as soon as it is read, so one FP8 tensor at a time is held
        beside the loaded ones. `loaded(bytes)` is told of each tensor as it arrives (progress).
        With `transfer`, tensors are read into host memory and `transfer` moves each to the device
        (a streaming stage's copy on its own CUDA stream); FP8 weights are dequantised there after.
        `stored`: the tensors already read into host memory (`read_stored`), used instead of the disk.
        """
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise SourceError(f"tensor {missing[0]!r} is not in the checkpoint at {self.path}")
        read_to, move = ("cpu", transfer) if transfer else (device, lambda tensor: tensor)
        read = self._read if stored is None else lambda wanted, to: ((n, stored[n]) for n in wanted)
        scales = {n: move(t) for n, t in read([self.fp8_scales[n] for n in names if n in self.fp8_scales], read_to)}
        out = {}
        for name, tensor in read(names, read_to):
            tensor = move(tensor)
            if name in self.fp8_scales:
                assert self.fp8 is not None  # scales are paired only in an FP8 source
                tensor = fp8_source.dequantize(tensor, scales[self.fp8_scales[name]], self.fp8.block, self.dtype)
            check_finite(name, tensor, self.path / self._stored[name])
            out[name] = tensor
            if loaded is not None:
                loaded(tensor.numel() * tensor.element_size())
        return out

    def read_stored(self, names: list[str], stage: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors `names` and their FP8 scales as stored, in host memory, each through `stage` (a
        streaming stage pins them): read before the device has room for them, `load(stored=...)` after."""
        return {n: stage(t) for n, t in self._read(names + [self.fp8_scales[n] for n in names if n in self.fp8_scales],
                                                    "cpu")}

    def _read(self, names: list[str], device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
        """The stored tensors `names`, as they are on disk, one at a time."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._stored[n], []).append(n)
        for file, file_names in sorted(by_file.items()):
            self.header(file)  # validates the shard is whole before reading it
            n = file_names[0]
            try:
                with safe_open(self.path / file, framework="pt", device=str(device)) as f:
                    for n in file_names:
                        tensor = f.get_tensor(n)
                        yield n, tensor
            except Exception as e:  # safetensors raises its own error types
                raise SourceError(f"cannot read {n!r} from {self.path / file}: {e}") from e
