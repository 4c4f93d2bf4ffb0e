"""Entry point: `torchrun ... -m nvfp4_pp.run CONFIG.yaml [--set key=value ...] [--overwrite] [--fresh] [--plan]`.

Parses the command line and the config, joins the process group, runs the phases (runner.Run) and
turns every user-facing error (errors.NvFp4PpError) into one line on stderr; an interrupt (Ctrl-C,
SIGTERM, the launcher's death) into one line per rank saying what a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import os
import sys

from nvfp4_pp.runtime import dist
from nvfp4_pp.runtime import stopping
from nvfp4_pp.driver.command_line import parse_args
from nvfp4_pp.config import load_config
from nvfp4_pp.errors import EXIT_BAD_INPUT, EXIT_FAULT, LAUNCHED, Interrupted, NvFp4PpError, exit_status
from nvfp4_pp.log import keep_traceback, report_error, setup, teardown
from nvfp4_pp.phases import Phase
from nvfp4_pp.driver.runner import Options, Run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = load_config(args.config, args.overrides)
    except NvFp4PpError as e:
        if rank == 0:  # every rank reads the same file: say it once
            print(f"nvfp4_pp: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stopping.install()
    stopping.follow_launcher(cfg.pipeline.timeout_s, rank)
    options = Options(overwrite=args.overwrite, fresh=args.fresh, plan_only=args.plan,
                      stop_after=Phase(args.stop_after) if args.stop_after else None)
    run = None
    interrupted = False
    error, shown, code = None, True, EXIT_FAULT  # printed after the process group is gone: this rank's last line
    try:
        info = dist.init(cfg.pipeline.backend, cfg.pipeline.device, cfg.pipeline.timeout_s)
        setup(info.rank, info.world_size)
        run = Run(cfg, info, options)
        run.execute()
        return 0
    except Interrupted as e:
        stopping.leaving()
        where = run.resume_point() if run is not None else "the beginning (no phase was finished)"
        interrupted = True
        error = f"nvfp4_pp: error (rank {rank}): {e}; rerun the same command to resume from {where}"
    except dist.PeerLost as e:
        stopping.leaving()
        error = f"nvfp4_pp: error (rank {rank}): {e}"
        failed = dist.failure_of(e.peer, int(os.environ.get("WORLD_SIZE", 1)))
        if failed is not None:  # it said why before it went: its line is the one to read
            error, shown = f"nvfp4_pp: error (rank {rank}): stopped because rank {failed[0]} failed", False
    except dist.Agreed as e:
        stopping.leaving()
        error, shown = f"nvfp4_pp: error: {e}", rank == 0  # every rank knows it; rank 0 says it
        code = exit_status(e)
    except NvFp4PpError as e:
        stopping.leaving()
        error, code = f"nvfp4_pp: error (rank {rank}): {e}", exit_status(e)
        dist.announce_failure(rank, error)
    except Exception as e:  # a bug, or input nothing checks yet: its line names it, the log keeps the traceback
        stopping.leaving()
        traceback_file = keep_traceback(rank)
        text = " ".join(str(e).split())
        error = (f"nvfp4_pp: error (rank {rank}): unexpected {type(e).__name__}"
                 f"{': ' + text[:300] if text else ''}; the traceback is in {traceback_file} (please report it)")
        dist.announce_failure(rank, error)
    finally:
        stopping.leaving()
        dist.shutdown()
        stopping.restore()
        if error:  # under nvfp4_pp.launch, the launcher prints the lines that explain a failure, last
            report_error(error, shown and (interrupted or os.environ.get(LAUNCHED) != "1"))
        teardown()
    return code


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
