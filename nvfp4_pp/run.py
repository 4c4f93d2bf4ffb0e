"""Entry point: `torchrun ... -m nvfp4_pp.run CONFIG.yaml [--set key=value ...] [--overwrite] [--fresh] [--plan]`.

Parses the command line and the config, joins the process group, runs the phases (runner.Run) and
turns every user-facing error (errors.NvFp4PpError) into one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import __version__, dist
from .config import load_config
from .errors import Fault, NvFp4PpError
from .log import report_error, setup, teardown
from .runner import Options, Run
from .work_state import PHASES


class Stopped(Fault):
    """SIGTERM/SIGINT: torchrun stops the remaining ranks when one of them fails."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.run", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.samples=64 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--fresh", action="store_true", help="discard saved progress in the work directory")
    p.add_argument("--stop-after", choices=PHASES, help="stop once this phase is recorded (resume later)")
    p.add_argument("--plan", action="store_true",
                   help="measure every rank's memory, print the stage plan and exit without loading weights")
    p.add_argument("--version", action="version", version=f"nvfp4_pp {__version__}")
    return p.parse_args(argv)


def _raise_stopped(signum, frame) -> None:
    raise Stopped(f"stopped by signal {signal.Signals(signum).name} during {dist.current_phase()} "
                  "(torchrun stops the other ranks when one fails: see the first error above)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides)
    except NvFp4PpError as e:
        if rank == 0:  # every rank reads the same file: say it once
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return 2
    previous_handler = signal.signal(signal.SIGTERM, _raise_stopped)
    options = Options(overwrite=args.overwrite, fresh=args.fresh, stop_after=args.stop_after, plan_only=args.plan)
    error, shown = None, True  # printed after the process group is gone, so it is this rank's last line
    try:
        info = dist.init(cfg.pipeline.backend, cfg.pipeline.device, cfg.pipeline.timeout_s)
        setup(info.rank, info.world_size)
        Run(cfg, info, options).execute()
        return 0
    except dist.Agreed as e:
        error, shown = f"nvfp4_pp: error: {e}", rank == 0  # every rank knows it; rank 0 says it
        return 1
    except NvFp4PpError as e:
        error = f"nvfp4_pp: error (rank {rank}): {e}"
        return 1
    finally:
        dist.shutdown()
        signal.signal(signal.SIGTERM, previous_handler)
        if error:
            report_error(error, shown)
        teardown()


if __name__ == "__main__":
    sys.exit(main())
