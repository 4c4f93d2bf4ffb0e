"""The output's run record, `nvfp4_pp.json`: what ran, on what data, where, how long, how healthy, what
the checkpoint holds, and the sha256 of every file written beside it. The model card, its pictures,
its Serving section and the run's final line are rendered from this record alone.

One writer (`write_run_record`) and one reader (`read_run_record`). The reader takes this schema
and the records nvfp4_pp 0.1.0 to 0.2.0 wrote before the record had a schema number (schema 1: the
ranks kept only their excluded modules and KV-cache format; the quantized Linears were listed once
for the whole run), and refuses a newer schema with one line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

from nvfp4_pp.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.files import write_json
from nvfp4_pp.records import (
    RECORD,
    CalibrationManifest,
    CheckpointFacts,
    Charts,
    ExportResult,
    LayerChoice,
    LinearStats,
    RankReport,
    from_plain,
)
from nvfp4_pp.publish.source_card import SourceCard

SCHEMA = 2
"""2: a `schema` field, every rank's whole report (its shards, schemes and Linears). 1 (no field):
nvfp4_pp 0.1.0 to 0.2.0."""
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class RunRecordError(NvFp4PpError):
    """A run record this nvfp4_pp cannot read (newer, damaged, or not nvfp4_pp's)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Producer:
    name: str
    version: str


@dataclasses.dataclass(frozen=True, slots=True)
class CalibrationRecord:
    """The calibration set as measured (the config's `calibration` section says what was asked)."""

    micro_batches: int
    manifest: CalibrationManifest

    def to_dict(self, asked: dict) -> dict:
        """The config's calibration keys, then what was measured (`samples`: the count actually used)."""
        m = self.manifest
        return {**asked, "samples": m.samples, "tokens": m.tokens, "micro_batches": self.micro_batches,
                "samples_sha256": m.token_ids_sha256, "manifest": m.to_dict()}


@dataclasses.dataclass(frozen=True, slots=True)
class RunRecord:
    """One finished run, as its nvfp4_pp.json holds it."""

    producer: Producer
    modelopt_version: str
    config: RunConfig
    algorithms: tuple[str, ...]
    """What the run calibrated with: the algorithm, or `auto`'s candidates."""
    source: SourceCard
    backend: str
    """What carried the hidden states between stages (gloo, nccl, single process)."""
    calibration: CalibrationRecord
    ranks: tuple[RankReport, ...]
    wall_s: float
    assemble_s: float
    verification: str
    """`passed`, or `N problem(s)`."""
    checkpoint: CheckpointFacts
    charts: Charts = Charts()
    files: dict[str, str | None] = dataclasses.field(default_factory=dict)
    """Every file beside the record -> its sha256 (the card's: None)."""
    schema: int = SCHEMA

    @property
    def linears(self) -> dict[str, LinearStats]:
        """Every quantized Linear of the run, rank by rank."""
        return {name: stats for r in self.ranks for name, stats in sorted(r.export.linears.items())}

    @property
    def schemes(self) -> dict[str, int]:
        """Quantized Linears per scheme."""
        return dict(sorted(Counter(s for r in self.ranks for s in r.export.schemes.values()).items()))

    @property
    def kept_bf16(self) -> list[str]:
        """Modules a loader could take for quantized Linears that were kept in BF16."""
        return sorted({n for r in self.ranks for n in r.export.excluded})

    @property
    def layer_choices(self) -> list[LayerChoice]:
        """`algorithm: auto`: every rank's per-layer choices, in layer order (none for other algorithms)."""
        return [c for r in self.ranks for c in r.choices]

    def to_dict(self) -> dict:
        """The JSON form. `schemes` and `kept_bf16` are summaries for people reading the file (the
        ranks hold the facts; the reader does not read them back)."""
        config = config_to_dict(self.config)
        return {
            "schema": self.schema, "producer": dataclasses.asdict(self.producer),
            "modelopt_version": self.modelopt_version, "config": config, "algorithms": list(self.algorithms),
            "source": self.source.to_dict(), "backend": self.backend,
            "calibration": self.calibration.to_dict(config["calibration"]),
            "ranks": [r.to_dict() for r in self.ranks], "schemes": self.schemes, "kept_bf16": self.kept_bf16,
            "wall_s": self.wall_s, "assemble_s": self.assemble_s, "verification": self.verification,
            "checkpoint": self.checkpoint.to_dict(), "charts": self.charts.to_dict(), "files": self.files,
        }


def write_run_record(directory: Path, record: RunRecord) -> None:
    """The one writer of nvfp4_pp.json."""
    write_json(Path(directory) / RECORD, record.to_dict())


def read_run_record(path: Path) -> RunRecord:
    """The record in `path` (a checkpoint directory or the file itself), of this schema or schema 1."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunRecordError(f"{path}: cannot read the run record ({e})") from None
    return run_record_from_dict(data, str(path))


def run_record_from_dict(data: dict, where: str = RECORD) -> RunRecord:
    """A RunRecord from the plain form of this schema or schema 1 (see the module's docstring)."""
    if not isinstance(data, dict) or (data.get("producer") or {}).get("name") != "nvfp4_pp":
        raise RunRecordError(f"{where} is not a run record nvfp4_pp wrote (no producer nvfp4_pp)")
    schema = data.get("schema", 1)
    if schema not in (1, SCHEMA):
        version = data["producer"].get("version", "?")
        raise RunRecordError(f"{where} has run record schema {schema!r}, which this nvfp4_pp does not read "
                             f"(it reads 1 to {SCHEMA}); read it with the nvfp4_pp that wrote it ({version}) or a newer one")
    try:
        config = config_from_dict(data["config"])
        ranks = data["ranks"] if schema == SCHEMA else _ranks_of_schema_1(data)
        calibration = data["calibration"]
        return RunRecord(
            producer=from_plain(Producer, data["producer"]), modelopt_version=data["modelopt_version"],
            config=config, algorithms=tuple(data["algorithms"]), source=from_plain(SourceCard, data["source"]),
            backend=data["backend"],
            calibration=CalibrationRecord(calibration["micro_batches"],
                                          from_plain(CalibrationManifest, calibration["manifest"])),
            ranks=tuple(from_plain(RankReport, r) for r in ranks), wall_s=data["wall_s"],
            assemble_s=data["assemble_s"], verification=data["verification"],
            checkpoint=from_plain(CheckpointFacts, data["checkpoint"]), charts=from_plain(Charts, data.get("charts", {})),
            files=dict(data.get("files", {})), schema=SCHEMA)
    except ConfigError as e:
        raise RunRecordError(f"{where}: the run's config does not read as this nvfp4_pp's config ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise RunRecordError(f"{where}: the run record is incomplete or damaged ({type(e).__name__}: {e})") from None


def _ranks_of_schema_1(data: dict) -> list[dict]:
    """Schema 1's ranks as whole reports: each rank's export rebuilt from what the record kept (its
    excluded modules and KV-cache format, and its Linears from the run's list by layer index; the
    shards were not kept)."""
    spans = [r["layers"] for r in data["ranks"]]
    ranks = []
    for i, r in enumerate(data["ranks"]):
        mine = {name: stats for name, stats in data["linears"].items() if _owner(name, spans) == i}
        export = ExportResult(shards=(), schemes={n: s["scheme"] for n, s in mine.items()}, kv_cache=r["kv_cache"],
                              excluded=tuple(r["excluded"]),
                              linears={n: from_plain(LinearStats, s) for n, s in mine.items()})
        rest = {k: v for k, v in r.items() if k not in ("excluded", "kv_cache")}
        ranks.append({**rest, "export": export.to_dict()})
    return ranks


def _owner(name: str, spans: list[list[int]]) -> int:
    """The rank whose decoder layers [start, stop) hold a Linear (one outside every layer: rank 0)."""
    match = LAYER_INDEX.search(name)
    if match is None:
        return 0
    index = int(match.group(1))
    return next(i for i, (start, stop) in enumerate(spans) if start <= index < stop)
