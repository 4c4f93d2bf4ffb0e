"""The run's record (a `RunRecord`, run_record.py: what ran, where, how long, calibration health, what
the checkpoint holds) and a README.md model card rendered from it alone, with the Hub's front matter,
the pictures (charts.py) and the Serving section (serving.py); `evaluate --update-card` fills in the
quality section later."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvfp4_pp.algorithms.table import ALGORITHMS, RECIPES
from nvfp4_pp.publish.charts import render_charts
from nvfp4_pp.config import RunConfig
from nvfp4_pp.files import sha256_of
from nvfp4_pp.phases import Phase
from nvfp4_pp.records import PRODUCER, RECORD, AutoGuard, CalibrationManifest, LayerChoice, RankReport, SourceSummary
from nvfp4_pp.publish.run_record import CalibrationRecord, Producer, RunRecord, write_run_record
from nvfp4_pp.publish.serving import checkpoint_facts, serve_command, serving_lines
from nvfp4_pp.publish.source_card import read_source_card
from nvfp4_pp.vllm_contract import VLLM_RELEASE

if TYPE_CHECKING:
    from nvfp4_pp.model.source import SourceCheckpoint  # imports torch: the card is rendered without it

CARD = "README.md"
CALIBRATION_MANIFEST = "calibration.json"
"""The calibration set's manifest, written into rank 0's work directory when the run starts."""
"""Who wrote a file (the run record, and the quantization configs that name their producer)."""
QUALITY_START, QUALITY_END = "<!-- nvfp4_pp:quality -->", "<!-- /nvfp4_pp:quality -->"


def run_record(cfg: RunConfig, source: SourceCheckpoint, reports: list[RankReport], manifest: CalibrationManifest,
               micro_batches: int, wall_s: float, assemble_s: float, problems: list[str], backend: str,
               directory: Path) -> RunRecord:
    """The output's record: what ran, on what data, where, how long, whether it verified, and what the
    (temporary) output `directory` holds."""
    from modelopt import __version__ as modelopt_version

    return RunRecord(
        producer=Producer(**PRODUCER), modelopt_version=modelopt_version, config=cfg, algorithms=tuple(cfg.algorithms),
        source=read_source_card(source.path, source.config, cfg.base_model), backend=backend,
        calibration=CalibrationRecord(micro_batches, manifest), ranks=tuple(reports), wall_s=wall_s,
        assemble_s=assemble_s, verification=f"{len(problems)} problem(s)" if problems else "passed",
        checkpoint=checkpoint_facts(directory))


def _source_text(s: SourceSummary) -> str:
    """One calibration source: where it was read and what it gave."""
    where = ", ".join(f"{k} `{v}`" for k, v in (("config", s.config), ("split", s.split), ("field", s.field)) if v)
    share = f", share {s.share}" if s.share is not None else ""
    skipped = (f"; skipped {s.skipped_short} too short, {s.skipped_long} too long"
               if s.skipped_short or s.skipped_long else "")
    return f"`{s.dataset}`{' (' + where + ')' if where else ''}{share}: {s.samples} samples, {s.tokens} tokens{skipped}"


def _calibration_lines(record: RunRecord) -> list[str]:
    """The calibration set as measured: one line for the set (a mix adds one per source)."""
    m, asked = record.calibration.manifest, record.config.calibration
    sources = m.sources
    what = _source_text(sources[0]) if len(sources) == 1 else f"{m.samples} samples, {m.tokens} tokens"
    lines = [f"- Data: {what}; lengths {m.min_length} / {m.median_length} / {m.max_length} tokens "
             f"(min / median / max){', packed' if asked.pack else ''}, seed {asked.seed}; "
             f"{record.calibration.micro_batches} micro-batches of up to {asked.batch_size} grouped by length (pad "
             f"positions never enter a statistic); token ids sha256 `{m.token_ids_sha256}`."]
    if len(sources) > 1:
        lines += [f"  - {_source_text(s)}." for s in sources]
    return lines


def _pipeline_rows(ranks: tuple[RankReport, ...]) -> list[str]:
    rows = ["| rank | host | device | layers | load s | calibrate s | export s | peak GB measured / predicted "
            "| quantizers good / zero / NaN |",
            "|---:|---|---|---|---:|---:|---:|---:|---|"]
    for r in ranks:
        p, h = r.phases, r.health
        rows.append(f"| {r.rank} | {r.host} | {r.device} | {r.layers[0]}-{r.layers[1] - 1} | "
                    f"{p[Phase.LOAD]:.1f} | {p[Phase.CALIBRATE]:.1f} | {p[Phase.EXPORT]:.1f} | {r.peaks_text()} | "
                    f"{h.good} / {h.zero} / {h.nan} |")
    return rows


RECIPE_TEXT = {name: recipe.card for name, recipe in RECIPES.items()}
"""The card's words for each recipe's Linears (algorithms/table.py)."""
GROUP_SCALES_ONLY = tuple(name for name, recipe in RECIPES.items() if not recipe.per_tensor_scales)
"""Recipes without per-tensor scales: fused q/k/v and gate/up parts keep their own group scales."""
LIBRARY = {"compressed-tensors": "transformers", "modelopt": "Model Optimizer"}
"""The card's `library_name`: transformers loads compressed-tensors checkpoints; modelopt-layout ones have
no transformers loader, and NVIDIA's own releases of that layout name Model Optimizer."""


