"""The command line of `python -m nvfp4_pp.run`, apart from the run itself: the launcher checks it
before any rank starts, without importing the run's libraries."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from nvfp4_pp import __version__
from nvfp4_pp.errors import EXIT_BAD_INPUT
from nvfp4_pp.phases import RECORDED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.run", description="Quantize a model across the ranks torchrun starts.")
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.samples=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that nvfp4_pp wrote (never any other directory)")
    p.add_argument("--fresh", action="store_true", help="discard saved progress in the work directory")
    p.add_argument("--stop-after", choices=[p.value for p in RECORDED], help="stop once this phase is recorded (resume later)")
    p.add_argument("--plan", action="store_true",
                   help="measure every rank's memory, print the stage plan and exit without loading weights")
    p.add_argument("--version", action="version", version=f"nvfp4_pp {__version__}")

    def error(message: str) -> NoReturn:
        """One line (every rank parses the same command line: rank 0 says it), not argparse's usage block."""
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"nvfp4_pp: error: {message} (python -m nvfp4_pp.run --help lists the options)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    p.error = error  # type: ignore[method-assign]
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
