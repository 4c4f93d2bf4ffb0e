"""Rank 0 assembles the checkpoint: shards, index, config, tokenizer; renamed into place at the end.

Nothing appears under the output name until every file is written; the index is written last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .formats import CheckpointFormat
from .source import SourceCheckpoint

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".msgpack", ".h5")
PRODUCER = {"name": "nvfp4_pp", "version": __version__}


class AssembleError(RuntimeError):
    pass


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer, chat template, generation config, license: every non-weight file but config.json."""
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, target / f.name)
            copied.append(f.name)
    return copied


def assemble(
    output: Path,
    work_dir: Path,
    manifests: list[dict],
    source: SourceCheckpoint,
    fmt: CheckpointFormat,
    overwrite: bool,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Move every rank's shards into a temp dir with final names, add metadata, rename to `output`.

    `finalize(tmp)` runs on the complete temp dir just before the rename (model card, verification);
    if it raises, `output` is left untouched.
    """
    output = Path(output)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards = [(m["rank"], s) for m in manifests for s in m["shards"]]
    weight_map: dict[str, str] = {}
    total = 0
    for i, (rank, shard) in enumerate(shards, 1):
        src = work_dir / f"rank{rank}" / shard["file"]
        if not src.is_file():
            raise AssembleError(
                f"rank {rank}'s shard {src} is not visible from rank 0; the output directory must be "
                "on a filesystem every rank shares"
            )
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(src, tmp / name)
        for tensor in shard["tensors"]:
            if tensor in weight_map:
                raise AssembleError(f"tensor {tensor!r} was written twice ({weight_map[tensor]}, {name})")
            weight_map[tensor] = name
        total += shard["bytes"]
    exclude = sorted({name for m in manifests for name in m["excluded"]})
    config = dict(source.config)
    config["quantization_config"] = fmt.quantization_config(exclude, PRODUCER)
    _write_json(tmp / "config.json", config)
    for name, content in fmt.extra_files(exclude, PRODUCER).items():
        _write_json(tmp / name, content)
    copy_side_files(source.path, tmp)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(tmp / "model.safetensors.index.json", index)
    if finalize is not None:
        finalize(tmp)
    if output.exists():
        if not overwrite:
            raise AssembleError(f"output {output} appeared during the run; rerun with --overwrite")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)
    return output
