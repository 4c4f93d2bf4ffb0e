"""The calibration set: token-id samples built on the first rank only, their manifest and micro-batches.

Sources are the built-in corpus, `.jsonl` / `.txt` files (read in file order) and Hugging Face
datasets (`hf:`, rows shuffled with `calibration.seed`), alone or mixed by share. Each sample is
kept only inside the length window; chat rows are rendered with the model's own chat template.
Everything is a pure function of the config and the data, so a run's choice and order repeat.
A source that yields fewer samples than asked is an error saying why rows were skipped
(`samples: all` takes whatever a single source yields), and token ids given verbatim are checked
against the model's vocabulary, so neither surfaces later as a quieter set or an IndexError.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nvfp4_pp.config import CalibrationConfig, DataSource
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.records import CalibrationManifest, SourceSummary
from nvfp4_pp.data.hf_datasets import HFDataError, as_messages, find_field, open_dataset


class CalibrationDataError(NvFp4PpError):
    pass


def builtin_text(name: str) -> str:
    """Offline corpora that ship with every CPython, so demos and tests never download."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    raise CalibrationDataError(
        f"calibration.dataset 'builtin:{name}' does not exist; the built-in corpus is 'builtin:pydoc'"
    )


@functools.lru_cache(maxsize=2)
def _auto_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


class Tokenizer:
    """The model's tokenizer, loaded on first use (once per directory): text to ids, chat messages to
    ids via its template."""

    def __init__(self, directory: str | Path):
        self.directory = directory

    @property
    def hf(self):
        return _auto_tokenizer(str(self.directory))

    @property
    def ids(self) -> list[int]:
        """Every id the tokenizer can produce (added tokens included)."""
        return list(self.hf.get_vocab().values())

    def text(self, text: str) -> list[int]:
        return self.hf(text)["input_ids"]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids the model is served with: `apply_chat_template` exactly, nothing added."""
        if not self.hf.chat_template:
            raise CalibrationDataError(
                f"calibration data holds chat messages but the tokenizer in {self.directory} has no chat "
                "template; use a text column (calibration.field) or a model with a chat template")
        return list(self.hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    @property
    def pad_id(self) -> int:
        """Right-padding id (its positions are masked out of every statistic, so any id would do)."""
        for candidate in (self.hf.pad_token_id, self.hf.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0


def _chunks(ids: list[int], length: int) -> Iterator[list[int]]:
    return (ids[i : i + length] for i in range(0, len(ids), length))


def _jsonl_rows(path: Path, cfg: CalibrationConfig, tok: Tokenizer, vocab_size: int | None) -> Iterator[list[int]]:
    """`input_ids` rows verbatim (longer than max_length, or an id outside the vocabulary, is an error),
    `text` / `messages` tokenised."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path}:{lineno} is not valid JSON: {e.msg} column {e.colno}") from e
            if isinstance(row, dict) and isinstance(row.get("input_ids"), list):
                ids = row["input_ids"]
                if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise CalibrationDataError(f"{path}:{lineno}: 'input_ids' must be a non-empty list of integers")
                if len(ids) > cfg.max_length:
                    raise CalibrationDataError(
                        f"{path}:{lineno} has {len(ids)} input_ids, more than calibration.max_length="
                        f"{cfg.max_length}; raise max_length or shorten the sample"
                    )
                outside = [] if vocab_size is None else [i for i in ids if not 0 <= i < vocab_size]
                if outside:
                    assert vocab_size is not None
                    raise CalibrationDataError(
                        f"{path}:{lineno}: token id {outside[0]} is outside the model's vocabulary of {vocab_size} "
                        f"ids (0..{vocab_size - 1}; {len(outside)} such ids on this line); were these ids made with "
                        "another tokenizer? Tokenize with the model's own, or give 'text' instead")
                yield ids
            elif isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"]:
                yield tok.text(row["text"])
            elif isinstance(row, dict) and (messages := as_messages(row.get("messages"))):
                yield tok.chat(messages)
            else:
                raise CalibrationDataError(
                    f"{path}:{lineno} has neither 'input_ids' (list of ints) nor 'text' (string)"
                )


