"""YAML run configuration -> frozen dataclasses, validated before any work starts.

Every error names the key, the value and the fix, so a typo costs seconds, not a cluster run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from nvfp4_pp.algorithms.table import (
    ALGORITHMS,
    AUTO,
    AUTO_CANDIDATES,
    GUARD_FULLEST,
    GUARD_NONE,
    RECIPES,
    AlgorithmName,
    CandidateName,
    GuardName,
    KvCacheName,
    OverrideName,
    RecipeName,
)
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.vllm_contract import VLLM_RELEASE, declared_config, vllm_problems


class ConfigError(NvFp4PpError):
    """A configuration problem; the message names the key and how to fix it."""


def expand_path(value: str, key: str) -> str:
    """`~` and `$VARS` expanded, as a shell would; an unset variable is an error, never a literal directory."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ConfigError(f"config key '{key}' = {value!r} uses ${unset.group(1)}, which is not set in the "
                          "environment; set it or write the path out")
    return expanded


def expand_dataset(dataset: str, key: str) -> str:
    """A dataset name with its path part expanded (`hf:~/data/x`, `$DATA/calib.jsonl`; `builtin:` as is)."""
    if dataset.startswith("builtin:"):
        return dataset
    if dataset.startswith("hf:"):
        return "hf:" + expand_path(dataset.removeprefix("hf:"), key)
    return expand_path(dataset, key)


def _expand(record: object, key: str, field: str, expand=expand_path) -> None:
    """Replace a path field of a frozen config record by its expansion (in __post_init__)."""
    value = getattr(record, field)
    if value:
        object.__setattr__(record, field, expand(value, key))


