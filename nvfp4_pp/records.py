"""What one phase hands the next: small frozen records, plain dicts only on their way to disk.

Each record has one writer (the phase that makes it) and typed readers. `to_dict` / `from_dict`
exist for the three files that hold them: `state.json` (a rank's finished phases),
`calibration.json` (the calibration set's manifest) and the output's `nvfp4_pp.json` (the run
record the model card is rendered from, run_record.py). `from_plain` reads any of them back from
its plain form, field by field as the class declares them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

from nvfp4_pp import __version__

T = TypeVar("T")

RECORD = "nvfp4_pp.json"
"""The run record. Its `files` maps every file the run wrote beside it to its sha256 (the card's is null:
`evaluate --update-card` edits it): what makes a directory nvfp4_pp's own, and what `verify` re-checks."""
PRODUCER = {"name": "nvfp4_pp", "version": __version__}
"""Who wrote a run record: a directory is nvfp4_pp's own only if its record names this producer."""


def _plain(value: Any) -> Any:
    """Records, tuples and dicts of them -> JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_plain(cls: type[T], data: dict) -> T:
    """A record from its plain (JSON) form: nested records, tuples and dicts of them rebuilt from the
    field types; a field the data lacks takes its default (records written before it existed), one
    the class does not know is left out."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _typed(hints[f.name], data[f.name]) for f in dataclasses.fields(typing.cast(Any, cls)) if f.name in data})


def _typed(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        records = [a for a in args if dataclasses.is_dataclass(a)]
        return _typed(records[0], value) if records else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_plain(tp, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in value)
        return tuple(_typed(a, v) for a, v in zip(args, value))
    if origin is dict:
        return {k: _typed(args[1], v) for k, v in value.items()}
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
        return from_plain(cls, d)


@dataclasses.dataclass(frozen=True, slots=True)
class ShardRecord:
    """One safetensors file a rank wrote: its tensors, payload bytes and the sha256 it was written with."""

    file: str
    tensors: tuple[str, ...]
    bytes: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> ShardRecord:
        return from_plain(cls, d)


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
        return from_plain(cls, d)


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
        return from_plain(cls, d)


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
        return from_plain(cls, d)


@dataclasses.dataclass(frozen=True, slots=True)
class AutoGuard:
    """`algorithm: auto`'s run-level guard (calibration/auto_guard.py): the held-out error of `auto`'s layers
    and of the guarded candidate run alone, and which were kept."""

    errors: dict[str, float | None]
    """"auto" and the candidate -> held-out error (`measure`); None: not finite."""
    kept: str
    """"auto", or the candidate whose layers replaced auto's."""
    judged_on: int
    """Micro-batches judged (the last ones: those `auto` holds out per layer)."""
    measure: str = "KL"
    """"KL": the model's mean next-token KL to BF16 per token (the same verdict on every stage);
    "output error": this stage's relative squared output error (parallel boundary: per stage)."""

    def to_dict(self) -> dict:
        return _plain(self)


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
    guard: AutoGuard | None = None
    """`algorithm: auto`: the run-level guard's verdict (the same on every rank); None: it did not run."""
    gptq_solve: dict[str, float] = dataclasses.field(default_factory=dict)
    """GPTQ: seconds of the solve per decoder layer this run solved (layer index -> its Linears' damped
    inverses and updates; Hessians and passes not counted)."""

    def to_dict(self) -> dict:
        """The rank's entry in nvfp4_pp.json, every field (`from_plain` reads it back)."""
        return _plain(self)

    def peaks_text(self) -> str:
        """The measured peak beside the planner's prediction, per memory pool: 'host 1.20/1.50'."""
        measured, predicted = self.measured.pools(), self.predicted.pools()
        return " ".join(f"{pool} {measured[pool] / 1e9:.2f}/{predicted[pool] / 1e9:.2f}" for pool in sorted(measured))


@dataclasses.dataclass(frozen=True, slots=True)
class CalibrateProgress:
    """Progress inside the calibrate phase (layer by layer), kept in the work state for a rerun."""

    choices: dict[int, LayerChoice] = dataclasses.field(default_factory=dict)
    """`algorithm: auto`: what each of this stage's solved layers got."""
    inputs_saved: bool = False
    """This stage's first layer's inputs are in the work directory (layerwise.INPUTS_FILE)."""
    guard: AutoGuard | None = None
    """`algorithm: auto`: the run-level guard's verdict, once given."""

    def to_dict(self) -> dict:
        return {"choices": {str(i): c.to_dict() for i, c in sorted(self.choices.items())}, "inputs": self.inputs_saved,
                "guard": None if self.guard is None else self.guard.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> CalibrateProgress:
        guard = d.get("guard")
        return cls({int(i): LayerChoice.from_dict(c) for i, c in d.get("choices", {}).items()}, d.get("inputs", False),
                   None if guard is None else from_plain(AutoGuard, guard))


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointFacts:
    """What the card's Serving section needs, read from the written checkpoint's own files
    (serving.checkpoint_facts)."""

    method: str | None
    """The quantization config's method as vLLM reads it (`modelopt`, `compressed-tensors`)."""
    schemes: tuple[str, ...]
    kv_cache_scales: bool
    max_model_len: int | None
    bytes: int
    """Tensor bytes (the index's total_size)."""
    sampling: dict[str, float]
    """generation_config.json's sampling defaults."""
    chat_template: str | None
    """The file holding the chat template vLLM applies, if any."""

    def to_dict(self) -> dict:
        return _plain(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Charts:
    """The card's pictures that were drawn (file names beside the card); None: not drawn."""

    timeline: str | None = None
    layers: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in _plain(self).items() if v is not None}
