"""The independent reference: modelopt's own single-process quantization and export.

`python tests/reference.py [--recipe NAME] [--kv-cache fp8] [--algorithm gptq] [--layerwise on] [--ignore P,Q]
MODEL_DIR TOKENS_JSONL OUT_DIR
[ATTN_IMPLEMENTATION [DEVICE]]` loads the whole model in one process (on DEVICE, default cpu), runs
`mtq.quantize(model, CONFIG, loop)` over the samples in file order (batch 1) and writes
`export_hf_checkpoint`. CONFIG is modelopt's own preset for the recipe (default nvfp4:
NVFP4_DEFAULT_CFG), taken here from modelopt and never from the project's config code
(`preset_config`; tests/test_recipes.py checks that a run hands modelopt the same dict, apart from
`distributed_sync`); what differs is everything this project adds around it (stages, pipeline,
per-stage export). Several models
(on CPU): repeat the four arguments (`MODEL_DIR TOKENS_JSONL OUT_DIR ATTN ...`); each gets its own
model and `mtq.quantize`, only the imports are shared. Run as its own process so modelopt's global
patches stay out of the test process. `--layerwise on` is modelopt's own layer-by-layer calibration;
its loop runs the model with `use_cache=False`, since modelopt's replay of a layer's captured call
would otherwise reuse the KV cache of the earlier replays (see nvfp4_pp/calibration/layerwise.py).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's nvfp4_pp

PRESETS = {"nvfp4": "NVFP4_DEFAULT_CFG", "nvfp4_awq": "NVFP4_AWQ_LITE_CFG", "fp8": "FP8_DEFAULT_CFG",
           "w4a16_nvfp4": "W4A16_NVFP4_CFG", "mxfp4": "MXFP4_DEFAULT_CFG", "w4a16_int4": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}
"""Each recipe's modelopt preset (docs/recipes.md's table)."""
MIXES = {"mxfp4_mlp_fp8_attn": {"*mlp*": "mxfp4", "*self_attn*": "fp8"}}
"""Mixed recipes: module pattern -> the recipe whose preset quantizes those Linears."""
SEARCHES = {"local_hessian": "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", "mse": "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",
            "four_over_six": "NVFP4_FOUR_OVER_SIX_CFG"}
"""modelopt's NVFP4 weight-scale search presets (their weight quantizer and algorithm)."""


def preset_config(recipe: str = "nvfp4", ignore: list[str] = (), kv_cache: str | None = None,
                  algorithm: str = "max") -> dict:
    """The modelopt config for a recipe, read from modelopt's presets alone: a mix puts each part's
    Linear quantizers, scoped to its pattern, after the first part's own; ignored modules and the FP8
    KV-cache preset are appended as modelopt's hf_ptq appends them; an algorithm other than max
    replaces the preset's (a scale search brings its preset's weight quantizer)."""
    import copy

    import modelopt.torch.quantization as mtq

    def preset(name: str) -> dict:
        return copy.deepcopy(getattr(mtq, name))

    parts = MIXES.get(recipe)
    cfg = preset(PRESETS[next(iter(parts.values())) if parts else recipe])
    entries = cfg["quant_cfg"]
    if parts:
        scoped = []
        for pattern, part in parts.items():
            own = {e["quantizer_name"]: e for e in preset(PRESETS[part])["quant_cfg"]}
            for name in ("*weight_quantizer", "*input_quantizer"):
                scoped.append({**own[name], "quantizer_name": f"{pattern}.{name[1:]}"})
        after = max(i for i, e in enumerate(entries) if e["quantizer_name"] in ("*weight_quantizer", "*input_quantizer"))
        entries[after + 1:after + 1] = scoped
        calibrating = [getattr(mtq, PRESETS[p])["algorithm"] for p in parts.values()]
        cfg["algorithm"] = next((a for a in calibrating if a), None)
    entries += [{"quantizer_name": f"{pattern}.*", "enable": False} for pattern in ignore]
    if kv_cache == "fp8":
        entries += preset("FP8_KV_CFG")["quant_cfg"]
        cfg["algorithm"] = cfg["algorithm"] or "max"
    if algorithm in SEARCHES:
        search = preset(SEARCHES[algorithm])
        weight = next(e for e in search["quant_cfg"] if e["quantizer_name"] == "*weight_quantizer")
        next(e for e in entries if e["quantizer_name"] == "*weight_quantizer")["cfg"] = weight["cfg"]
        cfg["algorithm"] = search["algorithm"]
    elif algorithm != "max":
        cfg["algorithm"] = {"method": algorithm}
    if isinstance(cfg["algorithm"], str):  # a preset's "max": the same as {"method": "max"}
        cfg["algorithm"] = {"method": cfg["algorithm"]}
    return cfg


def quantize_reference(model_dir: str, tokens: str, out_dir: str, attn_implementation: str = "sdpa",
                       device: str = "cpu", recipe: str = "nvfp4", kv_cache: str | None = None,
                       algorithm: str = "max", layerwise: str = "off", ignore: str = "") -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    # Image-text models are quantized whole, as modelopt's hf_ptq does: its default config leaves
    # vision towers and projectors unquantized, and text-only samples drive the language model.
    image_text = hasattr(AutoConfig.from_pretrained(model_dir), "vision_config")
    auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    model.eval().to(device)
    with open(tokens) as f:
        samples = [torch.tensor([json.loads(line)["input_ids"]], device=device) for line in f if line.strip()]

    def loop(m):
        for s in samples:
            m(s, use_cache=False)

    # "a+b" stacks modelopt's algorithms in order (a list config), e.g. AWQ pre-scales then GPTQ.
    patterns = [p for p in ignore.split(",") if p]
    parts = [preset_config(recipe, ignore=patterns, kv_cache=kv_cache, algorithm=a) for a in algorithm.split("+")]
    config = parts[-1]
    if len(parts) > 1:
        config["algorithm"] = [part["algorithm"] for part in parts]
    if layerwise == "on":
        for step in config["algorithm"] if isinstance(config["algorithm"], list) else [config["algorithm"]]:
            step["layerwise"] = {"enable": True}
    mtq.quantize(model, config, loop)
    export_hf_checkpoint(model, export_dir=out_dir)


def main(args: list[str]) -> None:
    options = {}
    while args and args[0] in ("--recipe", "--kv-cache", "--algorithm", "--layerwise", "--ignore"):
        options[args[0][2:].replace("-", "_")], args = args[1], args[2:]
    if len(args) in (3, 5):
        quantize_reference(*args, **options)
        return
    if not args or len(args) % 4:
        raise SystemExit(__doc__)
    for i in range(0, len(args), 4):
        quantize_reference(*args[i : i + 4], **options)


if __name__ == "__main__":
    main(sys.argv[1:])
