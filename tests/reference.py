"""The independent reference: modelopt's own single-process quantization and export.

`python tests/reference.py [--recipe NAME] [--kv-cache fp8] [--algorithm gptq] [--layerwise on] [--ignore P1,P2]
MODEL_DIR TOKENS_JSONL OUT_DIR
[ATTN_IMPLEMENTATION [DEVICE]]` loads the whole model in one process (on DEVICE, default cpu), runs
`mtq.quantize(model, CONFIG, loop)` over the samples in file order (batch 1) and writes
`export_hf_checkpoint`. CONFIG is the recipe's modelopt config (default nvfp4: NVFP4_DEFAULT_CFG;
`--ignore` patterns kept in BF16), the same dict a run of that recipe hands modelopt on every rank;
what differs is everything this project adds around it (stages, pipeline, per-stage export). Several models
(on CPU): repeat the four arguments (`MODEL_DIR TOKENS_JSONL OUT_DIR ATTN ...`); each gets its own
model and `mtq.quantize`, only the imports are shared. Run as its own process so modelopt's global
patches stay out of the test process. `--layerwise on` is modelopt's own layer-by-layer calibration;
its loop runs the model with `use_cache=False`, since modelopt's replay of a layer's captured call
would otherwise reuse the KV cache of the earlier replays (see nvfp4_pp/layerwise.py).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's nvfp4_pp


def quantize_reference(model_dir: str, tokens: str, out_dir: str, attn_implementation: str = "sdpa",
                       device: str = "cpu", recipe: str = "nvfp4", kv_cache: str | None = None,
                       algorithm: str = "max", layerwise: str = "off", ignore: str = "") -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from nvfp4_pp.calibrate import modelopt_config

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
    ignored = [p for p in ignore.split(",") if p]
    parts = [modelopt_config(recipe, kv_cache=kv_cache, ignore=ignored, algorithm=a) for a in algorithm.split("+")]
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
