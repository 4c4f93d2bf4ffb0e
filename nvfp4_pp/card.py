"""The output's own record: `nvfp4_pp.json` (what ran, where, how long, calibration health) and a
README.md model card rendered from it; `evaluate --update-card` fills in the quality section later."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import __version__
from .config import RunConfig, config_to_dict
from .files import write_json
from .records import CalibrationManifest, RankReport
from .source import SourceCheckpoint

RECORD = "nvfp4_pp.json"
CARD = "README.md"
CALIBRATION_MANIFEST = "calibration.json"
"""The calibration set's manifest, written into rank 0's work directory when the run starts."""
PRODUCER = {"name": "nvfp4_pp", "version": __version__}
QUALITY_START, QUALITY_END = "<!-- nvfp4_pp:quality -->", "<!-- /nvfp4_pp:quality -->"


def run_record(cfg: RunConfig, source: SourceCheckpoint, reports: list[RankReport], manifest: CalibrationManifest,
               micro_batches: int, wall_s: float, assemble_s: float, problems: list[str], backend: str) -> dict:
    """The output's nvfp4_pp.json: what ran, on what data, where, how long, and whether it verified."""
    from modelopt import __version__ as modelopt_version

    calibration = {**config_to_dict(cfg)["calibration"], "samples": manifest.samples, "tokens": manifest.tokens,
                   "micro_batches": micro_batches, "samples_sha256": manifest.token_ids_sha256,
                   "manifest": manifest.to_dict()}
    return {
        "producer": PRODUCER, "modelopt_version": modelopt_version, "config": config_to_dict(cfg),
        "base_model": source.config.get("_name_or_path") or source.path.name,
        "backend": backend,
        "calibration": calibration,
        "ranks": [r.to_dict() for r in reports],
        "schemes": dict(sorted(Counter(s for r in reports for s in r.export.schemes.values()).items())),
        "kept_bf16": sorted({n for r in reports for n in r.export.excluded}),
        "wall_s": wall_s, "assemble_s": assemble_s,
        "verification": f"{len(problems)} problem(s)" if problems else "passed",
    }


def _manifest_lines(manifest: dict) -> list[str]:
    """The calibration set as the card shows it: one line per source, then counts and the ids' hash."""
    lines = []
    for s in manifest["sources"]:
        where = ", ".join(f"{k} `{s[k]}`" for k in ("config", "split", "field") if s.get(k))
        share = f", share {s['share']}" if s.get("share") is not None else ""
        skipped = (f"; skipped {s['skipped_short']} too short, {s['skipped_long']} too long"
                   if s["skipped_short"] or s["skipped_long"] else "")
        lines.append(f"- Source `{s['dataset']}`{' (' + where + ')' if where else ''}{share}: "
                     f"{s['samples']} samples, {s['tokens']} tokens{skipped}.")
    lines.append(f"- Set: {manifest['samples']} samples, {manifest['tokens']} tokens, lengths "
                 f"{manifest['min_length']} / {manifest['median_length']} / {manifest['max_length']} "
                 f"(min / median / max); token ids sha256 `{manifest['token_ids_sha256']}`.")
    return lines


def peaks_text(manifest: dict) -> str:
    """A rank's measured peak beside the planner's prediction, per memory pool: 'host 1.20/1.50'."""
    measured, predicted = manifest["measured"], manifest["predicted"]
    return " ".join(f"{pool} {measured[pool] / 1e9:.2f}/{predicted[pool] / 1e9:.2f}" for pool in sorted(measured))


def _pipeline_rows(manifests: list[dict]) -> list[str]:
    rows = ["| rank | host | device | layers | load s | calibrate s | export s | peak GB measured / predicted "
            "| quantizers good / zero / NaN |",
            "|---:|---|---|---|---:|---:|---:|---:|---|"]
    for m in manifests:
        p, h = m["phases"], m["health"]
        rows.append(f"| {m['rank']} | {m['host']} | {m['device']} | {m['layers'][0]}-{m['layers'][1] - 1} | "
                    f"{p['load']:.1f} | {p['calibrate']:.1f} | {p['export']:.1f} | {peaks_text(m)} | "
                    f"{h['good']} / {h['zero']} / {h['nan']} |")
    return rows


