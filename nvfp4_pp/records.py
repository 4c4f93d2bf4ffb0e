"""What one phase hands the next: small frozen records, plain dicts only on their way to disk.

Each record has one writer (the phase that makes it) and typed readers. `to_dict` / `from_dict`
exist for the three files that hold them: `state.json` (a rank's finished phases),
`calibration.json` (the calibration set's manifest) and the output's `nvfp4_pp.json` (the run
record the model card is rendered from).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _plain(value: Any) -> Any:
    """Records, tuples and dicts of them -> JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class SourceSummary:
    """One source of the calibration set, as it was read."""

    dataset: str
    samples: int
    tokens: int
    skipped_short: int
    skipped_long: int
    config: str = ""
    """`hf:` sources: the dataset configuration, split, column used and the rows it held."""
    split: str = ""
    field: str = ""
    rows: int = 0
    share: float | None = None
    """Mixes only: the source's configured share."""


@dataclasses.dataclass(frozen=True, slots=True)
class CalibrationManifest:
    """The calibration set every stage saw: where it came from, its size, and a hash of its token ids."""

    sources: tuple[SourceSummary, ...]
    samples: int
    tokens: int
    min_length: int
    median_length: float
    max_length: int
    token_ids_sha256: str

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationManifest:
        return cls(**{**d, "sources": tuple(SourceSummary(**s) for s in d["sources"])})


@dataclasses.dataclass(frozen=True, slots=True)
class ShardRecord:
    """One safetensors file a rank wrote: its tensors, payload bytes and the sha256 it was written with."""

    file: str
    tensors: tuple[str, ...]
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> ShardRecord:
        return cls(d["file"], tuple(d["tensors"]), d["bytes"], d["sha256"])


@dataclasses.dataclass(frozen=True, slots=True)
class LinearStats:
    """One quantized Linear as written: its scheme, how far its decoded weight is from the BF16 one,
    and its calibrated input amax (for the card's per-layer chart)."""

    scheme: str
    weight_error: float | None
    """‖W − decoded‖ / ‖W‖ over the whole weight; None for a scheme without an independent decoder."""
    input_amax: float | None
    """The calibrated input amax (None for schemes that scale inputs at run time, or none at all)."""

    def to_dict(self) -> dict:
        return _plain(self)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportResult:
    """What one rank's export wrote: its shards, the scheme of each quantized Linear, the KV-cache
    format, and the BF16 modules a loader could take for quantized Linears (for the exclude lists)."""

    shards: tuple[ShardRecord, ...]
    schemes: dict[str, str]
    kv_cache: str | None
    excluded: tuple[str, ...]
    embeddings: tuple[str, ...] = ()
    """The modules of `excluded` that are embeddings, not Linears: modelopt's exclude list names them,
    compressed-tensors' `ignore` must not (see formats/compressed_tensors.py)."""
    linears: dict[str, LinearStats] = dataclasses.field(default_factory=dict)
    """Quantized Linear name -> its error and input amax."""

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExportResult:
        return cls(tuple(ShardRecord.from_dict(s) for s in d["shards"]), dict(d["schemes"]), d["kv_cache"],
                   tuple(d["excluded"]), tuple(d.get("embeddings", ())),
                   {k: LinearStats(**v) for k, v in d.get("linears", {}).items()})


@dataclasses.dataclass(frozen=True, slots=True)
class Traffic:
    """One rank's side of a calibration pass: tokens computed, hidden-state bytes sent and received."""

    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> Traffic:
        return cls(**d)


@dataclasses.dataclass(frozen=True, slots=True)
class LayerChoice:
    """`algorithm: auto`: what one decoder layer got, and the held-out output error of every candidate
    (squared error of the layer's quantized output against its BF16 output, relative to the latter's)."""

    layer: int
    chosen: str
    errors: dict[str, float | None]
    """None where a candidate's output was not finite (never chosen)."""
    fitted_on: int
    """Micro-batches each candidate was fitted on (the first ones); the winner then on all."""
    judged_on: int
    """Micro-batches held out to judge them (the last ones)."""

    def to_dict(self) -> dict:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerChoice:
        return cls(**d)


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """Enabled static quantizers with a usable amax, none or zero, NaN/inf; the first unusable names."""

    good: int = 0
    zero: int = 0
    nan: int = 0
    bad: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not (self.zero or self.nan)


@dataclasses.dataclass(frozen=True, slots=True)
class Memory:
    """Bytes per memory pool (`host`, `device`; a unified-memory rank has `host` alone)."""

    host: int
    device: int | None = None

    def pools(self) -> dict[str, int]:
        return {"host": self.host} if self.device is None else {"device": self.device, "host": self.host}


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseSpan:
    """When one phase ran on one rank, in wall-clock seconds since the epoch (for the timeline chart;
    ranks on different hosts compare as well as their clocks agree)."""

    name: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True, slots=True)
class RankReport:
    """What one rank did, sent to rank 0 after export: where it ran, how long, how healthy, how big."""

    rank: int
    host: str
    device: str
    layers: tuple[int, int]
    kind: str
    """Memory kind of the rank's budget: `cpu`, `cuda` or `unified`."""
    phases: dict[str, float]
    """Seconds per phase (load, calibrate, calibration loop, export)."""
    health: Health
    traffic: Traffic
    predicted: Memory
    measured: Memory
    export: ExportResult
    spans: tuple[PhaseSpan, ...] = ()
    """Start and end of each phase (start-up, load, calibrate, export, gather), in run order."""
    choices: tuple[LayerChoice, ...] = ()
    """`algorithm: auto`: each of the stage's layers' algorithm, in layer order."""
    gptq_solve: dict[str, float] = dataclasses.field(default_factory=dict)
    """GPTQ: seconds of the solve per decoder layer this run solved (layer index -> its Linears' damped
    inverses and updates; Hessians and passes not counted)."""

    def to_dict(self) -> dict:
        """The rank's entry in nvfp4_pp.json (shards and schemes are summarised for the whole run)."""
        out = _plain(self)
        export = out.pop("export")
        out["excluded"] = export["excluded"]
        out["kv_cache"] = export["kv_cache"]
        out["measured"] = self.measured.pools()
        return out
