"""Entry point: `torchrun ... -m nvfp4_pp.run CONFIG.yaml [--set key=value ...] [--overwrite] [--fresh] [--plan]`.

Parses the command line and the config, joins the process group, runs the phases (runner.Run) and
turns every user-facing error (errors.NvFp4PpError) into one line on stderr; an interrupt (Ctrl-C,
SIGTERM, the launcher's death) into one line per rank saying what a rerun resumes from.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from . import __version__, dist, stopping
from .config import load_config
from .errors import Interrupted, NvFp4PpError
from .log import report_error, setup, teardown
from .runner import Options, Run
from .work_state import PHASES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.run", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.samples=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that nvfp4_pp wrote (never any other directory)")
    p.add_argument("--fresh", action="store_true", help="discard saved progress in the work directory")
    p.add_argument("--stop-after", choices=PHASES, help="stop once this phase is recorded (resume later)")
    p.add_argument("--plan", action="store_true",
                   help="measure every rank's memory, print the stage plan and exit without loading weights")
    p.add_argument("--version", action="version", version=f"nvfp4_pp {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides)
    except NvFp4PpError as e:
        if rank == 0:  # every rank reads the same file: say it once
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 2
    stopping.install()
    stopping.follow_launcher(cfg.pipeline.timeout_s, rank)
    options = Options(overwrite=args.overwrite, fresh=args.fresh, stop_after=args.stop_after, plan_only=args.plan)
    run = None
    error, shown = None, True  # printed after the process group is gone, so it is this rank's last line
    try:
        info = dist.init(cfg.pipeline.backend, cfg.pipeline.device, cfg.pipeline.timeout_s)
        setup(info.rank, info.world_size)
        run = Run(cfg, info, options)
        run.execute()
        return 0
    except Interrupted as e:
        stopping.leaving()
        where = run.resume_point() if run is not None else "the beginning (no phase was finished)"
        error = f"nvfp4_pp: error (rank {rank}): {e}; rerun the same command to resume from {where}"
        return 1
    except dist.Agreed as e:
        stopping.leaving()
        error, shown = f"nvfp4_pp: error: {e}", rank == 0  # every rank knows it; rank 0 says it
        return 1
    except NvFp4PpError as e:
        stopping.leaving()
        error = f"nvfp4_pp: error (rank {rank}): {e}"
        return 1
    finally:
        stopping.leaving()
        dist.shutdown()
        stopping.restore()
        if error:
            report_error(error, shown)
        teardown()


def exit_now(code: int) -> None:
    """End the rank without the interpreter's finalization: 2-3 s per run of tearing down torch,
    transformers and modelopt, every rank at the end of every run (measured on the 3-rank demo: the
    launcher returned 3.4 s after the ranks' last line). Only after a run that finished: everything it
    wrote is closed then, and only the standard streams are still buffered. A failed run exits as
    usual, letting any writer thread still busy finish."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a launcher gone with its pipe: nothing left to tell
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if code == 0:
        exit_now(code)
    sys.exit(code)