def front_matter(record: RunRecord) -> list[str]:
    """The YAML block the Hub reads (written by huggingface_hub's ModelCardData), with a comment for
    each field left out and why."""
    from huggingface_hub import ModelCardData

    cfg, source = record.config, record.source
    tags = sorted({"nvfp4_pp", "quantized", "vllm", cfg.format, cfg.recipe,
                   *(a for a in _fitted_by(record) if a != "max"),
                   *(SCHEME_TAGS.get(s, s) for s in record.checkpoint.schemes)}
                  | ({"fp8-kv-cache"} if record.checkpoint.kv_cache_scales else set()))
    data = ModelCardData(base_model=source.hub_id, base_model_relation="quantized" if source.hub_id else None,
                         library_name=LIBRARY[cfg.format], pipeline_tag=source.pipeline_tag, tags=tags,
                         **dict[str, Any](source.license))
    comments = []
    if not source.hub_id:
        comments.append(f"# base_model left out: {source.found_in}")
    if not source.license:
        comments.append("# license left out: the source's README.md front matter names none; add the source's "
                        "license before publishing")
    return ["---", *data.to_yaml().splitlines(), *comments, "---"]


SCHEME_TAGS = {"int4_awq": "int4"}
"""Tags for schemes whose modelopt name says more than the checkpoint holds: modelopt calls every INT4
block-quantized Linear `int4_awq`, AWQ or not (the algorithm gets its own tag)."""


def _fitted_by(record: RunRecord) -> list[str]:
    """The algorithms the written weights were fitted by: the run's, or under `auto` those chosen for some
    layer of a stage that kept `auto`'s layers, and the guarded candidate where its layers were kept."""
    if record.config.algorithm != "auto":
        return [record.config.algorithm]
    return sorted({name for r in record.ranks for name in (
        [r.guard.kept] if r.guard is not None and r.guard.kept != "auto" else [c.chosen for c in r.choices])})


def _algorithm_text(record: RunRecord) -> str:
    """How the weights were fitted, and whether layer by layer (each layer on its predecessors' quantized
    outputs); under `auto`, the candidates and which layers got which."""
    cfg = record.config
    algorithm = cfg.algorithm
    if algorithm == "auto":
        got: dict[str, list[int]] = {}
        choices = record.layer_choices
        for c in choices:
            got.setdefault(c.chosen, []).append(c.layer)
        text = (f"per decoder layer, whichever of {', '.join(f'`{n}`' for n in record.algorithms)} "
                f"made the layer's output err least on held-out calibration tokens (fitted on {_split_text(choices)}; "
                "the winner then fitted on all of them): "
                + "; ".join(f"`{name}` for layer{'s' if len(layers) > 1 else ''} {_ranges(layers)}"
                           for name, layers in sorted(got.items())) + _guard_text(record))
    else:
        text = _ALGORITHM_TEXT[algorithm]
    if cfg.layerwise.enable:
        text += (f"; layer by layer, each layer on its predecessors' quantized outputs (stage boundary: "
                 f"{cfg.layerwise.boundary})")
    solves = sorted(t for rank in record.ranks for t in rank.gptq_solve.values())
    if solves:
        layers = f"{len(solves)} layer{'s' if len(solves) > 1 else ''}"
        text += (f"; GPTQ's solve {sum(solves):.1f} s for {layers} (median {solves[len(solves) // 2]:.2f} s a layer; "
                 "per layer in nvfp4_pp.json)")
    return text + "."


