"""The independent reference: modelopt's own single-process quantization and export.

`python tests/reference.py MODEL_DIR TOKENS_JSONL OUT_DIR [DEVICE]` loads the whole model in one process,
runs `mtq.quantize(model, NVFP4_DEFAULT_CFG, loop)` over the samples in file order (batch 1) and
writes `export_hf_checkpoint`. Run as its own process so modelopt's global patches stay out of
the test process.
"""

import json
import sys

import torch


def main(model_dir: str, tokens: str, out_dir: str, device: str = "cpu") -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval().to(device)
    with open(tokens) as f:
        samples = [torch.tensor([json.loads(line)["input_ids"]], device=device) for line in f if line.strip()]

    def loop(m):
        for s in samples:
            m(s)

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    export_hf_checkpoint(model, export_dir=out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
