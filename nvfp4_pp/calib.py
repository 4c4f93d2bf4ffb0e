"""Calibration samples as token ids (built on the first rank only) and their micro-batches."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from .config import CalibrationConfig


class CalibrationDataError(ValueError):
    pass


def builtin_text(name: str) -> str:
    """Offline corpora that ship with every CPython, so demos and tests never download."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    raise CalibrationDataError(
        f"calibration.dataset 'builtin:{name}' does not exist; the built-in corpus is 'builtin:pydoc'"
    )


def _chunk(ids: list[int], length: int, count: int) -> list[list[int]]:
    return [ids[i : i + length] for i in range(0, len(ids), length)][:count]


def _read_jsonl(path: Path, cfg: CalibrationConfig, tokenize: Callable[[str], list[int]]) -> list[list[int]]:
    samples: list[list[int]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if len(samples) == cfg.samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path}:{lineno} is not valid JSON: {e.msg}") from e
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise CalibrationDataError(f"{path}:{lineno}: 'input_ids' must be a non-empty list of integers")
                if len(ids) > cfg.max_length:
                    raise CalibrationDataError(
                        f"{path}:{lineno} has {len(ids)} input_ids, more than calibration.max_length="
                        f"{cfg.max_length}; raise max_length or shorten the sample"
                    )
            elif isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"]:
                ids = tokenize(row["text"])[: cfg.max_length]
            else:
                raise CalibrationDataError(
                    f"{path}:{lineno} has neither 'input_ids' (list of ints) nor 'text' (string)"
                )
            samples.append(ids)
    return samples


def load_samples(cfg: CalibrationConfig, tokenizer_dir: str | Path) -> list[list[int]]:
    """Token-id samples in a fixed, reproducible order (`input_ids` JSONL rows are used verbatim)."""
    dataset = cfg.dataset

    @functools.cache
    def tokenizer():  # loaded only when some text needs it
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_dir)

    def tokenize(text: str) -> list[int]:
        return tokenizer()(text)["input_ids"]

    if dataset.startswith("builtin:"):
        text = builtin_text(dataset.removeprefix("builtin:"))
        samples = _chunk(tokenize(text), cfg.max_length, cfg.samples)
    else:
        path = Path(dataset)
        if not path.is_file():
            raise CalibrationDataError(f"calibration.dataset file {dataset!r} does not exist")
        if dataset.endswith(".jsonl"):
            samples = _read_jsonl(path, cfg, tokenize)
        else:
            samples = _chunk(tokenize(path.read_text()), cfg.max_length, cfg.samples)
    if not samples:
        raise CalibrationDataError(f"calibration.dataset {dataset!r} holds no samples")
    return samples


def micro_batches(samples: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """Consecutive samples of equal length, up to `batch_size` per batch: no padding ever."""
    batches: list[list[list[int]]] = []
    for ids in samples:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0]) == len(ids):
            batches[-1].append(ids)
        else:
            batches.append([ids])
    return [torch.tensor(b, dtype=torch.long) for b in batches]
