"""Shared test helpers: launching real torchrun jobs and comparing checkpoints tensor by tensor.

torch and safetensors are imported where a helper needs them, so `make check`'s docs and config tests
start without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def run_nvfp4_pp(config: Path, nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m nvfp4_pp.run CONFIG ARGS` on CPU/gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "nvfp4_pp.run", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def tensor_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Every name, dtype, shape or bit difference between two state dicts."""
    import torch

    diffs = [f"only in first: {k}" for k in sorted(set(a) - set(b))]
    diffs += [f"only in second: {k}" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(_bits(x), _bits(y)):
            diffs.append(f"{k}: values differ")
    return diffs


TOKEN_LENGTHS = (64, 48, 96, 32)


def write_token_file(model_dir: Path, path: Path, lengths: tuple[int, ...] = TOKEN_LENGTHS) -> Path:
    """Real-text samples of different lengths (pydoc, the model's tokenizer) as an input_ids JSONL."""
    from transformers import AutoTokenizer

    from nvfp4_pp.data.samples import builtin_text

    ids = AutoTokenizer.from_pretrained(model_dir)(builtin_text("pydoc")[:20000])["input_ids"]
    with open(path, "w") as f:
        pos = 0
        for n in lengths:
            f.write(json.dumps({"input_ids": ids[pos : pos + n]}) + "\n")
            pos += n
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
