"""The independent reference: modelopt's own single-process quantization and export.

`python tests/reference.py MODEL_DIR TOKENS_JSONL OUT_DIR [ATTN_IMPLEMENTATION [DEVICE]]` loads the
whole model in one process (on DEVICE, default cpu), runs `mtq.quantize(model, NVFP4_DEFAULT_CFG,
loop)` over the samples in file order (batch 1) and writes `export_hf_checkpoint`. Several models
(on CPU): repeat the four arguments (`MODEL_DIR TOKENS_JSONL OUT_DIR ATTN ...`); each gets its own
model and `mtq.quantize`, only the imports are shared. Run as its own process so modelopt's global
patches stay out of the test process.
"""

import json
import sys

import torch


def quantize_reference(model_dir: str, tokens: str, out_dir: str, attn_implementation: str = "sdpa",
                       device: str = "cpu") -> None:
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
            m(s)

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    export_hf_checkpoint(model, export_dir=out_dir)


def main(args: list[str]) -> None:
    if len(args) in (3, 5):
        quantize_reference(*args)
        return
    if not args or len(args) % 4:
        raise SystemExit(__doc__)
    for i in range(0, len(args), 4):
        quantize_reference(*args[i : i + 4])


if __name__ == "__main__":
    main(sys.argv[1:])
