"""Seed model configs: valid against a config.json of each model's real shape, reproduce their release's
data (read offline from a cnn_dailymail-shaped set), and `make -n <model>`.

The checkpoints are synthetic: the real config.json fields and safetensors shards whose headers
declare every tensor with its real name, dtype and shape (sparse files, no bytes on disk), so
validation, architecture lookup, the layer split and per-rank sizes run exactly as on the model.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import REPO
from sparse_checkpoint import write_sparse_checkpoint
from nvfp4_pp.model.arch import architecture_of
from nvfp4_pp.planning.budget import GB, RankFacts, budgets
from nvfp4_pp.algorithms.table import memory_terms
from nvfp4_pp.config import load_config
from nvfp4_pp.planning.memory import ModelSizes, Workload
from nvfp4_pp.planning.plan import gptq_time_line, owner_of, plan_stages
from nvfp4_pp.model.source import SourceCheckpoint

# Facts from the models' config.json files (Mistral-Large-Instruct-2411 and Llama-3.3-70B-Instruct
# families; the finetunes keep their base model's shape).
MISTRAL_LARGE = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 12288,
    "intermediate_size": 28672, "num_hidden_layers": 88, "num_attention_heads": 96, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 32768, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-05, "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
LLAMA_33_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rms_norm_eps": 1e-05, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}

# config name -> (config.json, published parameter count in billions)
SEEDS = {
    "behemoth": (MISTRAL_LARGE, 122.6),                                              # Behemoth-X-123B v2.2
    "behemoth-t1": (MISTRAL_LARGE, 122.6),                                           # Behemoth-T1-123B
    "anubis-pro": ({**LLAMA_33_70B, "num_hidden_layers": 120}, 104.8),               # Llama-3.3, 1.5x layers
    "llama-3.3-70b": (LLAMA_33_70B, 70.6),
    "deepseek-r1-distill-llama-70b": ({**LLAMA_33_70B, "eos_token_id": 128001}, 70.6),
}
RELEASES = {"behemoth": "TheDrummer/Behemoth-X-123B-v2.2", "behemoth-t1": "TheDrummer/Behemoth-T1-123B-v1",
            "anubis-pro": "TheDrummer/Anubis-Pro-105B-v1", "llama-3.3-70b": "meta-llama/Llama-3.3-70B-Instruct",
            "deepseek-r1-distill-llama-70b": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"}
"""Config name -> the Hub id of the model its seed release quantized."""
RELEASE_DATA = {"dataset": "hf:abisee/cnn_dailymail", "config": "3.0.0", "split": "train", "field": "article",
                "samples": 256, "min_length": 150, "max_length": 1200, "too_long": "skip"}
"""The seed releases' calibration data: 256 cnn_dailymail articles of 150 to 1200 tokens."""
FILL_CACHE = "python -c \"import datasets; datasets.load_dataset('abisee/cnn_dailymail', '3.0.0', split='train')\""


def target_hardware(nnodes: int, small_last: bool) -> list[RankFacts]:
    """The seeds' nodes: 128 GiB DGX Sparks (unified memory), the last one a 24 GiB RTX 3090 when asked."""
    gib = 2**30
    facts = [RankFacts(r, f"spark{r}", "cuda:0", "unified", 5 * 10**12, 120 * gib, 3 * GB) for r in range(nnodes)]
    if small_last:
        facts[-1] = RankFacts(nnodes - 1, "desktop", "cuda:0", "discrete", int(23.5 * gib), 48 * gib, 3 * GB)
    return facts


def launcher() -> str:
    python = ".venv/bin/python" if (REPO / ".venv" / "bin" / "python").exists() else "python3"
    return f"{python} -m nvfp4_pp.launch"


