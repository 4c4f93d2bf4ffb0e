"""Calibration data: JSONL token rows verbatim and in order, text tokenised, bad files named."""

from __future__ import annotations

import json

import pytest

from nvfp4_pp.data.samples import CalibrationDataError, load_samples, micro_batches, valid_mask
from nvfp4_pp.config import CalibrationConfig


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_token_rows_are_verbatim(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [1, 2]}, {"input_ids": [9]}])
    cfg = CalibrationConfig(dataset=path, samples=2, max_length=8)
    assert load_samples(cfg, tmp_path).samples == [[5, 6, 7], [1, 2]]


def test_text_sources_are_tokenised(smol_dir, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("The capital of France is Paris. " * 50)
    samples = load_samples(CalibrationConfig(dataset=str(txt), samples=3, max_length=16), smol_dir).samples
    assert len(samples) == 3 and all(len(s) == 16 for s in samples)
    rows = _jsonl(tmp_path / "x.jsonl", [{"text": "Hello world"}, {"text": "The capital of France is"}])
    samples = load_samples(CalibrationConfig(dataset=rows, samples="all", max_length=16), smol_dir).samples
    assert len(samples) == 2 and 0 < len(samples[0]) <= 16
    builtin = load_samples(CalibrationConfig(samples=4, max_length=32), smol_dir).samples
    assert [len(s) for s in builtin] == [32] * 4


@pytest.mark.parametrize("content,message", [
    ("", "holds no samples"),
    ("{not json}\n", "t.jsonl:1 is not valid JSON"),
    ('{"input_ids": [1, 2]}\n{"ids": [3]}\n', "t.jsonl:2 has neither 'input_ids' (list of ints) nor 'text' (string)"),
    ('{"input_ids": [1, "a"]}\n', "t.jsonl:1: 'input_ids' must be a non-empty list of integers"),
    ('{"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}\n', "t.jsonl:1 has 9 input_ids, more than calibration.max_length=8"),
])
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(CalibrationDataError) as e:
        load_samples(CalibrationConfig(dataset=str(tmp_path / "t.jsonl"), max_length=8), tmp_path)
    assert message in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_samples(CalibrationConfig(dataset=str(tmp_path / "none.jsonl")), tmp_path)


def test_micro_batches_group_by_length():
    """Equal lengths batch without padding; unequal ones are right-padded and their real lengths kept."""
    batches = micro_batches([[1, 2], [3, 4], [5, 6], [7], [8], [9, 10]], batch_size=2, pad_id=0)
    assert [b.ids.tolist() for b in batches] == [[[1, 2], [3, 4]], [[5, 6], [9, 10]], [[7], [8]]]
    assert all(valid_mask(b.lengths, b.ids.shape[1]) is None for b in batches)
    ragged = micro_batches([[1], [2, 3, 4], [5, 6]], batch_size=2, pad_id=99)
    assert [(b.ids.tolist(), b.lengths) for b in ragged] == [([[2, 3, 4], [5, 6, 99]], (3, 2)), ([[1]], (1,))]
    assert valid_mask((3, 2), 3).tolist() == [[True, True, True], [True, True, False]]
    assert [b.lengths for b in micro_batches([[1], [2, 3, 4]], 1, 0)] == [(1,), (3,)]  # batch 1 keeps the order