def _guard_text(record: RunRecord) -> str:
    """The run-level guard's verdict (calibration/auto_guard.py), where it ran: one for the run (KL, the
    sequential boundary) or one per stage (parallel)."""
    verdicts = [(r, r.guard) for r in record.ranks if r.guard is not None]
    if not verdicts:
        return ""
    first = verdicts[0][1]
    name = next(n for n in first.errors if n != "auto")
    said = (f". Before export, `{name}` also ran alone beside it, judged likewise on the last {first.judged_on} "
            "micro-batches (each side fitted on the others)")
    if first.measure == "KL":
        return said + f": the model's mean next-token KL to BF16 was {_verdict_text(first)}"
    return said + ", each stage by its outputs' error (the last by the model's KL to BF16): " + "; ".join(
        f"layers {r.layers[0]}-{r.layers[1] - 1}, {_verdict_text(g)}" for r, g in verdicts)


def _verdict_text(guard: AutoGuard) -> str:
    """"auto 0.178, `x` alone 0.173: `x`'s own layers kept (2.8% less)"."""
    name = next(n for n in guard.errors if n != "auto")
    auto, alone = guard.errors["auto"], guard.errors[name]
    figures = f"auto {_figure(auto)}, `{name}` alone {_figure(alone)}"
    if guard.kept == "auto":
        return figures + ": `auto`'s layers kept"
    less = f" ({100 * (1 - alone / auto):.1f}% less)" if auto and alone is not None else ""
    return figures + f": `{name}`'s own layers kept, fitted on every micro-batch as a run of it alone fits them{less}"


def _figure(error: float | None) -> str:
    return "non-finite" if error is None else f"{error:.4g}"


def _split_text(choices: list[LayerChoice]) -> str:
    """"the first 24 micro-batches, judged on the last 8" (the same on every stage: one calibration set)."""
    if not choices:
        return "no layer"
    return f"the first {choices[0].fitted_on} micro-batches, judged on the last {choices[0].judged_on}"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


_ALGORITHM_TEXT = {name: algorithm.card for name, algorithm in ALGORITHMS.items() if algorithm.card is not None}
"""The card's words for each algorithm (algorithms/table.py; `auto`'s are composed from its choices)."""


def render_card(record: RunRecord, output_name: str) -> str:
    """Markdown model card: front matter, recipe, calibration, pipeline, verification, quality, serving."""
    cfg, source, charts = record.config, record.source, record.charts
    recipe = cfg.recipe
    of = f"[`{source.hub_id}`](https://huggingface.co/{source.hub_id})" if source.hub_id else f"`{cfg.model}`"
    unhealthy = [f"rank {r.rank}: {', '.join(r.health.bad)}" for r in record.ranks if not r.health.healthy]
    lines = [
        *front_matter(record),
        f"# {output_name}",
        "",
        f"`{recipe}` quantization of {of}, written by nvfp4_pp {record.producer.version} with "
        f"nvidia-modelopt {record.modelopt_version} in the `{cfg.format}` layout.",
        "",
        "## Recipe",
        f"- Every decoder Linear: {RECIPE_TEXT[recipe]}"
        + ("" if recipe in GROUP_SCALES_ONLY else "; q/k/v and gate/up share their per-tensor scales (vLLM fuses them)")
        + ". No cross-rank amax sync: each stage's statistics are its own.",
        *[f"- Linears matching `{pattern}`: {RECIPE_TEXT[r]}" for pattern, r in cfg.recipe_overrides.items()],
        f"- Weights: {_algorithm_text(record)}",
        *([f"- KV cache: {cfg.kv_cache.upper()} K and V scales calibrated on the data below"] if cfg.kv_cache else []),
        f"- Kept in BF16: {', '.join(f'`{n}`' for n in record.kept_bf16) or 'nothing'} (plus norms).",
        "",
        "## Calibration",
        *_calibration_lines(record),
        "- Health (quantizers with a usable / zero or missing / NaN amax, per rank): "
        + "; ".join(f"rank {r.rank} {r.health.good} / {r.health.zero} / {r.health.nan}" for r in record.ranks) + ".",
    ]
    if unhealthy:
        lines.append("- Quantizers without a usable amax: " + "; ".join(unhealthy))
    if charts.layers:
        lines += ["", f"![Weight error per Linear and input-scale range per layer]({charts.layers})", "",
                  "Relative weight error ‖W − dequant(quant(W))‖ / ‖W‖ of every quantized Linear (decoded from the "
                  "written tensors), and per decoder layer the range of its Linears' calibrated input amax."]
    lines += [
        "",
        "## Pipeline",
        f"{len(record.ranks)} rank(s), torch.distributed pipeline ({record.backend}); "
        f"wall time {record.wall_s:.1f} s, assembly and verification {record.assemble_s:.1f} s.",
        "",
        *([f"![Pipeline timeline: each rank's phases over wall time]({charts.timeline})", ""]
          if charts.timeline else []),
        *_pipeline_rows(record.ranks),
        "",
        "## Verification",
        f"`python -m nvfp4_pp.verify` against vLLM's loader contract for this layout: {record.verification}"
        + _target_note(cfg) + ".",
        "",
        "## Quality",
        QUALITY_START,
        "Not measured by the run. Measure it (weights decoded from these files, W4A16 and emulated W4A4) with:",
        "",
        "```bash",
        evaluate_command(record),
        "```",
        QUALITY_END,
        "",
        *serving_lines(record.checkpoint, cfg.output, output_name),
    ]
    return "\n".join(lines)


