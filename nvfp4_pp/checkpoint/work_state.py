"""Completed phases recorded in the output's work directory, so a rerun continues where it stopped.

Each rank keeps `state.json` (the run's fingerprint and its completed phases), the calibrated
quantizer state after calibration, and its exported shards with their sha256. A rerun with the
same fingerprint reuses them; a different config, model or code version refuses them and says
which field changed (`--fresh` discards them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from nvfp4_pp.config import RunConfig, config_to_dict
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.files import file_intact, write_errors_named, write_json
from nvfp4_pp.log import logger
from nvfp4_pp.phases import RECORDED, Phase
from nvfp4_pp.records import CalibrateProgress, ExportResult
from nvfp4_pp.model.source import SourceCheckpoint

STATE_FILE = "state.json"
QUANTIZER_FILE = "quantizers.pt"


class StaleWorkState(NvFp4PpError):
    pass


class Record(Protocol):
    def to_dict(self) -> dict: ...


R = TypeVar("R", bound=Record)


def work_dir_of(cfg: RunConfig) -> Path:
    """This host's scratch directory for exported shards (gather.work_dir, else next to the output)."""
    if cfg.gather.work_dir:
        return Path(cfg.gather.work_dir)
    output = Path(cfg.output)
    return output.parent / f"{output.name}.nvfp4_pp-work"


