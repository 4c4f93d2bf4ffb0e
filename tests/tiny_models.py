"""Tiny random-weight models, one per supported architecture, built from their transformers configs.

Six layers (so a 3-rank split puts layers of different attention types on every rank), dims
divisible by 16, a small vocabulary, every 1-D parameter (norms, biases) perturbed so that none is a
trivial 0 or 1, saved as BF16 safetensors. Sliding windows (16) are shorter than the samples, so
the sliding-window masks differ from the causal ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SLIDING_WINDOW = 16
SAMPLE_LENGTHS = (40, 24, 33, 17)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
S, F = "sliding_attention", "full_attention"

TINY = {
    "LlamaForCausalLM": ("LlamaConfig", dict(
        # Llama-3.x rope scaling, as in Llama-3.1/3.3 70B
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )),
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=SLIDING_WINDOW)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(  # q/k/v biases; top layers sliding
        use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3,
    )),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=32)),  # q/k norms, head_dim != hidden/heads
    "Cohere2ForCausalLM": ("Cohere2Config", dict(  # parallel attention+MLP, LayerNorm, NoPE full layers
        sliding_window=SLIDING_WINDOW, layer_types=[S, S, S, F, S, S], logit_scale=0.25,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(  # soft-capping (eager attention), alternating windows
        head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
    )),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(  # separate local/global rope
        head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW, layer_types=[S, S, F, S, S, F],
        rope_parameters={S: {"rope_type": "default", "rope_theta": 10000.0},
                         F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
    )),
}


def tiny_config(arch: str):
    import transformers

    config_class, extra = TINY[arch]
    config = getattr(transformers, config_class)(**COMMON, **extra)
    config.architectures = [arch]
    return config


def write_tiny_model(arch: str, target: Path, seed: int = 0) -> Path:
    """Random-weight BF16 checkpoint of `arch` in `target` (config.json + model.safetensors)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch)(tiny_config(arch)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(target)
    write_tiny_tokenizer(target, model.config.vocab_size)
    return target


def write_tiny_tokenizer(target: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` made-up words: every servable checkpoint needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(target)


def write_token_file(path: Path, vocab_size: int = COMMON["vocab_size"], seed: int = 0) -> Path:
    """Tokenizer-free samples: random ids, lengths longer than the sliding window."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for n in SAMPLE_LENGTHS:
            f.write(json.dumps({"input_ids": [rng.randrange(vocab_size) for _ in range(n)]}) + "\n")
    return path
