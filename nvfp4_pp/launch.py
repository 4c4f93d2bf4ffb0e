"""`python -m nvfp4_pp.launch [torchrun options] -m nvfp4_pp.run CONFIG ...`: torchrun, ending a failed run
with the run's own error line.

torchrun prints its failure summary (a traceback and a 20-line block per failed rank) after every
rank has exited, so no rank can print after it; each failing rank prints its `nvfp4_pp: error`
line last and writes it to torchrun's error file, where the summary shows it as the root cause.
This launcher runs torchrun's own `run` in this process and, when the run fails, replaces that
summary with the ranks' error lines (or the root cause in one line when no rank wrote one), last.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError as e:
        lines = [f.message for _, f in sorted(e.failures.items())
                 if isinstance(f.message, str) and f.message.startswith("nvfp4_pp: error")]
        if not lines:
            _, root = e.get_first_failure()
            why = f"signal {root.signal_name()}" if root.exitcode < 0 else f"exit code {root.exitcode}"
            lines = [f"nvfp4_pp: error: rank {root.rank} on {root.hostname} stopped with {why} before it could "
                     "say why; its log is <work_dir>/rank<r>/log.txt (rerun the same command to resume)"]
        print("\n".join(dict.fromkeys(lines)), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
