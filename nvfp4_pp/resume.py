"""Completed phases recorded in the output's work directory, so a rerun continues where it stopped.

Each rank keeps `state.json` (the run's fingerprint and its completed phases), the calibrated
quantizer state after calibration, and its exported shards with their sha256. A rerun with the
same fingerprint reuses them; a different config, model or code version refuses them and says
which field changed (`--fresh` discards them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .writer import sha256_of, write_errors_named

STATE_FILE = "state.json"
QUANTIZER_FILE = "quantizers.pt"


class StaleWorkState(RuntimeError):
    pass


def _atomic_write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(content, indent=2, sort_keys=True)
    with write_errors_named(path, len(text)):
        tmp.write_text(text)
        os.replace(tmp, path)


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
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in set(saved["fingerprint"]) | set(fingerprint)
                             if saved["fingerprint"].get(k) != fingerprint.get(k))
            if changed:
                raise StaleWorkState(
                    f"work directory {self.directory} holds state of a different run ({', '.join(changed)} "
                    "changed); rerun with --fresh to discard it and start over"
                )
            self.phases = saved["phases"]
        self._save()

    def _save(self) -> None:
        _atomic_write_json(self.directory / STATE_FILE, {"fingerprint": self.fingerprint, "phases": self.phases})

    def done(self, phase: str) -> bool:
        return phase in self.phases

    def record(self, phase: str, result: dict | None = None) -> None:
        self.phases[phase] = result or {}
        self._save()

    def forget(self, *phases: str) -> None:
        for phase in phases:
            self.phases.pop(phase, None)
        self._save()

    # calibrated quantizers --------------------------------------------------------------
    def save_quantizers(self, stage: torch.nn.Module) -> None:
        """modelopt's mode state plus every quantizer buffer (amaxes): a few MB, no weights."""
        import modelopt.torch.opt as mto

        state = {
            "modelopt_state": mto.modelopt_state(stage),
            "quantizers": {k: v.cpu() for k, v in stage.state_dict().items() if "_quantizer." in k},
        }
        tmp = self.directory / f".{QUANTIZER_FILE}.tmp"
        with write_errors_named(self.directory / QUANTIZER_FILE, 0):
            torch.save(state, tmp)
            os.replace(tmp, self.directory / QUANTIZER_FILE)

    def restore_quantizers(self, stage: torch.nn.Module) -> None:
        """Re-insert the quantizers and load the saved amaxes: the stage is as calibration left it."""
        import modelopt.torch.opt as mto

        # Our own file, written by save_quantizers; modelopt's state holds plain Python objects.
        state = torch.load(self.directory / QUANTIZER_FILE, weights_only=False)
        mto.restore_from_modelopt_state(stage, state["modelopt_state"])
        result = stage.load_state_dict(state["quantizers"], strict=False)
        if result.unexpected_keys:
            raise StaleWorkState(f"saved quantizer state does not fit the stage: {result.unexpected_keys[:3]}")

    # exported shards ---------------------------------------------------------------------
    def shards_intact(self, shard_dir: Path) -> bool:
        """True when every shard recorded by the export phase exists with its recorded sha256."""
        shards = self.phases.get("export", {}).get("shards")
        if not shards:
            return False
        return all((shard_dir / s["file"]).is_file() and sha256_of(shard_dir / s["file"]) == s["sha256"]
                   for s in shards)
