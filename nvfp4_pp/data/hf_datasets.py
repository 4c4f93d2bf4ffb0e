"""Rows of a Hugging Face dataset (`calibration.dataset: hf:...`), read offline with `datasets`.

`datasets` is an optional extra: it is imported only when an `hf:` source is configured, and a
run never downloads. A hub name is read from the local Hugging Face cache; a directory written by
`save_to_disk`, or a `.parquet` / `.json` / `.arrow` file, is read where it lies.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from nvfp4_pp.errors import NvFp4PpError

INSTALL_HINT = "pip install 'nvfp4_pp[data]'"
KNOWN_FIELDS = ("messages", "conversations", "text", "article", "content", "document")
"""Columns tried in this order when `calibration.field` is empty (chat sets, wikitext/pile, cnn_dailymail)."""
FILE_BUILDERS = {".parquet": "parquet", ".json": "json"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class HFDataError(NvFp4PpError):
    """An `hf:` source cannot be read; the message names the dataset and the fix."""


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise HFDataError(f"calibration.dataset 'hf:...' needs the 'datasets' package: {INSTALL_HINT}") from None
    datasets.disable_progress_bars()  # one line per phase in the run's log, not per-file bars
    return datasets


@contextlib.contextmanager
def _offline(datasets):
    """The hub is never asked: a cached dataset loads, an uncached one fails at once."""
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _fetch_hint(name: str, config: str, split: str) -> str:
    args = ", ".join([repr(name), *([repr(config)] if config else []), f"split={split!r}"])
    return (f"fetch it once where there is network with `python -c \"import datasets; datasets.load_dataset({args})\"` "
            "(it lands in the Hugging Face cache, HF_HOME), or write it with Dataset.save_to_disk and set "
            "calibration.dataset to 'hf:/path/to/that/directory'")


def open_dataset(spec: str, config: str, split: str):
    """The `datasets.Dataset` named by `hf:spec`, never touching the network."""
    datasets = _import_datasets()
    path = Path(spec).expanduser()
    where = f"calibration.dataset 'hf:{spec}'"
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise HFDataError(f"{where} is a directory but not one written by save_to_disk ({e})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise HFDataError(f"{where} has no split {split!r}; its splits are {sorted(data)}: set calibration.split")
            data = data[split]
        return data
    if path.suffix in (*FILE_BUILDERS, ".arrow"):
        if not path.is_file():
            raise HFDataError(f"{where}: file {str(path)!r} does not exist")
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    if path.is_absolute() or spec.startswith("."):
        raise HFDataError(f"{where}: {str(path)!r} does not exist (expected a save_to_disk directory or a "
                          ".parquet, .json or .arrow file)")
    with _offline(datasets):
        try:
            return datasets.load_dataset(spec, config or None, split=split)
        except Exception as e:  # datasets raises many kinds for "not cached"; all mean the same here
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise HFDataError(f"{where} (config {config!r}, split {split!r}) is not available offline ({cause}); "
                              + _fetch_hint(spec, config, split)) from None


def find_field(columns: list[str], field: str, where: str) -> str:
    """The column holding text or chat messages: `field` when given, else the first known name."""
    if field:
        if field not in columns:
            raise HFDataError(f"{where} has no column {field!r}; its columns are {columns}: set calibration.field "
                              "to one of them")
        return field
    for name in KNOWN_FIELDS:
        if name in columns:
            return name
    raise HFDataError(f"{where} has none of the known text columns {list(KNOWN_FIELDS)}; its columns are "
                      f"{columns}: set calibration.field to the one with the text or the chat messages")


def as_messages(value: Any) -> list[dict[str, str]] | None:
    """A chat row as role/content messages (ShareGPT's from/value accepted), or None if it is not one."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    messages = []
    for m in value:
        if isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
            messages.append({"role": m["role"], "content": m["content"]})
        elif m.get("from") in SHAREGPT_ROLES and isinstance(m.get("value"), str):
            messages.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        else:
            return None
    return messages
