"""A run you can watch and a card the Hub reads, on real 3-rank runs of SmolLM2.

One run is stopped after export (every rank's log file is checked there), then resumed to the
end: its console must hold dated lines only (no third-party warnings), progress with an ETA for
load, calibration and export on every rank, and end on the final line; its card parses with
huggingface_hub's own card class, carries the serve flags the checkpoint calls for, and embeds two
valid PNG pictures.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, read_json, run_nvfp4_pp, write_config
from nvfp4_pp.publish.run_record import read_run_record
from nvfp4_pp.publish.source_card import read_source_card

DATED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[stage (\d)\] ")
SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.05}
SOURCE_CARD = """---
base_model: HuggingFaceTB/SmolLM2-135M
license: apache-2.0
pipeline_tag: text-generation
---
# SmolLM2-135M-Instruct
"""


@pytest.fixture(scope="module")
def source(smol_dir, tmp_path_factory) -> Path:
    """SmolLM2 as its Hub repository has it: a card naming its parent and license, its own Hub id in
    config.json, and sampling defaults in generation_config.json."""
    path = tmp_path_factory.mktemp("source") / "SmolLM2-135M-Instruct"
    shutil.copytree(smol_dir, path, copy_function=shutil.copy)
    (path / "README.md").write_text(SOURCE_CARD)
    config = read_json(path / "config.json")
    (path / "config.json").write_text(json.dumps({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    generation = read_json(path / "generation_config.json")
    (path / "generation_config.json").write_text(json.dumps({**generation, **SAMPLING, "do_sample": True}))
    return path


@pytest.fixture(scope="module")
def watched(source, tmp_path_factory):
    """(stopped run, resumed run, output): 3 ranks, FP8 KV cache, stopped after export, then finished."""
    tmp = tmp_path_factory.mktemp("watched")
    out = tmp / "SmolLM2-135M-Instruct-NVFP4"
    config = write_config(tmp / "run.yaml", model=str(source), output=str(out), format="compressed-tensors",
                          kv_cache="fp8", calibration={"dataset": "builtin:pydoc", "samples": 6, "max_length": 64})
    stopped = run_nvfp4_pp(config, 3, "--stop-after", "export")
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    logs = {r: (tmp / f"{out.name}.nvfp4_pp-work" / f"rank{r}" / "log.txt").read_text() for r in range(3)}
    finished = run_nvfp4_pp(config, 3)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return stopped, logs, finished, out


def test_console_is_dated_lines_with_progress_and_a_final_line(watched):
    stopped, _, finished, out = watched
    for result in (stopped, finished):
        lines = result.stdout.splitlines()
        assert lines and all(DATED.match(line) for line in lines), [l for l in lines if not DATED.match(l)][:5]
        assert result.stderr == ""  # no third-party warning, no launcher noise on success
    for phase in ("load", "calibration", "export"):
        for rank in range(3):  # the other ranks' lines reach rank 0's console through the relay
            progress = [l for l in stopped.stdout.splitlines() if f"[stage {rank}] {phase}: " in l and "%)" in l]
            assert any(re.search(r"ETA \d+ (s|min)", l) for l in progress), (phase, rank, progress)
            assert progress[-1].endswith("done"), progress
    assert "third-party output kept off the console:" in finished.stdout
    last = finished.stdout.splitlines()[-1]
    assert re.search(rf"\[stage 0\] done: {re.escape(str(out))} \(\d+\.\d\d GB\) in \d+ s, verification passed; "
                     rf"evaluate: {re.escape(sys.executable)} -m nvfp4_pp.evaluate .*; serve: vllm serve {re.escape(str(out))} "
                     r"--max-model-len 8192 --kv-cache-dtype fp8$", last), last


def test_every_rank_logs_into_its_own_file(watched):
    _, logs, _, _ = watched
    for rank, text in logs.items():
        lines = [l for l in text.splitlines() if DATED.match(l)]
        assert lines and {DATED.match(l).group(1) for l in lines} == {str(rank)}
        assert f"[stage {rank}] export done in" in text
        assert "Inserted" in text or "warning" in text.lower()  # third-party output lands here, not on the console


def test_card_front_matter_parses_with_huggingface_hub(watched):
    from huggingface_hub import ModelCard

    *_, out = watched
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    # The source's own card names its parent; its config names the source itself.
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == "transformers"
    assert {"nvfp4", "compressed-tensors", "vllm", "fp8-kv-cache"} <= set(data["tags"])
    text = card.text
    assert "1 to " not in text and text.count("token ids sha256") == 1
    lengths = read_json(out / "nvfp4_pp.json")["calibration"]["manifest"]
    assert f"lengths {lengths['min_length']} / {lengths['median_length']} / {lengths['max_length']} tokens" in text


def test_serve_commands_follow_the_checkpoint(watched, ct_output):
    """--kv-cache-dtype fp8 exactly when K/V scales were written; sampling equal to the source's."""
    *_, out = watched
    for directory, kv in ((out, True), (ct_output, False)):
        index = read_json(directory / "model.safetensors.index.json")["weight_map"]
        assert any(n.endswith(".k_scale") for n in index) == kv
        serve = [l for l in (directory / "README.md").read_text().splitlines() if l.startswith("vllm serve ")]
        assert len(serve) == 3  # Blackwell, Hopper/Ampere, GB10
        assert all(("--kv-cache-dtype fp8" in l) == kv and "--max-model-len 8192" in l for l in serve), serve
    assert read_run_record(out).checkpoint.sampling == SAMPLING
    card = (out / "README.md").read_text()
    assert "`temperature=0.6`, `top_p=0.9`, `top_k=40`, `repetition_penalty=1.05`" in card
    assert "models:\n  \"SmolLM2-135M-Instruct-NVFP4\":" in card and "(`chat_template.jinja`)" in card