def make_dry_run(target: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    result = subprocess.run(["make", "--no-print-directory", "-n", target, *args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_config_is_valid_for_the_real_model_shape(name, tmp_path):
    hf_config, billions = SEEDS[name]
    model = tmp_path / "model"
    write_sparse_checkpoint(model, hf_config)
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"model={model}", f"output={tmp_path / 'out'}"])

    command = make_dry_run(name, f"MODEL_DIR={model}", f"OUT={tmp_path / 'out'}")
    nnodes = int(re.search(r"--nnodes (\d+)", command).group(1))
    assert command == (
        f"{launcher()} --nnodes {nnodes} --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint localhost:29500 "
        f"--rdzv-id nvfp4_pp-{name} -m nvfp4_pp.run configs/{name}.yaml --set model={model} "
        f"--set output={tmp_path / 'out'}"
    )

    source = SourceCheckpoint(cfg.model)
    arch = architecture_of(source.config)
    sizes = ModelSizes.from_source(source, arch)
    # the workload as the run plans it (algorithms.table's memory terms), every sample at the window's top
    terms = memory_terms({cfg.algorithm, *cfg.algorithms})
    workload = Workload(cfg.calibration.batch_size, cfg.calibration.max_length,
                        calibration_tokens=cfg.calibration.samples * cfg.calibration.max_length,
                        hessians=terms.hessians, layer_major=cfg.layerwise.enable, trials=terms.trials,
                        smoothing=terms.smoothing)
    plans = plan_stages(sizes, budgets(target_hardware(nnodes, small_last=cfg.pipeline.layers != "auto"),
                                       cfg.pipeline.memory_limit_gb, cfg.pipeline.reserve_gb),
                        cfg.pipeline.layers, workload, stream=cfg.pipeline.stream)
    if terms.hessians:  # GPTQ: the plan's predicted solve time, the stages solving at once
        assert "s a layer on an H200" in gptq_time_line(plans, sizes, cfg.layerwise.boundary)
    ranges = [(p.start, p.stop) for p in plans]
    per_rank = [0] * nnodes
    for tensor, file in source.weight_map.items():
        meta = source.header(file)[tensor]
        per_rank[owner_of(tensor, arch, ranges)] += meta["data_offsets"][1] - meta["data_offsets"][0]
    assert sum(per_rank) / 2e9 == pytest.approx(billions, rel=0.005)  # the published parameter count
    if cfg.pipeline.layers != "auto":  # the small last node (a 24 GB RTX 3090) gets a slice that fits
        assert per_rank[-1] < 20e9 and max(per_rank) < 120e9, per_rank


def test_make_overrides_and_usage_error():
    command = make_dry_run("llama-3.3-70b", "MODEL_DIR=/m", "OUT=/o", "NNODES=1", "NPROC_PER_NODE=2", "RDZV=n0:29511")
    assert command.removeprefix(launcher() + " ").startswith("--nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint n0:29511 ")
    result = subprocess.run(["make", "-n", "behemoth"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "usage: make behemoth MODEL_DIR=" in result.stderr


@pytest.fixture(scope="module")
def cnn_like(tmp_path_factory) -> Path:
    """A save_to_disk set shaped like cnn_dailymail 3.0.0's train split: articles of real English text,
    from a few dozen to a few thousand tokens."""
    datasets = pytest.importorskip("datasets", reason="the 'data' extra: pip install 'nvfp4_pp[data]'")
    from pydoc_data.topics import topics

    rows = [{"article": topics[k], "highlights": topics[k][:80], "id": f"{i:040x}"} for i, k in enumerate(sorted(topics)[:40])]
    path = tmp_path_factory.mktemp("hf") / "cnn_dailymail"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_config_reproduces_its_release_data(name, cnn_like, smol_dir):
    """The release's data and layout, its Hub id for the card, the header naming the release and the one
    command that fills the data cache; the data section reads a cnn_dailymail-shaped set offline with
    every sample a whole article inside the window."""
    from nvfp4_pp.data.samples import load_samples

    path = REPO / "configs" / f"{name}.yaml"
    cfg = load_config(path, ["model=/m", "output=/o"])
    assert {k: getattr(cfg.calibration, k) for k in RELEASE_DATA} == RELEASE_DATA
    assert cfg.format == "compressed-tensors" and cfg.base_model == RELEASES[name]
    header = path.read_text().split("\nmodel:")[0]
    assert f"Seed release: {RELEASES[name]}" in header and FILL_CACHE in header and "differs" in header
    # The stand-in set holds 40 articles, not the release's thousands: take all that fit the window.
    calibration = dataclasses.replace(cfg.calibration, dataset=f"hf:{cnn_like}", config="", samples="all")
    chosen = load_samples(calibration, smol_dir)
    source = chosen.manifest().sources[0]
    assert source.field == "article" and source.skipped_long > 0 and source.skipped_short > 0
    assert chosen.samples and all(150 <= len(s) <= 1200 for s in chosen.samples)