def fingerprint(cfg: RunConfig, source: SourceCheckpoint, world_size: int, device_type: str,
                layers: tuple[int, int], streaming: bool, samples_sha256: str) -> dict:
    """Everything that shapes this rank's result; saved progress is reused only when all of it matches."""
    import modelopt
    import transformers

    from nvfp4_pp import __version__

    return {
        "versions": {"nvfp4_pp": __version__, "modelopt": modelopt.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": str(source.path.resolve()),
        "model_config": hashlib.sha256((source.path / "config.json").read_bytes()).hexdigest(),
        "model_files": {f: (source.path / f).stat().st_size for f in sorted(set(source.weight_map.values()))},
        "format": cfg.format,
        "recipe": {"recipe": cfg.recipe, "recipe_overrides": cfg.recipe_overrides, "ignore": cfg.ignore,
                   "kv_cache": cfg.kv_cache, "algorithm": cfg.algorithm, "gptq": config_to_dict(cfg)["gptq"],
                   "auto": config_to_dict(cfg)["auto"]},
        "calibration": config_to_dict(cfg)["calibration"],
        "layerwise": config_to_dict(cfg)["layerwise"],
        "streaming": streaming,
        "samples_sha256": samples_sha256,
        "world_size": world_size,
        "layers": list(layers),
        "device_type": device_type,
    }


class WorkState:
    """One rank's record of finished phases, bound to a fingerprint of everything that shapes the result."""

    def __init__(self, directory: Path, fingerprint: dict, fresh: bool):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        path = self.directory / STATE_FILE
        if fresh and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.phases: dict[str, dict] = {}
        self.calibrate_progress = CalibrateProgress()
        """Progress inside the calibrate phase (kept after it is recorded: a rank whose peers must redo
        the collective phase replays what it has instead of solving again)."""
        self.resumed = path.is_file()
        """A run of this fingerprint was here before: `once` says what it reuses and what it redoes."""
        self._redo_reasons: dict[str, str] = {}
        if self.resumed:
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved["fingerprint"]) | set(fingerprint)
                             if saved["fingerprint"].get(k) != fingerprint.get(k))
            if changed:
                raise StaleWorkState(
                    f"work directory {self.directory} holds state of a different run ({', '.join(changed)} "
                    "changed); rerun with --fresh to discard it and start over"
                )
            self.phases = saved["phases"]
            self.calibrate_progress = CalibrateProgress.from_dict(saved.get("partial", {}).get(Phase.CALIBRATE, {}))
        self._save()

    def _save(self) -> None:
        write_json(self.directory / STATE_FILE,
                   {"fingerprint": self.fingerprint, "phases": self.phases,
                    "partial": {Phase.CALIBRATE.value: self.calibrate_progress.to_dict()}})

    def once(self, phase: Phase, compute: Callable[[], R], reuse: Callable[[dict], R], reused: str,
             usable: Callable[[dict], bool] = lambda _: True, agree: Callable[[bool], bool] = lambda done: done) -> R:
        """The phase's result: `reuse(saved)` when it was recorded and is still usable (and `agree`, told
        whether this rank could reuse, says every rank that must can), else `compute()`, recorded.
        Redoing a phase forgets every later one first. On a rerun either choice is logged, with why."""
        saved = self.phases.get(phase)
        can = saved is not None and usable(saved)
        if agree(can):
            assert saved is not None  # agree is true only where every rank, this one included, can reuse
            logger.info("%s", reused)
            return reuse(saved)
        if self.resumed:
            why = (self._redo_reasons.get(phase, "it was not finished before") if saved is None
                   else "its saved result is missing or damaged" if not can else "another rank has to redo it")
            logger.info("%s: running it (%s)", phase, why)
        for later in RECORDED[RECORDED.index(phase) + 1:]:
            if later in self.phases:
                self._redo_reasons[later] = f"{phase} was redone"
        for later in RECORDED[RECORDED.index(phase):]:
            self.phases.pop(later, None)
        self._save()
        result = compute()
        self.phases[phase] = result.to_dict()
        self._save()
        return result

    def record_calibrate_progress(self, **changes: Any) -> None:
        """Progress inside the calibrate phase (fields of CalibrateProgress), for a rerun to continue from."""
        self.calibrate_progress = dataclasses.replace(self.calibrate_progress, **changes)
        self._save()

    def shards_intact(self, export: ExportResult) -> bool:
        """True when every shard the export recorded exists here with its recorded sha256."""
        return all(file_intact(self.directory / s.file, s.sha256) for s in export.shards)

    # calibrated quantizers --------------------------------------------------------------
    def save_quantizers(self, stage: torch.nn.Module, solved: Sequence[int] = ()) -> None:
        """modelopt's mode state plus every quantizer buffer (amaxes): a few MB, no weights. Layer by
        layer, with the layers `solved` so far, in the same file: a rank killed after the write resumes
        at the next layer, one killed before it re-solves the layer from quantizers it never touched."""
        import modelopt.torch.opt as mto

        state = {
            "modelopt_state": mto.modelopt_state(stage),
            "quantizers": {k: v.cpu() for k, v in stage.state_dict().items() if "_quantizer." in k},
            "solved": list(solved),
        }
        tmp = self.directory / f".{QUANTIZER_FILE}.tmp"
        with write_errors_named(self.directory / QUANTIZER_FILE, 0):
            torch.save(state, tmp)
            os.replace(tmp, self.directory / QUANTIZER_FILE)

    def solved_layers(self) -> set[int]:
        """The layers solved by an interrupted layer-by-layer calibration (none without saved quantizers)."""
        path = self.directory / QUANTIZER_FILE
        if not path.is_file():
            return set()
        return set(torch.load(path, weights_only=False).get("solved", []))

    def restore_quantizers(self, stage: torch.nn.Module) -> None:
        """Re-insert the quantizers and load the saved amaxes: the stage is as calibration left it."""
        import modelopt.torch.opt as mto

        # Our own file, written by save_quantizers; modelopt's state holds plain Python objects.
        state = torch.load(self.directory / QUANTIZER_FILE, weights_only=False)
        mto.restore_from_modelopt_state(stage, state["modelopt_state"])
        result = stage.load_state_dict(state["quantizers"], strict=False)
        if result.unexpected_keys:
            raise StaleWorkState(f"saved quantizer state does not fit the stage: {result.unexpected_keys[:3]}")

    # decoder layers whose weights calibration changed (GPTQ) -------------------------------
    def save_layer(self, index: int, layer: torch.nn.Module) -> None:
        """One decoder layer's weights as calibration left them (quantizers: `save_quantizers`)."""
        path = self.directory / "layers" / f"{index}.pt"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {k: v.detach().cpu() for k, v in layer.state_dict().items() if "_quantizer." not in k}
        with write_errors_named(path, sum(t.numel() * t.element_size() for t in tensors.values())):
            torch.save(tensors, tmp)
            os.replace(tmp, path)

    def restore_layer(self, index: int, layer: torch.nn.Module) -> None:
        tensors = torch.load(self.directory / "layers" / f"{index}.pt", weights_only=True)
        result = layer.load_state_dict(tensors, strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if "_quantizer." not in k]:
            raise StaleWorkState(f"saved layer {index} does not fit the stage; rerun with --fresh")
