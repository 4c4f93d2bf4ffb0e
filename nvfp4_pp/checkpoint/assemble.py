"""Rank 0 assembles the checkpoint: shards, index, config, tokenizer; renamed into place at the end.

Nothing appears under the output name until every file is written; the index is written last.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from nvfp4_pp.runtime import stopping
from nvfp4_pp.records import PRODUCER
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.files import write_errors_named, write_json
from nvfp4_pp.checkpoint.formats import CheckpointFormat, Layers
from nvfp4_pp.model.fp8_source import CONFIG_FILES
from nvfp4_pp.checkpoint.output_guard import check_output, remove_own_files
from nvfp4_pp.records import ExportResult
from nvfp4_pp.model.source import SourceCheckpoint

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".msgpack", ".h5")


class AssembleError(NvFp4PpError):
    pass


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the work dir shares the output's filesystem, else a copy with a fresh mode."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Tokenizer, chat template, generation config, license: every non-weight file but config.json.

    Files describing the source's own quantization (an FP8 source's hf_quant_config.json, recipe.yaml)
    are not copied: they would contradict, or for the modelopt layout overwrite, the output's.
    Copies get the process umask's mode, as the shards do, whatever the source file's mode.
    """
    copied, own_files = [], ("config.json", *CONFIG_FILES)
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in own_files and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, target / f.name)
            copied.append(f.name)
    return copied


def layers_of(exports: list[ExportResult]) -> Layers:
    """Every rank's quantized modules (with their scheme), BF16 modules and KV-cache format, together."""
    kv = {e.kv_cache for e in exports if e.kv_cache}
    if len(kv) > 1:
        raise AssembleError(f"ranks calibrated different KV-cache formats {sorted(kv)}")
    return Layers(schemes={name: scheme for e in exports for name, scheme in e.schemes.items()},
                  exclude=sorted({name for e in exports for name in e.excluded}),
                  kv_cache=kv.pop() if kv else None,
                  embeddings=tuple(sorted({name for e in exports for name in e.embeddings})))


def assemble(
    output: Path,
    shard_dirs: dict[int, Path],
    exports: list[ExportResult],
    source: SourceCheckpoint,
    fmt: CheckpointFormat,
    overwrite: bool,
    finalize: Callable[[Path, dict[str, str]], None] | None = None,
) -> Path:
    """Link every rank's shards into a temp dir with final names, add metadata, rename to `output`.

    `shard_dirs` maps each rank to the directory on this host holding its shards (see gather.py).
    The work directory keeps its files until the output is in place, so a cut-off assembly resumes.
    `finalize(tmp, checksums)` runs on the complete temp dir just before the rename (verification, model
    card, the record with every file's sha256: the shards' are in `checksums`); if it raises, `output` is
    left untouched.
    """
    output = Path(output)
    for pattern in (f".{output.name}.tmp-*", f".{output.name}.old-*"):
        for stale in output.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)  # an earlier assembly that was cut off (the lock is ours)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        with write_errors_named(tmp, 0):
            shards = [(rank, s) for rank, e in enumerate(exports) for s in e.shards]
            weight_map: dict[str, str] = {}
            checksums: dict[str, str] = {}
            total = 0
            for i, (rank, shard) in enumerate(shards, 1):
                src = Path(shard_dirs[rank]) / shard.file
                if not src.is_file():
                    raise AssembleError(
                        f"rank {rank}'s shard {src} is missing on rank 0 after gathering; was the work "
                        "directory changed during the run? Rerun (gathered files are reused)"
                    )
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                link_or_copy(src, tmp / name)  # the work dir keeps its copy until the output is in place
                checksums[name] = shard.sha256
                for tensor in shard.tensors:
                    if tensor in weight_map:
                        raise AssembleError(f"tensor {tensor!r} was written twice ({weight_map[tensor]}, {name})")
                    weight_map[tensor] = name
                total += shard.bytes
            layers = layers_of(exports)
            config = source.config_without_quantization()  # an FP8 source's block must not survive
            config["quantization_config"] = fmt.quantization_config(layers, PRODUCER)
            write_json(tmp / "config.json", config)
            for name, content in fmt.extra_files(layers, PRODUCER).items():
                write_json(tmp / name, content)
            copy_side_files(source.path, tmp)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(tmp / "model.safetensors.index.json", index)
            if finalize is not None:
                finalize(tmp, checksums)
        check_output(output, overwrite)  # again: something may have appeared there during the run
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-assembled directory behind
        raise
    put_in_place(tmp, output)
    return output


def put_in_place(tmp: Path, output: Path) -> None:
    """Rename `tmp` to `output`. An existing output (already checked replaceable) is moved aside first and
    removed after; an interrupt waits until both renames are done, so one of the two is always in place."""
    old = None
    with stopping.deferred():
        if output.exists() or output.is_symlink():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
        os.replace(tmp, output)
    if old is not None and old.is_symlink():
        old.unlink()  # a link to a checkpoint: the link is replaced, its target stays
    elif old is not None:
        remove_own_files(old)
