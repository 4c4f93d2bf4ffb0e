"""`python -m nvfp4_pp.verify DIR [--source MODEL] [--quick]`: a written checkpoint checked by hand.

It first re-hashes every file the run record (`nvfp4_pp.json`) lists with its sha256 (a corrupted or
incomplete copy: exit 3; `--quick` skips it), then checks vLLM's loader contract (a violation: exit 1).
One line per root cause, with how many more places it shows in. The checks live in checkpoint/verify.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nvfp4_pp.checkpoint.verify import check_copy, summarize, verify

EXIT_CONTRACT, EXIT_CORRUPTED = 1, 3
"""Exit statuses: the checkpoint breaks vLLM's loader contract (as written: a bug to report), or this
copy differs from what the run wrote (copy it again)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nvfp4_pp.verify", description="A written checkpoint against what vLLM's loader needs and against what the run wrote.")
    p.add_argument("directory", type=Path, help="the quantized checkpoint")
    p.add_argument("--source", type=Path, help="the BF16 source: config fields and tokenizer files must match it")
    p.add_argument("--quick", action="store_true", help="skip re-hashing the files against the run record's sha256")
    args = p.parse_args(argv)
    corrupted, note = ([], "--quick: file checksums not checked") if args.quick else check_copy(args.directory)
    problems = verify(args.directory, args.source)
    for line in summarize(corrupted + problems):
        print(line)
    if note:
        print(f"note: {note}")
    if corrupted:
        print(f"{args.directory}: {len(corrupted)} file(s) differ from what the run wrote"
              f"{f', {len(problems)} contract problem(s)' if problems else ''}: a corrupted or incomplete copy")
        return EXIT_CORRUPTED
    print(f"{args.directory}: {len(problems)} problem(s)" if problems else f"{args.directory}: OK")
    return EXIT_CONTRACT if problems else 0


if __name__ == "__main__":
    sys.exit(main())
