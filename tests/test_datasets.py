"""Calibration data the way users bring it: Hugging Face datasets (offline), chat rows, length windows,
mixes, a manifest, and micro-batches whose padding never enters a statistic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, read_json, run_nvfp4_pp, write_config, write_token_file
from nvfp4_pp.data.samples import CalibrationDataError, builtin_text, load_samples
from nvfp4_pp.config import CalibrationConfig, DataSource

datasets = pytest.importorskip("datasets", reason="the 'data' extra: pip install 'nvfp4_pp[data]'")


def _topics(count: int) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(k, topics[k]) for k in sorted(topics)[:count]]


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> Path:
    """A save_to_disk directory shaped like cnn_dailymail (article, highlights, id), real English text."""
    rows = [{"article": text[:1500], "highlights": text[:80], "id": f"{i:040x}"} for i, (_, text) in enumerate(_topics(40))]
    path = tmp_path_factory.mktemp("hf") / "cnn_dailymail"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A save_to_disk chat set: `messages` lists of role/content turns."""
    rows = [{"messages": [{"role": "system", "content": "You answer questions about Python."},
                          {"role": "user", "content": f"What does the Python reference say about {key}?"},
                          {"role": "assistant", "content": text[:400]}]} for key, text in _topics(30)]
    path = tmp_path_factory.mktemp("hf") / "chat"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_cnn_like_dataset_window_and_seed(cnn_dir, smol_dir):
    """`article` found by name; every sample inside the window; same seed same ids, another seed others."""
    base = dict(dataset=f"hf:{cnn_dir}", samples=8, min_length=64, max_length=160)
    first = load_samples(CalibrationConfig(**base), smol_dir)
    again = load_samples(CalibrationConfig(**base), smol_dir)
    other = load_samples(CalibrationConfig(**base, seed=1), smol_dir)
    assert first.samples == again.samples and first.sha256 == again.sha256
    assert other.manifest().token_ids_sha256 != first.manifest().token_ids_sha256
    assert len(first.samples) == 8 and all(64 <= len(s) <= 160 for s in first.samples)
    source = first.manifest().sources[0]
    assert source.field == "article" and source.split == "train" and source.rows == 40
    skipping = load_samples(CalibrationConfig(**base, too_long="skip"), smol_dir)
    assert all(64 <= len(s) <= 160 for s in skipping.samples) and skipping.sources[0].skipped_long > 0
    highlights = load_samples(CalibrationConfig(dataset=f"hf:{cnn_dir}", field="highlights", samples=3), smol_dir)
    assert highlights.sources[0].field == "highlights" and all(len(s) < 40 for s in highlights.samples)


