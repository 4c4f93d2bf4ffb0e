"""`python -m nvfp4_pp.evaluate`: perplexity and KL of a written checkpoint vs its BF16 source."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.checkpoint.decoders.decode import EvaluateError, layout_of
from nvfp4_pp.evaluate.quality import EVAL_DATA, compare_table, eval_samples, evaluate, table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, type=Path, help="the BF16 source checkpoint")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--quantized", type=Path, help="the nvfp4_pp output to evaluate")
    what.add_argument("--compare", type=Path, nargs="+", metavar="OUTPUT",
                      help="several outputs of the same source (recipes, algorithms): one table of perplexity, KL "
                           "and size, on the same samples")
    p.add_argument("--data", default=EVAL_DATA, help="builtin:pydoc (read from its end), a .txt or a .jsonl")
    p.add_argument("--samples", type=int, default=32, help="number of samples (default 32)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sample (default 512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input-scale-one", action="store_true", help="add W4A4 with every input scale forced to 1.0")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--update-card", action="store_true", help="put the table into QUANTIZED/README.md")
    args = p.parse_args(argv)
    if args.update_card and args.compare:
        p.error("--update-card takes one --quantized output, not --compare")
    return args


def check_inputs(source: Path, quantized: Path) -> None:
    """Both directories exist and `quantized` declares a quantized layout: seconds, before the source
    model (minutes for a large one) is loaded."""
    if not (quantized / "config.json").is_file():
        what = "does not exist" if not quantized.exists() else "has no config.json"
        raise EvaluateError(f"--quantized {quantized} {what}; pass the output directory of an nvfp4_pp run")
    layout_of(quantized)  # refuses a checkpoint without a quantization_config it can decode
    if not (source / "config.json").is_file():
        what = "does not exist" if not source.exists() else "has no config.json"
        raise EvaluateError(f"--source {source} {what}; pass the BF16 checkpoint the output was quantized from")


def describe_layout(directory: Path) -> str:
    layout = layout_of(directory)
    return f"{layout.method} {layout.default_scheme or 'mixed'}"


def size_on_disk(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _data_facts(args: argparse.Namespace, samples: list[list[int]]) -> dict:
    """What the figures were measured on, for the console line and the JSON report."""
    return {"data": args.data, "samples": len(samples), "max_length": args.max_length,
            "tokens": sum(len(s) - 1 for s in samples)}


def compare(args: argparse.Namespace) -> None:
    """Every output checked first (seconds), then each evaluated on the same samples: one table."""
    for output in args.compare:
        check_inputs(args.source, output)
    samples = eval_samples(args.data, args.samples, args.max_length, args.source)
    rows = [(output, describe_layout(output), size_on_disk(output),
             evaluate(args.source, output, samples, args.device)) for output in args.compare]
    facts = _data_facts(args, samples)
    print(f"{len(rows)} outputs of {args.source} on {args.data}: {facts['samples']} samples, {facts['tokens']} "
          "predicted tokens")
    print("\n".join(compare_table(rows)))
    if args.json:
        report = {**facts, "outputs": [{"output": str(o), "layout": lay, "bytes": n, "results": r}
                                       for o, lay, n, r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def evaluate_one(args: argparse.Namespace) -> None:
    check_inputs(args.source, args.quantized)
    samples = eval_samples(args.data, args.samples, args.max_length, args.source)
    results = evaluate(args.source, args.quantized, samples, args.device, args.input_scale_one)
    facts = _data_facts(args, samples)
    what = f"{args.data}: {facts['samples']} samples, {facts['tokens']} predicted tokens"
    print(f"{args.quantized} vs {args.source} on {what}")
    print("\n".join(table(results)))
    if args.json:
        args.json.write_text(json.dumps({**facts, "results": results}, indent=2) + "\n")
    if args.update_card:
        from nvfp4_pp.publish.card import update_quality

        update_quality(args.quantized, what, list(table(results)))


def show_progress() -> None:
    """The package's progress lines (rate, ETA) on stderr: evaluating a large model takes a while."""
    import logging

    from nvfp4_pp.log import logger

    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_progress()
    try:
        (compare if args.compare else evaluate_one)(args)
    except (NvFp4PpError, OSError) as e:
        print(f"nvfp4_pp.evaluate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