def _hf_rows(source: DataSource, seed: int, tok: Tokenizer, resolved: dict) -> Iterator[list[int]]:
    """Rows of an `hf:` dataset in a seeded shuffle, tokenised one at a time (only as many as needed)."""
    spec = source.dataset.removeprefix("hf:")
    try:
        data = open_dataset(spec, source.config, source.split)
        field = find_field(list(data.column_names), source.field, f"calibration.dataset {source.dataset!r}")
    except HFDataError as e:
        raise CalibrationDataError(str(e)) from None
    resolved.update(field=field, rows=len(data))
    column = data.select_columns([field])
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    for index in order:
        value: Any = column[index][field]
        if isinstance(value, str):
            yield tok.text(value) if value.strip() else []  # an empty row counts as too short
            continue
        messages = as_messages(value)
        if messages is None:
            raise CalibrationDataError(
                f"calibration.dataset {source.dataset!r} row {index}: column {field!r} holds neither text nor a "
                "list of role/content messages; set calibration.field to the text or messages column")
        yield tok.chat(messages)


def _source_rows(source: DataSource, cfg: CalibrationConfig, tok: Tokenizer, resolved: dict,
                 vocab_size: int | None) -> Iterator[list[int]]:
    """Candidate samples of one source, before the length window."""
    dataset = source.dataset
    if dataset.startswith("builtin:"):
        return _chunks(tok.text(builtin_text(dataset.removeprefix("builtin:"))), cfg.max_length)
    if dataset.startswith("hf:"):
        return _hf_rows(source, cfg.seed, tok, resolved)
    path = Path(dataset)
    if not path.is_file():
        raise CalibrationDataError(f"calibration.dataset file {dataset!r} does not exist")
    if dataset.endswith(".jsonl"):
        return _jsonl_rows(path, cfg, tok, vocab_size)
    return _chunks(tok.text(path.read_text()), cfg.max_length)


def _windowed(rows: Iterator[list[int]], cfg: CalibrationConfig, count: int | None,
              skipped: dict) -> list[list[int]]:
    """The first `count` rows (every row: None) inside [min_length, max_length] (longer ones cut or
    skipped, as configured); `skipped` counts the rows read and those skipped."""
    out: list[list[int]] = []
    for ids in rows:
        if len(out) == count:
            break
        skipped["read"] += 1
        if len(ids) < cfg.min_length:
            skipped["short"] += 1
        elif len(ids) > cfg.max_length and cfg.too_long == "skip":
            skipped["long"] += 1
        else:
            out.append(ids[: cfg.max_length])
    return out


def shares_to_counts(shares: list[float], total: int) -> list[int]:
    """Split `total` samples by share (largest remainder, ties to the earlier source): sums to `total`."""
    exact = [total * s / sum(shares) for s in shares]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _pack(samples: list[list[int]], length: int) -> list[list[int]]:
    """One stream cut into rows of exactly `length` (a short tail is kept only if it is all there is)."""
    rows = list(_chunks([t for s in samples for t in s], length))
    return rows[:-1] if len(rows) > 1 and len(rows[-1]) < length else rows


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """The samples every stage sees, in order, and where they came from."""

    samples: list[list[int]]
    sources: tuple[SourceSummary, ...]
    tokenizer: Tokenizer = dataclasses.field(repr=False, compare=False)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.samples).encode()).hexdigest()

    def manifest(self) -> CalibrationManifest:
        """Source(s), count, total tokens, min/median/max length and a hash of the token ids."""
        lengths = [len(s) for s in self.samples]
        return CalibrationManifest(self.sources, len(lengths), sum(lengths), min(lengths),
                                   statistics.median(lengths), max(lengths), self.sha256)