def test_chat_rows_are_the_chat_template_ids(chat_dir, smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    rows = datasets.load_from_disk(str(chat_dir))
    cal = load_samples(CalibrationConfig(dataset=f"hf:{chat_dir}", samples=30, max_length=2048), smol_dir)
    assert cal.sources[0].field == "messages"
    expected = {tuple(tok.apply_chat_template(row["messages"])["input_ids"]) for row in rows}
    assert len(expected) == 30 and {tuple(s) for s in cal.samples} == expected  # every row, shuffled
    assert all(s[0] == tok.convert_tokens_to_ids("<|im_start|>") for s in cal.samples)


def test_file_forms_and_mix(cnn_dir, chat_dir, smol_dir, tmp_path, monkeypatch):
    """.parquet, .json and .arrow files read like the directory; a mix splits `samples` by share."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = datasets.load_from_disk(str(cnn_dir))["train"]
    data.to_parquet(str(tmp_path / "cnn.parquet"))
    data.to_json(str(tmp_path / "cnn.json"))
    arrow = next(cnn_dir.glob("train/*.arrow"))
    cfg = dict(samples=5, max_length=64)
    from_dir = load_samples(CalibrationConfig(dataset=f"hf:{cnn_dir}", **cfg), smol_dir).samples
    for path in (tmp_path / "cnn.parquet", tmp_path / "cnn.json", arrow):
        assert load_samples(CalibrationConfig(dataset=f"hf:{path}", **cfg), smol_dir).samples == from_dir, path
    mix = CalibrationConfig(samples=7, max_length=96, dataset=[
        DataSource(dataset=f"hf:{cnn_dir}", share=2), DataSource(dataset=f"hf:{chat_dir}", share=1),
        DataSource(dataset="builtin:pydoc", share=1)])
    cal = load_samples(mix, smol_dir)
    assert [s.samples for s in cal.sources] == [3, 2, 2]  # 3.5, 1.75, 1.75: largest remainders and len(cal.samples) == 7
    assert cal.manifest().tokens == sum(map(len, cal.samples))
    packed = load_samples(CalibrationConfig(dataset=f"hf:{cnn_dir}", samples=6, max_length=64, pack=True), smol_dir)
    assert len(packed.samples) >= 6 and {len(s) for s in packed.samples} == {64}


def test_missing_data_gets_one_clear_error(smol_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError) as e:
        load_samples(CalibrationConfig(dataset="hf:nvfp4-pp-tests/not-a-dataset", config="v1"), smol_dir)
    assert "is not available offline" in str(e.value)
    assert "datasets.load_dataset('nvfp4-pp-tests/not-a-dataset', 'v1', split='train')" in str(e.value)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_samples(CalibrationConfig(dataset=f"hf:{tmp_path / 'none.parquet'}"), smol_dir)
    datasets.Dataset.from_list([{"question": "q", "score": 1}]).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(CalibrationDataError, match=r"none of the known text columns .* set calibration.field"):
        load_samples(CalibrationConfig(dataset=f"hf:{tmp_path / 'odd'}"), smol_dir)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    with pytest.raises(CalibrationDataError, match=r"needs the 'datasets' package: pip install 'nvfp4_pp\[data\]'"):
        load_samples(CalibrationConfig(dataset=f"hf:{tmp_path / 'odd'}"), smol_dir)


def test_padding_never_enters_the_statistics(smol_dir, tmp_path):
    """Two samples (40 and 64 tokens) as one right-padded micro-batch give the input scales of the two
    run one at a time; the pad token's embedding x1000 changes none; without the mask it would."""
    tokens = write_token_file(smol_dir, tmp_path / "two.jsonl", (40, 64))
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(REPO / "tests" / "padding_probe.py"), str(smol_dir), str(tokens), str(out)],
                   check=True, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                                    "PATH": "/usr/bin:/bin"})
    r = json.loads(out.read_text())
    assert r["separate_widths"] == [40, 64] and r["padded_widths"] == [64]
    separate, padded = r["separate"], r["padded"]
    assert len(separate) == 30 * 7
    # Tolerance: the 40-token sample runs through GEMMs of another shape, so bf16 hidden states may round
    # differently: at most 2 % (a couple of bf16 ulps) and most scales bit-equal.
    assert max(abs(padded[k] - separate[k]) / separate[k] for k in separate) < 0.02
    assert sum(padded[k] == separate[k] for k in separate) >= 0.9 * len(separate)
    assert r["padded_pad_x1000"] == padded
    unmasked = r["padded_unmasked"]
    assert max(abs(unmasked[k] - padded[k]) / padded[k] for k in padded) > 0.5  # the probe does see pads


def _run(tmp_path: Path, name: str, smol_dir: Path, calibration: dict, *args: str):
    out = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", model=str(smol_dir), output=str(out), format="compressed-tensors",
                          calibration=calibration)
    result = run_nvfp4_pp(config, 3, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_three_ranks_offline_cnn_twice_identical(cnn_dir, smol_dir, tmp_path, monkeypatch):
    """cnn_dailymail-shaped data, padded micro-batches, 3 ranks, no network: twice byte-identical."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    calibration = {"dataset": f"hf:{cnn_dir}", "samples": 6, "min_length": 32, "max_length": 96, "batch_size": 2}
    first = _run(tmp_path, "a", smol_dir, calibration)
    second = _run(tmp_path, "b", smol_dir, calibration)
    files = sorted(p.name for p in first.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in second.glob("*.safetensors"))
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    manifest = read_json(first / "nvfp4_pp.json")["calibration"]["manifest"]
    assert manifest == read_json(second / "nvfp4_pp.json")["calibration"]["manifest"]
    expected = load_samples(CalibrationConfig(**calibration), smol_dir).manifest().to_dict()
    assert manifest == json.loads(json.dumps(expected))
    assert manifest["samples"] == 6 and 32 <= manifest["min_length"] <= manifest["max_length"] <= 96
    card = (first / "README.md").read_text()
    assert f"token ids sha256 `{manifest['token_ids_sha256']}`" in card and "field `article`" in card


def test_three_ranks_chat_manifest_in_work_dir(chat_dir, smol_dir, tmp_path, monkeypatch):
    """Chat set rendered with the chat template, 3 ranks offline; the manifest sits in the work dir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calibration = {"dataset": f"hf:{chat_dir}", "samples": 4, "max_length": 256}
    out = _run(tmp_path, "chat", smol_dir, calibration, "--stop-after", "calibrate")
    saved = read_json(tmp_path / "chat.nvfp4_pp-work" / "rank0" / "calibration.json")
    assert saved["sources"][0]["field"] == "messages" and saved["samples"] == 4
    _run(tmp_path, "chat", smol_dir, calibration)  # continues from the saved calibration
    assert read_json(out / "nvfp4_pp.json")["calibration"]["manifest"] == saved
    assert not (tmp_path / "chat.nvfp4_pp-work").exists()