def _check_dataset_form(dataset: str, key: str) -> None:
    if not (dataset.startswith(("builtin:", "hf:")) or dataset.endswith((".jsonl", ".txt"))):
        raise ConfigError(
            f"config key '{key}' = {dataset!r} is not a known form; use 'builtin:pydoc', a .jsonl or .txt "
            "file, or 'hf:NAME' (a Hugging Face dataset name, a save_to_disk directory, or a "
            ".parquet/.json/.arrow file)"
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DataSource:
    """One part of a calibration mix: a dataset and its share of the samples."""

    dataset: str
    """Same forms as `calibration.dataset` (a single name)."""
    share: float = 1.0
    """Relative weight: this source's part of `calibration.samples` is share / sum of shares."""
    config: str = ""
    """`hf:` datasets: the dataset's configuration name (e.g. `3.0.0` for cnn_dailymail)."""
    split: str = "train"
    """`hf:` datasets: which split to read."""
    field: str = ""
    """Column holding the text or chat messages; empty: found by name (article, text, messages, ...)."""

    def __post_init__(self) -> None:
        _expand(self, "calibration.dataset", "dataset", expand_dataset)
        if self.share <= 0:
            raise ConfigError(f"config key 'calibration.dataset' share of {self.dataset!r} must be > 0, got {self.share}")
        _check_dataset_form(self.dataset, "calibration.dataset")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CalibrationConfig:
    """Which samples calibrate the activation scales, and how they are batched."""

    dataset: Union[str, list[DataSource]] = "builtin:pydoc"
    """`builtin:pydoc`, a `.jsonl` or `.txt` file, `hf:NAME` (a Hugging Face dataset, a save_to_disk
    directory, a .parquet/.json/.arrow file), or a mix: a list of {dataset, share, config, split, field}."""
    config: str = ""
    """`hf:` dataset configuration name (single dataset; a mix names it per source)."""
    split: str = "train"
    """`hf:` dataset split (single dataset; a mix names it per source)."""
    field: str = ""
    """Column with the text or chat messages; empty: found by name (single dataset; a mix names it per source)."""
    samples: Union[int, Literal["all"]] = 64
    """Number of calibration samples: a dataset that yields fewer is an error naming what was skipped;
    `all` takes every sample a single dataset yields."""
    min_length: int = 1
    """Samples with fewer tokens are skipped."""
    max_length: int = 1024
    """Tokens per sample at most; text files are cut into pieces of this length."""
    too_long: Literal["truncate", "skip"] = "truncate"
    """What happens to a dataset row longer than `max_length`: cut to it, or skipped."""
    seed: int = 0
    """Shuffle of `hf:` dataset rows (and of a mix): a fixed seed gives the same choice and order."""
    batch_size: int = 1
    """Samples per micro-batch sent through the pipeline (grouped by length; pads never enter statistics)."""
    pack: bool = False
    """Concatenate the samples and cut the stream into rows of exactly `max_length` tokens (no padding)."""

    def __post_init__(self) -> None:
        if isinstance(self.dataset, str):
            _expand(self, "calibration.dataset", "dataset", expand_dataset)
        for key in ("samples", "min_length", "max_length", "batch_size"):
            if getattr(self, key) != "all" and getattr(self, key) < 1:
                raise ConfigError(
                    f"config key 'calibration.{key}' must be >= 1, got {getattr(self, key)}"
                )
        if self.min_length > self.max_length:
            raise ConfigError(
                f"config key 'calibration.min_length' = {self.min_length} is above max_length = "
                f"{self.max_length}; lower min_length or raise max_length"
            )
        if isinstance(self.dataset, str):
            _check_dataset_form(self.dataset, "calibration.dataset")
        elif not self.dataset:
            raise ConfigError("config key 'calibration.dataset' is an empty list; name at least one source")
        elif self.samples == "all":
            raise ConfigError("config key 'calibration.samples' is 'all', which takes every sample of a single "
                              "dataset; a mix splits a number of samples by share: give a number")
        elif self.config or self.field or self.split != "train":
            raise ConfigError(
                "config keys 'calibration.config', 'split' and 'field' apply to a single dataset; "
                "in a mix, give them to each source under 'calibration.dataset'"
            )

    def sources(self) -> list[DataSource]:
        """The configured sources, a single dataset being a mix of one."""
        if isinstance(self.dataset, str):
            return [DataSource(dataset=self.dataset, config=self.config, split=self.split, field=self.field)]
        return list(self.dataset)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """How decoder layers are split over ranks and how ranks talk."""

    layers: Union[Literal["auto"], list[int]] = "auto"
    """`auto`, or one decoder-layer count per rank, e.g. [41, 41, 6]."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Hidden-state transport: `auto` is NCCL when every rank's stage is on CUDA, else gloo."""
    device: Union[Literal["auto", "cpu", "cuda"], list[Literal["auto", "cpu", "cuda"]]] = "auto"
    """Where stages run (one value, or one per rank): `auto` is cuda:LOCAL_RANK when CUDA exists, else CPU."""
    memory_limit_gb: Union[None, float, list[float], dict[str, float]] = None
    """Cap on measured budgets in GB: a number for every rank, a per-rank list, or host -> GB shared by its ranks."""
    reserve_gb: float = 2.0
    """GB of host RAM left untouched on each host (budgets of CPU and unified-memory ranks)."""
    timeout_s: int = 1800
    """Seconds any collective or send/recv may wait before the run fails."""
    stream: Literal["auto", "always", "never"] = "auto"
    """`auto`: a stage whose layers do not fit its budget streams them (layers brought to the device a
    window at a time, all samples through one layer before the next; stages then run in turn),
    the others stay resident; `always`: every stage streams; `never`: refuse a model that does not fit."""

    def __post_init__(self) -> None:
        if isinstance(self.layers, list) and any(n < 1 for n in self.layers):
            raise ConfigError(
                f"config key 'pipeline.layers' = {self.layers}: every rank needs at least one "
                "layer; remove the zero entries or use fewer ranks"
            )
        limits = self.memory_limit_gb
        values = ([] if limits is None else list(limits.values()) if isinstance(limits, dict)
                  else limits if isinstance(limits, list) else [limits])
        if any(v <= 0 for v in values):
            raise ConfigError(
                f"config key 'pipeline.memory_limit_gb' = {limits!r}: limits must be > 0 GB; "
                "leave the key out to use the measured memory"
            )
        if self.reserve_gb < 0:
            raise ConfigError(f"config key 'pipeline.reserve_gb' must be >= 0, got {self.reserve_gb}")
        if self.timeout_s < 1:
            raise ConfigError(f"config key 'pipeline.timeout_s' must be >= 1, got {self.timeout_s}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GatherConfig:
    """How rank 0 collects the shards every rank exported into its own host's work directory."""

    shared: Union[Literal["auto"], bool] = "auto"
    """Whether rank 0 sees the other ranks' work directories: `auto` checks at run time (marker files)."""
    transfer: Literal["process_group", "rsync"] = "process_group"
    """How files move when not shared: chunks over the run's process group, or `rsync` from a daemon."""
    work_dir: str = ""
    """This host's scratch directory for exported shards; empty: `<output>.nvfp4_pp-work` next to output."""
    rsync_port: int = 29510
    """Port (+ LOCAL_RANK) of the short-lived rsync daemon each sending rank serves (transfer: rsync)."""

    def __post_init__(self) -> None:
        _expand(self, "gather.work_dir", "work_dir")
        if not 1 <= self.rsync_port <= 65535 - 64:
            raise ConfigError(f"config key 'gather.rsync_port' must be a TCP port below 65471, got {self.rsync_port}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LayerwiseConfig:
    """Layer-by-layer calibration: each decoder layer calibrated on the outputs of the layers before it."""

    enable: bool = False
    """`true`: capture each stage's inputs, then calibrate its layers one at a time, each on the
    previous layer's quantized outputs (modelopt's layerwise mode, fed by the stage's own forward).
    `false`: every layer calibrated at once in the pipelined passes."""
    boundary: Literal["parallel", "sequential"] = "parallel"
    """Where each stage's first layer gets its inputs: `parallel` from one pipelined BF16 pass (every
    stage solves at once), `sequential` from the previous stage's quantized outputs once it has
    solved its last layer (stages in turn; equals the single-process layerwise result)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class GptqConfig:
    """GPTQ's settings (`algorithm: gptq`); empty keys take modelopt's defaults."""

    damping: Union[None, float] = None
    """Fraction of the mean Hessian diagonal added to it before inversion (modelopt's `perc_damp`,
    default 0.01); raise it when a layer's solve reports a Hessian that is not positive definite."""
    block_size: Union[None, int] = None
    """Columns updated together (modelopt's default 128; a multiple of the recipe's group size)."""

    def __post_init__(self) -> None:
        if self.damping is not None and not 0 < self.damping <= 1:
            raise ConfigError(f"config key 'gptq.damping' must be in (0, 1], got {self.damping}")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"config key 'gptq.block_size' must be >= 1, got {self.block_size}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AutoConfig:
    """`algorithm: auto`: the algorithms tried on every decoder layer, and how they are judged."""

    candidates: list[CandidateName] = dataclasses.field(default_factory=list)
    """Algorithms tried on each layer; empty: every one of them that fits the recipe and format. Each
    fits a copy of the layer on the calibration micro-batches not held out; the one whose output errs
    least on the held-out ones is then fitted on all of them. (With a candidate that searches NVFP4
    block scales, every layer gets that search's static-scale weight quantizer.)"""
    held_out: float = 0.25
    """Share of the calibration micro-batches (the last ones; at least one, and one left to fit on; at
    most half) on which each candidate's layer output is compared with the BF16 layer's."""
    guard: GuardName = GUARD_NONE
    """The run-level guard: one candidate also runs alone beside `auto` (its own copy of each layer, on
    its own layers' outputs), and before export the run keeps whichever is nearer BF16 on the held-out
    micro-batches, `auto`'s layers or that candidate's (then exactly what a run of it alone writes).
    Judged out of sample (each side fitted on the micro-batches not held out): by the model's
    next-token KL with the sequential boundary, by each stage's output error with the parallel one
    (each stage keeps its better). `fullest`: the last candidate the algorithm table lists (the
    fullest stack that fits: the best alone in docs/quality.md); a candidate's name: that one; `none`
    (the default): no guard. Off by default because a few held-out calibration micro-batches misjudged:
    on SmolLM2 (16 x 256 calibration tokens, H200) it kept `smooth+gptq` over INT4 `auto`, whose
    held-out text KL is lower (0.043 against 0.048; docs/algorithms.md). Costs two fits of that
    candidate per layer and its layers in host memory (planned); a streaming stage skips it, and a run
    interrupted before the verdict calibrates again from its first layer."""

    def __post_init__(self) -> None:
        if not 0 < self.held_out <= 0.5:
            raise ConfigError(f"config key 'auto.held_out' must be above 0 and at most 0.5, got {self.held_out}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"config key 'auto.candidates' names an algorithm twice: {self.candidates}")
        if self.candidates and self.guard not in (GUARD_FULLEST, GUARD_NONE, *self.candidates):
            raise ConfigError(f"config key 'auto.guard' names {self.guard}, which is not among auto.candidates "
                              f"{self.candidates}; add it there, or set 'auto.guard: {GUARD_FULLEST}'")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ServingConfig:
    """Who reads the checkpoint: the run refuses, before any weight loads, a recipe and layout that reader cannot load."""

    target: Literal["vllm", "tensorrt-llm", "sglang", "transformers", "none"] = "vllm"
    """`vllm`: the recipe and `format` must be loadable by vLLM 0.34.0 (the release whose loader tables
    nvfp4_pp/vllm_contract.py pins; docs/serving.md has the table); a pair it does not load is refused
    naming the layout that works. `tensorrt-llm`, `sglang` or `none` (no engine: identity checks, other
    tools) state another reader, which is not checked: the run writes the layout as modelopt exports it,
    `verify` does not require vLLM to load it, and the card names the readers instead of a vLLM command.
    `transformers`: the compressed-tensors layout (transformers has no loader for modelopt's)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """One quantization run: source model, output, on-disk format, calibration and pipeline."""

    model: str
    """Directory of the BF16 Hugging Face checkpoint (config.json, *.safetensors, tokenizer)."""
    output: str
    """Directory the quantized checkpoint is written to (created atomically at the end)."""
    base_model: str = ""
    """Hugging Face Hub id of the source (`org/name`), for the model card's `base_model`; empty: taken from
    the source when it says it (a Hub cache path, or config.json `_name_or_path` of that form), else left out."""
    format: Literal["compressed-tensors", "modelopt"] = "compressed-tensors"
    """On-disk layout: `compressed-tensors` (vLLM and transformers read it) or `modelopt`."""
    recipe: RecipeName = "nvfp4"
    """Quantization recipe, one modelopt config each (docs/recipes.md; code: nvfp4_pp/algorithms/table.py RECIPES)."""
    recipe_overrides: dict[str, OverrideName] = dataclasses.field(default_factory=dict)
    """Module name pattern -> recipe for the Linears it matches, e.g. {"*mlp*": mxfp4, "*self_attn*": fp8}."""
    ignore: list[str] = dataclasses.field(default_factory=list)
    """Module names or `*` patterns kept in BF16 (lm_head always is)."""
    algorithm: AlgorithmName = "max"
    """How weights are fitted to the grid (docs/algorithms.md): `max` rounds each to the nearest point of
    the scale its block's maximum sets; `gptq` compensates each rounding error in the columns not yet
    rounded, from the Hessian of the layer's inputs (modelopt's GPTQ; best layer by layer, see
    `layerwise`); `awq_lite` searches per-channel pre-scales (w4a16_int4; for NVFP4 use recipe nvfp4_awq);
    NVFP4 block-scale searches (CUDA ranks): `local_hessian` (scales minimizing the output error weighted
    by each block's local Hessian), `mse` (scales minimizing weight MSE over the FP8 scale values),
    `four_over_six` (per block, the FP4 grid's max mapped to 4 or 6, whichever errs less); per decoder
    layer (needs `layerwise`): `smooth` (smoothing scales searched with weights and activations quantized,
    folded into the RMSNorm or up_proj before the Linears), the stacks `smooth+gptq`, `local_hessian+gptq`,
    `smooth+local_hessian`, `smooth+local_hessian+gptq` (each step on the previous one's weights and
    scales), and `auto`: per layer, whichever of `auto.candidates` errs least on held-out calibration tokens."""
    gptq: GptqConfig = dataclasses.field(default_factory=GptqConfig)
    auto: AutoConfig = dataclasses.field(default_factory=AutoConfig)
    kv_cache: Union[None, KvCacheName] = None
    """`fp8`: calibrate static K and V scales in the same pass (vLLM's FP8 KV cache)."""
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    layerwise: LayerwiseConfig = dataclasses.field(default_factory=LayerwiseConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    gather: GatherConfig = dataclasses.field(default_factory=GatherConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("config key 'model' is empty; set it to the source checkpoint directory")
        if not self.output:
            raise ConfigError("config key 'output' is empty; set it to the output directory")
        _expand(self, "model", "model")
        _expand(self, "output", "output")
        if self.layerwise.enable and self.calibration.batch_size > 1 and not self.calibration.pack:
            raise ConfigError("layerwise.enable calibrates each layer with modelopt's own statistics, which cannot "
                              "skip pad positions; set calibration.batch_size: 1 or calibration.pack: true")
        self._check_algorithm()
        self._check_serving()
        awq = self.recipe == "nvfp4_awq" or "nvfp4_awq" in self.recipe_overrides.values()
        if awq and self.format == "compressed-tensors":
            raise ConfigError("recipe nvfp4_awq keeps AWQ pre-quant scales, which compressed-tensors has no field "
                              "for; set 'format: modelopt'" + (f" with a 'serving.target' (vLLM {VLLM_RELEASE} does not "
                              "load NVFP4_AWQ: tensorrt-llm, sglang, none), or choose recipe nvfp4"
                                                             if self.serving.target == "vllm" else ""))

    @property
    def algorithms(self) -> list[str]:
        """The algorithms this run calibrates with: `algorithm`, or under `auto` its candidates (by default
        every one that fits the recipe and format)."""
        if self.algorithm != AUTO:
            return [self.algorithm]
        named = self.auto.candidates or [a for a in AUTO_CANDIDATES if self._misfit(a) is None]
        return list(named)

    @property
    def guarded(self) -> str | None:
        """The candidate `auto`'s guard runs alone beside it; None: no guard (or no `auto`)."""
        if self.algorithm != AUTO or self.auto.guard == GUARD_NONE:
            return None
        if self.auto.guard != GUARD_FULLEST:
            return self.auto.guard
        return max(self.algorithms, key=AUTO_CANDIDATES.index)

    def _check_algorithm(self) -> None:
        """An algorithm other than max fits one recipe's weights, listed in the algorithm table; `auto`
        chooses per layer among candidates that each fit."""
        if self.gptq != GptqConfig() and "gptq" not in self.algorithms:
            fix = "add gptq to auto.candidates" if self.algorithm == AUTO else "set the algorithm"
            raise ConfigError(f"config section 'gptq' applies to 'algorithm: gptq', not {self.algorithm}; {fix} "
                              "or remove the section")
        if self.auto != AutoConfig() and self.algorithm != AUTO:
            raise ConfigError(f"config section 'auto' applies to 'algorithm: auto', not {self.algorithm}; set the "
                              "algorithm or remove the section")
        if ALGORITHMS[self.algorithm].layer_by_layer and not self.layerwise.enable:
            what = "chooses an algorithm" if self.algorithm == AUTO else "works"
            raise ConfigError(f"algorithm {self.algorithm} {what} per decoder layer, which needs layer-by-layer "
                              "calibration; set 'layerwise.enable: true'")
        if self.algorithm != AUTO:
            if (problem := self._misfit(self.algorithm)) is not None:
                raise ConfigError(problem)
            return
        for name in self.auto.candidates:
            if (problem := self._misfit(name)) is not None:
                raise ConfigError(f"auto.candidates: {problem}")
        if len(self.algorithms) < 2:
            fix = "name two in 'auto.candidates'" if self.auto.candidates else "choose one algorithm instead"
            why = "" if self.auto.candidates else " (" + "; ".join(
                f"{a}: {self._misfit(a)}" for a in AUTO_CANDIDATES if a not in self.algorithms) + ")"
            raise ConfigError(f"algorithm auto needs two candidates; for recipe {self.recipe} in the {self.format} "
                              f"layout it has {self.algorithms}{why}; {fix}")
        if self.guarded is not None and self.guarded not in self.algorithms:
            raise ConfigError(f"auto.guard: {self._misfit(self.guarded)}")

    @property
    def schemes(self) -> list[str]:
        """The schemes this run writes: its recipe's and its overrides' (ignored modules aside)."""
        named = [*RECIPES[self.recipe].schemes, *(s for r in self.recipe_overrides.values() for s in RECIPES[r].schemes)]
        return sorted(set(named))

    def _check_serving(self) -> None:
        """The layout of this run's schemes is one its serving target loads (vLLM: the pinned loader tables)."""
        target = self.serving.target
        if target == "transformers" and self.format == "modelopt":
            raise ConfigError("serving.target transformers: transformers has no loader for the modelopt layout; set "
                              "'format: compressed-tensors', or another serving.target")
        if target != "vllm":
            return
        what = f"recipe {self.recipe}" + (" with recipe_overrides" if self.recipe_overrides else "")
        qc = declared_config(self.format, self.schemes)
        if qc is None or not vllm_problems(qc):
            return  # no such layout: refused below with its own line
        other = "modelopt" if self.format == "compressed-tensors" else "compressed-tensors"
        other_qc = declared_config(other, self.schemes)
        fix = (f"set 'format: {other}', which it loads" if other_qc is not None and not vllm_problems(other_qc) else
               "choose recipe nvfp4, which it loads in both layouts")
        raise ConfigError(f"{what} in the {self.format} layout is not loadable by vLLM {VLLM_RELEASE} "
                          f"({vllm_problems(qc)[0]}); {fix}, or set 'serving.target' to the engine that will read it "
                          "(tensorrt-llm, sglang, none)")

    def _misfit(self, algorithm: str) -> str | None:
        """Why `algorithm` cannot calibrate this run's recipe and format, or None when it can."""
        recipes = ALGORITHMS[algorithm].recipes
        if recipes is None:  # fits every recipe
            return None
        if algorithm == "awq_lite" and self.recipe == "nvfp4":
            return "NVFP4 with AWQ-lite is recipe nvfp4_awq; set 'recipe: nvfp4_awq' and drop 'algorithm'"
        if self.recipe not in recipes:
            return (f"algorithm {algorithm} fits the weights of recipes {list(recipes)}, not recipe {self.recipe}; "
                    "choose one of them or 'algorithm: max'")
        if self.recipe_overrides:
            return f"algorithm {algorithm} runs on one recipe; remove recipe_overrides or use 'algorithm: max'"
        if algorithm == "awq_lite" and self.format == "compressed-tensors":
            return ("algorithm awq_lite keeps AWQ pre-quant scales, which compressed-tensors has no field for; set "
                    "'format: modelopt'" + (f" with a 'serving.target' (vLLM {VLLM_RELEASE} does not load modelopt's "
                                           "INT4: tensorrt-llm, sglang, none)" if self.serving.target == "vllm" else ""))
        return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        item = get_args(tp)[0]
        return "a list of " + {int: "integers", str: "strings", float: "numbers"}.get(item, _type_name(item))
    if origin is dict:
        return "a mapping to " + {float: "numbers"}.get(get_args(tp)[1], _type_name(get_args(tp)[1]))
    if dataclasses.is_dataclass(tp):
        return f"mappings with keys {[f.name for f in dataclasses.fields(tp)]}"
    return {int: "an integer", str: "a string", bool: "true or false", float: "a number", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(tp)[0]) for v in value)
    if origin is dict:
        key, item = get_args(tp)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _dataclass_list(tp: Any) -> type | None:
    """The dataclass D when `tp` is `list[D]` or a Union holding it, else None."""
    for option in get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,):
        if get_origin(option) is list and dataclasses.is_dataclass(get_args(option)[0]):
            return get_args(option)[0]
    return None


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types by name."""
    where = f"section '{prefix[:-1]}'" if prefix else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} of the config must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys in {where} are "
            f"{sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        listed = _dataclass_list(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        elif listed is not None and isinstance(value, list):
            kwargs[name] = [_build(listed, v, f"{prefix}{name}[{i}].") for i, v in enumerate(value)]
        elif not _matches(value, tp):
            raise ConfigError(
                f"config key '{prefix}{name}' must be {_type_name(tp)}, got {value!r}"
            )
        else:
            kwargs[name] = value
    missing = [
        n for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"config key '{prefix}{missing[0]}' is required but missing")
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set a.b=value` in place; the value is parsed as YAML (`[1,28,1]`, `8`, `x`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. calibration.samples=64")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {assignment!r}: the value {raw!r} is not valid YAML ({problem}); write a list "
                          f"as [1, 2] or quote text: --set '{key}=\"...\"'") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config, apply `--set` overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # its own text spans several lines: the place and the problem, in one
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)


def config_from_dict(data: dict) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a RunConfig."""
    return _build(RunConfig, data, "")


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts (pinned by a test so none appears by accident)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain-dict form of a config (for logs, resume fingerprints and the model card)."""
    return dataclasses.asdict(cfg)
