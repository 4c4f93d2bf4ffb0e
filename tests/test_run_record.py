"""The run record (nvfp4_pp.json) and the card rendered from it, unit level (no run).

tests/golden/<case>/ holds real records of runs (SOURCES.md says which) (written by nvfp4_pp 0.2.0, one by
0.1.0), each with the README.md card and the final line the code rendered from it when they were
saved: every card must stay byte-identical (the final line names the interpreter as PYTHON).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from nvfp4_pp.card import final_line, render_card

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "nvfp4_pp.json").is_file())


def test_golden_cases_are_there():
    assert len(CASES) >= 14


@pytest.mark.parametrize("case", CASES)
def test_card_rendered_from_saved_record_is_byte_identical(case):
    record = json.loads((GOLDEN / case / "nvfp4_pp.json").read_text())
    name = Path(record["config"]["output"]).name
    assert render_card(record, name) == (GOLDEN / case / "README.md").read_text()
    line = final_line(record, 12.3).replace(shlex.quote(sys.executable), "PYTHON")
    assert line + "\n" == (GOLDEN / case / "final_line.txt").read_text()