RECIPE_TEXT = {
    "nvfp4": "FP4 E2M1 weights and activations (W4A4), FP8 E4M3 scales per block of 16, FP32 per-tensor "
             "scales; static per-tensor input scales from modelopt's max calibration on the data below",
    "nvfp4_awq": "NVFP4 W4A4 as `nvfp4`, with AWQ-lite pre-quant scales searched on the data below (folded "
                 "into the preceding layer where shapes allow)",
    "w4a16_nvfp4": "NVFP4 weights (E2M1, FP8 per-16 block scales, FP32 per-tensor scale), BF16 activations",
    "fp8": "FP8 E4M3 weights and activations (W8A8), per-tensor static scales calibrated on the data below",
    "mxfp4": "MXFP4 weights and activations: E2M1 in blocks of 32 with E8M0 scales",
    "mxfp4_mlp_fp8_attn": "MLP Linears MXFP4 (E2M1, blocks of 32, E8M0 scales); attention Linears FP8 W8A8 "
                          "with per-tensor static scales calibrated on the data below",
}


def render_card(record: dict, output_name: str) -> str:
    """Markdown model card: base model, recipe, calibration, stage split, timings, health, serving."""
    cfg, cal = record["config"], record["calibration"]
    dataset = cal["dataset"] if isinstance(cal["dataset"], str) else "a mix of " + ", ".join(
        s["dataset"] for s in cal["dataset"])
    base = record["base_model"]
    unhealthy = [f"rank {m['rank']}: {', '.join(m['health'].get('bad', []))}" for m in record["ranks"]
                 if m["health"]["zero"] or m["health"]["nan"]]
    lines = [
        "---",
        f"base_model: {base}",
        f"tags: [{cfg.get('recipe', 'nvfp4')}, vllm, " + cfg["format"] + "]",
        "---",
        f"# {output_name}",
        "",
        f"`{cfg.get('recipe', 'nvfp4')}` quantization of `{base}` (source: `{cfg['model']}`), written by "
        f"nvfp4_pp {record['producer']['version']} "
        f"with nvidia-modelopt {record['modelopt_version']} in the `{cfg['format']}` layout.",
        "",
        "## Recipe",
        f"- Every decoder Linear: {RECIPE_TEXT[cfg.get('recipe', 'nvfp4')]}; q/k/v and gate/up share their "
        "per-tensor scales (vLLM fuses them). No cross-rank amax sync: each stage's statistics are its own.",
        *[f"- Linears matching `{pattern}`: {RECIPE_TEXT[recipe]}" for pattern, recipe in
          (cfg.get("recipe_overrides") or {}).items()],
        *([f"- KV cache: {cfg['kv_cache'].upper()} K and V scales calibrated on the data below"]
          if cfg.get("kv_cache") else []),
        f"- Kept in BF16: {', '.join(f'`{n}`' for n in record['kept_bf16']) or 'nothing'} (plus norms).",
        "",
        "## Calibration",
        f"- Data: `{dataset}`, {cal['samples']} samples, {cal['tokens']} tokens "
        f"({cal['min_length']} to {cal['max_length']} tokens each{', packed' if cal['pack'] else ''}, "
        f"seed {cal['seed']}), micro-batches of up to {cal['batch_size']} grouped by length "
        "(pad positions never enter a statistic).",
        *_manifest_lines(cal["manifest"]),
        "- Health (quantizers with a usable / zero or missing / NaN amax, per rank): "
        + "; ".join(f"rank {m['rank']} {m['health']['good']} / {m['health']['zero']} / {m['health']['nan']}"
                    for m in record["ranks"]) + ".",
    ]
    if unhealthy:
        lines.append("- Quantizers without a usable amax: " + "; ".join(unhealthy))
    lines += [
        "",
        "## Pipeline",
        f"{len(record['ranks'])} rank(s), torch.distributed pipeline ({record['backend']}); "
        f"wall time {record['wall_s']:.1f} s, assembly and verification {record['assemble_s']:.1f} s.",
        "",
        *_pipeline_rows(record["ranks"]),
        "",
        "## Verification",
        f"`python -m nvfp4_pp.verify` against vLLM's loader contract for this layout: {record['verification']}.",
        "",
        "## Quality",
        QUALITY_START,
        "Not measured by the run. Measure it (weights decoded from these files, W4A16 and emulated W4A4) with:",
        "",
        "```bash",
        f"python -m nvfp4_pp.evaluate --source {cfg['model']} --quantized {cfg['output']} --input-scale-one --update-card",
        "```",
        QUALITY_END,
        "",
        "## Serving",
        "```bash",
        f"vllm serve {cfg['output']}",
        "```",
        "vLLM reads the quantization from `config.json`. Native W4A4 kernels need Blackwell (SM100+); "
        "on Hopper and Ampere vLLM runs the weights through a weight-only FP4 kernel (Marlin).",
        "",
    ]
    return "\n".join(lines)


def write_record_and_card(directory: Path, record: dict, output_name: str) -> None:
    """nvfp4_pp.json and the README.md card rendered from it, into the (temporary) output directory."""
    write_json(directory / RECORD, record)
    (directory / CARD).write_text(render_card(record, output_name))


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
