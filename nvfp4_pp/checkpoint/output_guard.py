"""What a run may write to: never the model, and an existing output only if nvfp4_pp wrote it.

The model, the output and the work directory must lie apart (none inside another), whatever the
flags. An existing output is replaced only when it is empty or is an nvfp4_pp checkpoint, and then
only with --overwrite. A checkpoint is nvfp4_pp's only if its run record names nvfp4_pp as producer
and lists every file in the directory (a record file alone proves nothing: anyone can write one);
any other directory is refused naming the first foreign file, so a mistyped `output` can never
delete a model or a user's files. Checked before any weight is loaded and again just before the
finished checkpoint is renamed into place, and a replaced checkpoint loses exactly its own files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeGuard

from nvfp4_pp.records import RECORD
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.files import nearest_existing
from nvfp4_pp.log import logger


class OutputError(NvFp4PpError):
    """`output` (or the work directory) would overwrite something nvfp4_pp must not touch."""


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_paths(model: str | Path, output: str | Path, work_dir: str | Path) -> None:
    """Model, output and work directory apart (symlinks resolved)."""
    m, o, w = (Path(os.path.realpath(p)) for p in (model, output, work_dir))
    if o == m:
        raise OutputError(f"output {output} is the model directory; nvfp4_pp never writes into its source: "
                          "choose another 'output'")
    if _within(o, m):
        raise OutputError(f"output {output} lies inside the model directory {model}; choose an 'output' outside it")
    if _within(m, o):
        raise OutputError(f"output {output} contains the model directory {model}; replacing it would delete the "
                          "model: choose another 'output'")
    if _within(w, m) or _within(m, w):
        raise OutputError(f"the work directory {work_dir} and the model directory {model} overlap; set "
                          "gather.work_dir (or 'output', which it defaults beside) outside the model")
    if _within(w, o) or _within(o, w):
        raise OutputError(f"the work directory {work_dir} and output {output} overlap; set gather.work_dir "
                          "outside the output")


def _record(directory: Path) -> dict | None:
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _by_nvfp4_pp(record: dict | None) -> TypeGuard[dict]:
    return record is not None and isinstance(record.get("producer"), dict) and record["producer"].get("name") == "nvfp4_pp"


def _listed(record: dict | None) -> list[str] | None:
    """The files a record of nvfp4_pp lists (itself included), or None for any other record."""
    if not _by_nvfp4_pp(record) or not isinstance(record.get("files"), dict):
        return None
    return [RECORD, *record["files"]]


def own_files(directory: Path) -> list[str] | None:
    """The files of `directory` that its run record says nvfp4_pp wrote (the record included), or None
    when the record is missing, unreadable, not nvfp4_pp's, or has no file list (before 0.2)."""
    return _listed(_record(directory))


def _first(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more entries" if len(names) > 1 else "")


def _foreign(directory: Path) -> str:
    """Why a non-empty `directory` is not nvfp4_pp's to replace, naming its first foreign file (empty: it is)."""
    entries = sorted(os.listdir(directory))
    record = _record(directory)
    own = _listed(record)
    if own is None:
        if RECORD not in entries:
            what = f"no {RECORD}"
        elif _by_nvfp4_pp(record):
            what = (f"an {RECORD} of nvfp4_pp before 0.2, which kept no list of the files it wrote (delete the "
                    "directory yourself if it holds nothing else)")
        else:
            what = f"an {RECORD} that nvfp4_pp did not write (no producer or file list)"
        return f"it holds {_first([e for e in entries if e != RECORD] or entries)}, and {what}"
    foreign = sorted(set(entries) - set(own))
    return f"it holds {_first(foreign)}, which nvfp4_pp did not write" if foreign else ""


def check_output(output: str | Path, overwrite: bool) -> None:
    """An existing output may be replaced (empty, or nvfp4_pp's with --overwrite), and its filesystem is writable."""
    output = Path(output)
    if output.is_symlink() or output.exists():
        if not output.is_dir():
            raise OutputError(f"output {output} exists and is not a directory; choose another 'output'")
        if any(output.iterdir()):
            why = _foreign(output)
            if why:
                raise OutputError(f"output {output} is a non-empty directory that nvfp4_pp did not write: {why}; "
                                  "nvfp4_pp replaces only its own checkpoints or an empty directory: choose another "
                                  "'output' (or move those files away)")
            if not overwrite:
                raise OutputError(f"output {output} already holds an nvfp4_pp checkpoint; pass --overwrite to "
                                  "replace it or choose another 'output'")
    existing = nearest_existing(output.parent)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputError(f"output {output} is on a read-only filesystem ({existing}); choose an 'output' on a "
                          "writable one")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {output}: no write permission in {existing}; choose an 'output' "
                          "in a directory you can write")


def remove_own_files(directory: Path) -> None:
    """Delete a replaced checkpoint: exactly the files its record lists, then the directory if that left it
    empty (anything that appeared in it since the last check stays, and so does the directory)."""
    for name in own_files(directory) or []:
        path = directory / name
        if path.is_file() or path.is_symlink():
            path.unlink()
    try:
        directory.rmdir()
    except OSError:
        logger.warning("the replaced checkpoint's directory %s still holds files nvfp4_pp did not write; left "
                       "in place", directory)