def _too_few(source: DataSource, cfg: CalibrationConfig, found: int, count: int, skipped: dict,
             mixed: bool) -> CalibrationDataError:
    """How many samples a source gave, why rows were skipped, and the fixes."""
    why = (f"{skipped['read']} rows read: {skipped['short']} shorter than min_length {cfg.min_length}, "
           f"{skipped['long']} longer than max_length {cfg.max_length} skipped")
    asked = f"the {count} samples its share asks" if mixed else f"the {count} samples asked"
    fixes = ("add data, widen calibration.min_length / max_length, or lower calibration.samples" if mixed else
             f"add data, widen calibration.min_length / max_length, or set calibration.samples to {found} (or all)")
    return CalibrationDataError(f"calibration.dataset {source.dataset!r} gave {found} of {asked} ({why}); {fixes}")


def load_samples(cfg: CalibrationConfig, tokenizer_dir: str | Path, vocab_size: int | None = None) -> CalibrationSet:
    """The calibration set of `cfg`: the same config and data always give the same ids in the same order.

    `vocab_size` (the model's embedding rows), when given, bounds the ids of `input_ids` rows.
    """
    tok = Tokenizer(tokenizer_dir)
    sources = cfg.sources()
    counts = [None] if cfg.samples == "all" else shares_to_counts([s.share for s in sources], cfg.samples)
    samples: list[list[int]] = []
    report: list[SourceSummary] = []
    for source, count in zip(sources, counts):
        resolved: dict = {}
        skipped = {"read": 0, "short": 0, "long": 0}
        rows = _source_rows(source, cfg, tok, resolved, vocab_size) if count != 0 else iter(())
        chosen = _windowed(rows, cfg, count, skipped)
        if not chosen and count != 0:
            raise CalibrationDataError(
                f"calibration.dataset {source.dataset!r} holds no samples"
                + (f" of {cfg.min_length} to {cfg.max_length} tokens ({skipped['short']} shorter, "
                   f"{skipped['long']} longer skipped); widen calibration.min_length / max_length"
                   if skipped["short"] or skipped["long"] else ""))
        if count is not None and len(chosen) < count:
            raise _too_few(source, cfg, len(chosen), count, skipped, len(sources) > 1)
        hf = dict(config=source.config, split=source.split, **resolved) if source.dataset.startswith("hf:") else {}
        report.append(SourceSummary(source.dataset, len(chosen), sum(map(len, chosen)), skipped["short"],
                                    skipped["long"], share=source.share if len(sources) > 1 else None, **hf))
        samples += chosen
    if len(sources) > 1:
        random.Random(cfg.seed).shuffle(samples)
    if cfg.pack:
        samples = _pack(samples, cfg.max_length)
    return CalibrationSet(samples, tuple(report), tok)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """Token ids [B, T], right-padded; `lengths` says how many positions of each row are real."""

    ids: torch.Tensor
    lengths: tuple[int, ...]


def micro_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[MicroBatch]:
    """Samples grouped by length, up to `batch_size` per batch, right-padded to the batch's longest.

    Samples of equal length batch without any padding. Pads sit after every real token, so the
    causal attention of real positions never sees them, and the statistics mask them out
    (`calibrate.ValidTokens`). Batch size 1 keeps the samples' own order.
    """
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i])) if batch_size > 1 else range(len(samples))
    order = list(order)
    batches = []
    for start in range(0, len(order), batch_size):
        group = [samples[i] for i in order[start : start + batch_size]]
        width = max(map(len, group))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in group], dtype=torch.long)
        batches.append(MicroBatch(ids, tuple(map(len, group))))
    return batches


def valid_mask(lengths: tuple[int, ...], width: int) -> torch.Tensor | None:
    """[B, T] True at real tokens; None when no row is padded."""
    if all(n == width for n in lengths):
        return None
    return torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)