def test_charts_are_valid_pngs_embedded_in_the_card(watched):
    from PIL import Image

    *_, out = watched
    card = (out / "README.md").read_text()
    for name in ("pipeline-timeline.png", "quantization-error.png"):
        assert f"]({name})" in card
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 100
            image.verify()
    record = read_run_record(out)
    assert [s.name for s in record.ranks[1].spans] == ["start-up", "load", "calibrate", "export", "gather"]
    errors = [s.weight_error for s in record.linears.values()]
    assert len(errors) == 210 and all(0.05 < e < 0.15 for e in errors)  # NVFP4: about 10 % relative RMS


def test_base_model_is_the_sources_own_hub_id(tmp_path):
    model = tmp_path / "hub" / "models--org--Model-7B" / "snapshots" / "abc123"
    model.mkdir(parents=True)
    (model / "README.md").write_text("---\nbase_model: org/Parent-7B\nlicense: other\nlicense_name: custom\n---\n")
    assert read_source_card(model, {}).hub_id == "org/Model-7B"  # the Hub cache path says it exactly
    local = tmp_path / "Model-7B"
    shutil.copytree(model, local)
    assert read_source_card(local, {"_name_or_path": "org/Parent-7B"}).hub_id is None  # the parent, not the source
    assert read_source_card(local, {"_name_or_path": "/data/ckpt"}).hub_id is None
    assert read_source_card(local, {"_name_or_path": "org/Model-7B"}).hub_id == "org/Model-7B"
    card = read_source_card(local, {}, configured="me/Model-7B")
    assert card.hub_id == "me/Model-7B" and card.license == {"license": "other", "license_name": "custom"}


def test_without_matplotlib_the_card_has_no_pictures_and_says_how(monkeypatch, tmp_path, caplog):
    import logging

    from nvfp4_pp.publish.charts import render_charts
    from nvfp4_pp.records import Charts

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if the charts extra were not installed
    record = read_run_record(REPO / "tests" / "golden" / "demo-nvfp4-ct-evaluated")  # spans and Linears to draw
    with caplog.at_level(logging.INFO, logger="nvfp4_pp"):
        assert render_charts(tmp_path, record) == Charts()
    assert "pip install 'nvfp4_pp[charts]'" in caplog.text and not list(tmp_path.iterdir())
