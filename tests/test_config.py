"""Config validation: every key pinned, every error names the key and the fix."""

from __future__ import annotations

import pytest

from nvfp4_pp.config import ConfigError, config_from_dict, config_keys, load_config

BASE = {"model": "/m", "output": "/o"}


def test_config_keys_are_pinned():
    assert config_keys() == [
        "model", "output", "base_model", "format", "recipe", "recipe_overrides", "ignore", "algorithm",
        "gptq.damping", "gptq.block_size", "auto.candidates", "auto.held_out", "auto.guard", "kv_cache",
        "calibration.dataset", "calibration.config", "calibration.split", "calibration.field",
        "calibration.samples", "calibration.min_length", "calibration.max_length", "calibration.too_long",
        "calibration.seed", "calibration.batch_size", "calibration.pack",
        "layerwise.enable", "layerwise.boundary",
        "pipeline.layers", "pipeline.backend", "pipeline.device", "pipeline.memory_limit_gb",
        "pipeline.reserve_gb", "pipeline.timeout_s", "pipeline.stream",
        "gather.shared", "gather.transfer", "gather.work_dir", "gather.rsync_port", "serving.target",
    ]


def test_auto_tries_every_algorithm_that_fits_unless_told():
    layerwise = {"layerwise": {"enable": True}, "algorithm": "auto"}
    assert config_from_dict({**BASE, **layerwise, "recipe": "w4a16_int4", "format": "modelopt",
                            "serving": {"target": "none"}}).algorithms == [
        "max", "gptq", "awq_lite", "smooth", "smooth+gptq"]
    assert config_from_dict({**BASE, **layerwise}).algorithms == [  # NVFP4, compressed-tensors
        "max", "gptq", "local_hessian", "smooth", "smooth+gptq", "local_hessian+gptq", "smooth+local_hessian",
        "smooth+local_hessian+gptq"]
    named = config_from_dict({**BASE, **layerwise, "auto": {"candidates": ["gptq", "max"]}, "gptq": {"damping": 0.1}})
    assert named.algorithms == ["gptq", "max"] and named.gptq.damping == 0.1


def test_auto_guards_only_when_told_fullest_meaning_the_last_fitting_candidate():
    layerwise = {"layerwise": {"enable": True}, "algorithm": "auto"}
    fullest = {"guard": "fullest"}
    assert config_from_dict({**BASE, **layerwise}).guarded is None
    assert config_from_dict({**BASE, **layerwise, "auto": fullest}).guarded == "smooth+local_hessian+gptq"
    assert config_from_dict({**BASE, **layerwise, "recipe": "w4a16_int4", "auto": fullest}).guarded == "smooth+gptq"
    assert config_from_dict({**BASE, **layerwise, "auto": {"candidates": ["gptq", "max"], **fullest}}).guarded == "gptq"
    assert config_from_dict({**BASE, **layerwise, "auto": {"guard": "local_hessian"}}).guarded == "local_hessian"
    assert config_from_dict({**BASE, "algorithm": "gptq", "layerwise": {"enable": True}}).guarded is None


def test_defaults():
    cfg = config_from_dict(BASE)
    assert cfg.format == "compressed-tensors" and cfg.pipeline.layers == "auto"
    assert cfg.calibration.dataset == "builtin:pydoc" and cfg.calibration.batch_size == 1
    assert cfg.pipeline.memory_limit_gb is None and cfg.pipeline.reserve_gb == 2.0
    assert cfg.recipe == "nvfp4" and cfg.recipe_overrides == {} and cfg.ignore == [] and cfg.kv_cache is None


def test_per_rank_and_per_host_pipeline_keys():
    pipeline = {"device": ["cuda", "cuda", "cpu"], "memory_limit_gb": {"spark1": 110, "desktop": 22.5}}
    cfg = config_from_dict({**BASE, "pipeline": pipeline})
    assert cfg.pipeline.device == ["cuda", "cuda", "cpu"] and cfg.pipeline.memory_limit_gb["desktop"] == 22.5
    assert config_from_dict({**BASE, "pipeline": {"memory_limit_gb": [100, 100, 20]}}).pipeline.memory_limit_gb[2] == 20


