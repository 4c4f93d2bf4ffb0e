"""Guards found by trying to break a run (issue 18): never destroy, never race, never leave a user guessing.

Each case checks the exit status, the one line the user sees, and that every byte of the source
model and of unrelated files is unchanged (sha256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from helpers import write_config
from nvfp4_pp.run import main
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random-weight 6-layer Llama with a 256-word tokenizer: a full run takes seconds."""
    return write_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny") / "llama")


def checksums(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (and the set of directories), by path."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def config(tmp: Path, model: Path, output: Path | str, **sections) -> Path:
    base = {"model": str(model), "output": str(output), "format": "modelopt",
            "calibration": {"dataset": "builtin:pydoc", "samples": 2, "max_length": 16}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return write_config(tmp / "run.yaml", **base)


def run(capsys, cfg: Path, *args: str) -> tuple[int, str, str]:
    """One in-process run (a single rank): exit status, stdout, stderr."""
    code = main([str(cfg), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(lines) == 1, err
    return lines[0]


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.iterdir()]}


def test_files_honour_the_umask(tmp_path, capsys, tiny):
    """Shards were written 0600 (safetensors' own mode), work-dir shards hard-linked into the output too."""
    out = tmp_path / "out"
    cfg = config(tmp_path, tiny, out)
    old = os.umask(0o027)
    try:
        code, _, err = run(capsys, cfg, "--stop-after", "export")
        assert code == 0, err
        rank_dir = tmp_path / "out.nvfp4_pp-work" / "rank0"
        shards = {n: m for n, m in modes(rank_dir).items() if n.endswith(".safetensors")}
        assert shards and set(shards.values()) == {0o640}, shards
        code, _, err = run(capsys, cfg)
        assert code == 0, err
    finally:
        os.umask(old)
    found = modes(out)
    assert found.pop("out") == 0o750
    assert any(n.endswith(".safetensors") for n in found) and set(found.values()) == {0o640}, found
    assert stat.S_IMODE((tiny / "model.safetensors").stat().st_mode) == 0o600  # the source's own mode is not copied
