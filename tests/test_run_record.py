"""The run record (nvfp4_pp.json) and the card rendered from it, unit level (no run).

tests/golden/<case>/ holds real records of runs (SOURCES.md says which), written by nvfp4_pp 0.2.0
and one by 0.1.0, each with the README.md card and the final line the code rendered from it when
they were saved: every card must stay byte-identical (the final line names the interpreter as PYTHON).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import pytest

from nvfp4_pp.publish.card import final_line, render_card
from nvfp4_pp.records import RECORD, ShardRecord
from nvfp4_pp.publish.run_record import (
    SCHEMA,
    RunRecordError,
    read_run_record,
    run_record_from_dict,
    write_run_record,
)

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / RECORD).is_file())
SCHEMA_1 = [c for c in CASES if "schema" not in json.loads((GOLDEN / c / RECORD).read_text())]


def test_golden_cases_are_there():
    assert len(SCHEMA_1) >= 14 and len(CASES) > len(SCHEMA_1)


@pytest.mark.parametrize("case", CASES)
def test_card_rendered_from_saved_record_is_byte_identical(case):
    record = read_run_record(GOLDEN / case)
    assert render_card(record, Path(record.config.output).name) == (GOLDEN / case / "README.md").read_text()
    line = final_line(record, 12.3).replace(shlex.quote(sys.executable), "PYTHON")
    assert line + "\n" == (GOLDEN / case / "final_line.txt").read_text()


@pytest.mark.parametrize("case", CASES)
def test_written_record_reads_back_equal(case, tmp_path):
    """write -> read gives the same record, and the card from the rewritten one is the same bytes."""
    record = read_run_record(GOLDEN / case)
    write_run_record(tmp_path, record)
    again = read_run_record(tmp_path / RECORD)
    assert again == record
    assert json.loads((tmp_path / RECORD).read_text())["schema"] == SCHEMA
    assert render_card(again, "x") == render_card(record, "x")


@pytest.mark.parametrize("case", SCHEMA_1)
def test_schema_1_record_keeps_its_run_summaries(case):
    """In a schema-1 record, each rank's rebuilt export gives back the run's Linears, scheme counts and
    BF16 modules exactly as the record listed them."""
    saved = json.loads((GOLDEN / case / RECORD).read_text())
    record = read_run_record(GOLDEN / case)
    assert {n: dataclasses.asdict(s) for n, s in record.linears.items()} == saved["linears"]
    assert list(record.linears) == list(saved["linears"])
    assert record.schemes == saved["schemes"] and record.kept_bf16 == saved["kept_bf16"]


def test_rank_report_keeps_every_field(tmp_path):
    """A schema-2 rank entry holds the whole report: its shards, schemes and Linears are not dropped."""
    record = read_run_record(GOLDEN / "int4-modelopt-auto")
    shard = ShardRecord("rank001-00001.safetensors", ("model.layers.3.mlp.up_proj.weight",), 7, "0" * 64)
    rank = record.ranks[1]
    rank = dataclasses.replace(rank, export=dataclasses.replace(rank.export, shards=(shard,), embeddings=("x",)))
    record = dataclasses.replace(record, ranks=(record.ranks[0], rank, *record.ranks[2:]))
    write_run_record(tmp_path, record)
    entry = json.loads((tmp_path / RECORD).read_text())["ranks"][1]
    assert entry["export"]["shards"][0]["bytes"] == 7 and entry["export"]["embeddings"] == ["x"]
    assert set(entry) == {f.name for f in dataclasses.fields(rank)}
    assert read_run_record(tmp_path).ranks[1] == rank


@pytest.mark.parametrize("edit, line", [
    (lambda d: {**d, "schema": 3}, "has run record schema 3, which this nvfp4_pp does not read (it reads 1 to 2); read "
                                   "it with the nvfp4_pp that wrote it (0.2.0) or a newer one"),
    (lambda d: {**d, "producer": {"name": "other"}}, "is not a run record nvfp4_pp wrote (no producer nvfp4_pp)"),
    (lambda d: {k: v for k, v in d.items() if k != "ranks"}, "the run record is incomplete or damaged (KeyError: 'ranks')"),
    (lambda d: {**d, "config": {**d["config"], "recipe": "fp3"}}, "the run's config does not read as this nvfp4_pp's config"),
])
def test_unreadable_record_is_one_line(edit, line):
    data = json.loads((GOLDEN / "int4-ct" / RECORD).read_text())
    with pytest.raises(RunRecordError) as e:
        run_record_from_dict(edit(data), "out/nvfp4_pp.json")
    assert line in str(e.value) and "\n" not in str(e.value)