@pytest.mark.parametrize("data,message", [
    ({"model": "/m"}, "config key 'output' is required but missing"),
    ({**BASE, "calibration": {"sample": 3}},
     "unknown config key 'calibration.sample'; valid keys in section 'calibration' are "
     "['batch_size', 'config', 'dataset', 'field', 'max_length', 'min_length', 'pack', 'samples', 'seed', "
     "'split', 'too_long']"),
    ({**BASE, "colour": 1}, "unknown config key 'colour'"),
    ({**BASE, "calibration": {"samples": "3"}},
     "config key 'calibration.samples' must be an integer or one of 'all', got '3'"),
    ({**BASE, "calibration": {"samples": "all", "dataset": [{"dataset": "a.jsonl"}, {"dataset": "b.jsonl"}]}},
     "config key 'calibration.samples' is 'all', which takes every sample of a single dataset; a mix splits"),
    ({**BASE, "model": "$NVFP4_PP_UNSET_VAR/m"},
     "config key 'model' = '$NVFP4_PP_UNSET_VAR/m' uses $NVFP4_PP_UNSET_VAR, which is not set in the environment"),
    ({**BASE, "calibration": {"samples": 0}}, "config key 'calibration.samples' must be >= 1, got 0"),
    ({**BASE, "pipeline": {"layers": "even"}},
     "config key 'pipeline.layers' must be one of 'auto' or a list of integers, got 'even'"),
    ({**BASE, "pipeline": {"layers": [10, 0, 20]}}, "every rank needs at least one layer"),
    ({**BASE, "format": "gguf"}, "config key 'format' must be one of 'compressed-tensors', 'modelopt', got 'gguf'"),
    ({**BASE, "pipeline": {"backend": "mpi"}}, "config key 'pipeline.backend' must be one of 'auto', 'gloo', 'nccl'"),
    ({**BASE, "calibration": {"dataset": "data.csv"}}, "is not a known form"),
    ({**BASE, "pipeline": 3}, "section 'pipeline' of the config must be a mapping"),
    ({**BASE, "gather": {"shared": "yes"}}, "config key 'gather.shared' must be one of 'auto' or true or false"),
    ({**BASE, "gather": {"transfer": "scp"}},
     "config key 'gather.transfer' must be one of 'process_group', 'rsync', got 'scp'"),
    ({**BASE, "pipeline": {"device": ["cuda", "gpu"]}}, "config key 'pipeline.device' must be one of 'auto', 'cpu'"),
    ({**BASE, "pipeline": {"memory_limit_gb": "lots"}},
     "config key 'pipeline.memory_limit_gb' must be null or a number or a list of numbers or a mapping to numbers"),
    ({**BASE, "pipeline": {"memory_limit_gb": {"spark1": 0}}}, "limits must be > 0 GB"),
    ({**BASE, "pipeline": {"reserve_gb": -1}}, "config key 'pipeline.reserve_gb' must be >= 0, got -1"),
    ({**BASE, "recipe": "int4"}, "config key 'recipe' must be one of 'nvfp4', 'nvfp4_awq', 'fp8'"),
    ({**BASE, "recipe_overrides": {"*mlp*": "fp4"}}, "config key 'recipe_overrides' must be a mapping to one of"),
    ({**BASE, "kv_cache": "int8"}, "config key 'kv_cache' must be null or one of 'fp8', got 'int8'"),
    ({**BASE, "recipe": "nvfp4_awq"}, "recipe nvfp4_awq keeps AWQ pre-quant scales"),
    ({**BASE, "algorithm": "gptq", "recipe": "fp8"},
     "algorithm gptq fits the weights of recipes ['w4a16_int4', 'nvfp4', 'w4a16_nvfp4'], not recipe fp8; choose one"),
    ({**BASE, "algorithm": "awq_lite"}, "NVFP4 with AWQ-lite is recipe nvfp4_awq; set 'recipe: nvfp4_awq'"),
    ({**BASE, "algorithm": "awq_lite", "recipe": "w4a16_int4"},
     "algorithm awq_lite keeps AWQ pre-quant scales, which compressed-tensors has no field for"),
    ({**BASE, "algorithm": "gptq", "recipe_overrides": {"*mlp*": "fp8"}}, "algorithm gptq runs on one recipe"),
    ({**BASE, "gptq": {"damping": 0.05}}, "config section 'gptq' applies to 'algorithm: gptq', not max"),
    ({**BASE, "algorithm": "gptq", "gptq": {"damping": 2}}, "config key 'gptq.damping' must be in (0, 1], got 2"),
    ({**BASE, "algorithm": "hqq"}, "config key 'algorithm' must be one of 'max', 'gptq', 'awq_lite', 'local_hessian'"),
    ({**BASE, "algorithm": "auto"}, "algorithm auto chooses an algorithm per decoder layer, which needs "
     "layer-by-layer calibration; set 'layerwise.enable: true'"),
    ({**BASE, "algorithm": "auto", "recipe": "fp8", "layerwise": {"enable": True}},
     "algorithm auto needs two candidates; for recipe fp8 in the compressed-tensors layout it has ['max'] (gptq: "
     "algorithm gptq fits the weights of recipes"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "auto": {"candidates": ["max"]}},
     "algorithm auto needs two candidates; for recipe nvfp4 in the compressed-tensors layout it has ['max']; name "
     "two in 'auto.candidates'"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "gptq": {"damping": 0.1},
      "auto": {"candidates": ["max", "gptq"]}, "recipe": "mxfp4"}, "auto.candidates: algorithm gptq fits"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "recipe": "w4a16_int4",
      "auto": {"candidates": ["max", "awq_lite"]}}, "auto.candidates: algorithm awq_lite keeps AWQ pre-quant scales"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "auto": {"candidates": ["max", "mse"]}},
     "config key 'auto.candidates' must be a list of one of 'max', 'gptq', 'awq_lite'"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "auto": {"held_out": 1}},
     "config key 'auto.held_out' must be above 0 and at most 0.5, got 1"),
    ({**BASE, "auto": {"held_out": 0.5}}, "config section 'auto' applies to 'algorithm: auto', not max"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "auto": {"candidates": ["max", "gptq"],
                                                                            "guard": "smooth"}},
     "config key 'auto.guard' names smooth, which is not among auto.candidates ['max', 'gptq']; add it there, or "
     "set 'auto.guard: fullest'"),
    ({**BASE, "algorithm": "auto", "layerwise": {"enable": True}, "auto": {"guard": "awq_lite"}},
     "auto.guard: NVFP4 with AWQ-lite is recipe nvfp4_awq"),
    ({**BASE, "algorithm": "four_over_six", "recipe": "mxfp4"},
     "algorithm four_over_six fits the weights of recipes ['nvfp4', 'w4a16_nvfp4'], not recipe mxfp4"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\noutput: /o\ncalibration:\n  samples: 8\n")
    cfg = load_config(path, ["calibration.samples=64", "pipeline.layers=[1, 28, 1]", "output=/elsewhere"])
    assert cfg.calibration.samples == 64 and cfg.pipeline.layers == [1, 28, 1] and cfg.output == "/elsewhere"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["calibration.samples"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)


def test_malformed_set_value_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: /m\noutput: /o\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["pipeline.layers=[41,41"])
    assert str(e.value).startswith("--set 'pipeline.layers=[41,41': the value '[41,41' is not valid YAML (")


def test_paths_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NVFP4_PP_DATA", str(tmp_path / "data"))
    cfg = config_from_dict({"model": "~/models/m", "output": "${NVFP4_PP_DATA}/out", "gather": {"work_dir": "~/w"},
                            "calibration": {"dataset": "$NVFP4_PP_DATA/calib.jsonl"}})
    assert cfg.model == f"{tmp_path}/home/models/m" and cfg.output == f"{tmp_path}/data/out"
    assert cfg.gather.work_dir == f"{tmp_path}/home/w" and cfg.calibration.dataset == f"{tmp_path}/data/calib.jsonl"
    mix = config_from_dict({**BASE, "calibration": {"samples": 4, "dataset": [{"dataset": "hf:~/sets/chat"},
                                                                             {"dataset": "builtin:pydoc"}]}})
    assert [s.dataset for s in mix.calibration.dataset] == [f"hf:{tmp_path}/home/sets/chat", "builtin:pydoc"]