def _target_note(cfg: RunConfig) -> str:
    """A checkpoint written for another reader (`serving.target`) was checked for its tensors only."""
    target = cfg.serving.target
    return "" if target == "vllm" else (f" (its tensors and scales; written for `{target}`, so whether vLLM "
                                        f"{VLLM_RELEASE} loads it was not required: see Serving)")


def evaluate_command(record: RunRecord, python: str = "python") -> str:
    """The evaluate command, paths shell-quoted (the final line names the interpreter that ran the job;
    the card, read on other machines, says `python`)."""
    cfg = record.config
    return (f"{python} -m nvfp4_pp.evaluate --source {shlex.quote(cfg.model)} --quantized "
            f"{shlex.quote(cfg.output)} --input-scale-one --update-card")


def write_record_and_card(directory: Path, record: RunRecord, output_name: str, checksums: dict[str, str]) -> RunRecord:
    """Draw the pictures into the (temporary) output directory, write the README.md card rendered from
    the record, then nvfp4_pp.json with every file written beside it and its sha256 (`checksums`: the
    shards', known from their writing); returns the record as written."""
    record = dataclasses.replace(record, charts=render_charts(directory, record))
    (directory / CARD).write_text(render_card(record, output_name))
    record = dataclasses.replace(record, files={
        f.name: None if f.name == CARD else checksums.get(f.name) or sha256_of(f)
        for f in sorted(directory.iterdir()) if f.name != RECORD})
    write_run_record(directory, record)
    return record


def final_line(record: RunRecord, wall_s: float) -> str:
    """The run's last line: what was written, how big, how long, whether it verified, what to run next."""
    cfg = record.config
    return (f"done: {cfg.output} ({record.checkpoint.bytes / 1e9:.2f} GB) in {wall_s:.0f} s, verification "
            f"{record.verification}; evaluate: {evaluate_command(record, shlex.quote(sys.executable))}; serve: "
            f"{serve_command(record.checkpoint, cfg.output)}")


def update_quality(directory: Path, what: str, table: list[str]) -> None:
    """Replace the card's quality section with measured numbers (appended if the card has none)."""
    path = Path(directory) / CARD
    text = path.read_text() if path.is_file() else ""
    section = "\n".join([QUALITY_START, f"Measured by `python -m nvfp4_pp.evaluate` on {what}:", "", *table, QUALITY_END])
    if QUALITY_START in text and QUALITY_END in text:
        head, rest = text.split(QUALITY_START, 1)
        text = head + section + rest.split(QUALITY_END, 1)[1]
    else:
        text += "\n## Quality\n" + section + "\n"
    path.write_text(text)
