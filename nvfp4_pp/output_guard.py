"""What a run may write to: never the model, and an existing output only if nvfp4_pp wrote it.

The model, the output and the work directory must lie apart (none inside another), whatever the
flags. An existing output is replaced only when it is empty or is an nvfp4_pp checkpoint (it holds
the run record), and then only with --overwrite; any other directory is refused, so a mistyped
`output` can never delete a model or a user's files. Checked before any weight is loaded and
again just before the finished checkpoint is renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

from .card import RECORD
from .errors import NvFp4PpError


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


def check_output(output: str | Path, overwrite: bool) -> None:
    """An existing output may be replaced (empty, or nvfp4_pp's with --overwrite), and its filesystem is writable."""
    output = Path(output)
    if output.is_symlink() or output.exists():
        if not output.is_dir():
            raise OutputError(f"output {output} exists and is not a directory; choose another 'output'")
        if any(output.iterdir()):
            if not (output / RECORD).is_file():
                raise OutputError(f"output {output} is a non-empty directory that nvfp4_pp did not write (it has no "
                                  f"{RECORD}); nvfp4_pp replaces only its own checkpoints or an empty directory: "
                                  "choose another 'output'")
            if not overwrite:
                raise OutputError(f"output {output} already holds an nvfp4_pp checkpoint; pass --overwrite to "
                                  "replace it or choose another 'output'")
    existing = next(p for p in [output.parent.absolute(), *output.parent.absolute().parents] if p.exists())
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputError(f"output {output} is on a read-only filesystem ({existing}); choose an 'output' on a "
                          "writable one")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {output}: no write permission in {existing}; choose another "
                          "'output'")
