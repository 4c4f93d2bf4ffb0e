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


LEGACY_TO_NEW_LAYOUT = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                        ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
"""Image-text tensor names as transformers writes them (and vLLM reads them) -> as 4.52-4.57 wrote them."""


def _mistral3_config():
    import transformers

    text = transformers.MistralConfig(**COMMON, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=32, patch_size=8)
    return transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       image_token_index=COMMON["vocab_size"] + 44, spatial_merge_size=2,
                                       tie_word_embeddings=False)  # as Mistral-Small-3.1: its own lm_head


def _gemma3_image_text_config():
    import transformers

    text = transformers.Gemma3TextConfig(**TINY["Gemma3ForCausalLM"][1], **COMMON)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                                     image_token_index=COMMON["vocab_size"] + 44, boi_token_index=1, eoi_token_index=2)


TINY_IMAGE_TEXT = {
    # Mistral-Small-3.1 / Mistral-Medium-3 style: Pixtral vision tower + Mistral decoder
    "Mistral3ForConditionalGeneration": _mistral3_config,
    # Gemma-3 4B-27B: SigLIP vision tower + Gemma3 decoder (scaled embeddings, local/global rope)
    "Gemma3ForConditionalGeneration": _gemma3_image_text_config,
}


def write_tiny_image_text_model(arch: str, target: Path, new_layout: bool = False, seed: int = 0) -> Path:
    """Random-weight BF16 image-text checkpoint; `new_layout` renames its tensors as transformers 4.52-4.57 saved them."""
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    config = TINY_IMAGE_TEXT[arch]()
    config.architectures = [arch]
    _save_perturbed(getattr(transformers, arch)(config), target, config.text_config.vocab_size)
    if new_layout:
        tensors = load_file(target / "model.safetensors")
        renamed = {}
        for name, tensor in tensors.items():
            for old, new in LEGACY_TO_NEW_LAYOUT:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            renamed[name] = tensor
        save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})
    return target


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
    _save_perturbed(getattr(transformers, arch)(tiny_config(arch)), target, COMMON["vocab_size"])
    return target


def _save_perturbed(model, target: Path, vocab_size: int) -> None:
    """Save as BF16 with every 1-D parameter (norms, biases) perturbed off 0/1, and a tokenizer beside."""
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(target)
    write_tiny_tokenizer(target, vocab_size)


def write_tiny_tokenizer(target: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` made-up words: every servable checkpoint needs one. The last
    word is `<|endoftext|>`, which Qwen2's tokenizer class otherwise appends past the embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size - 1)}, "<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>").save_pretrained(target)


def write_token_file(path: Path, vocab_size: int = COMMON["vocab_size"], seed: int = 0) -> Path:
    """Tokenizer-free samples: random ids, lengths longer than the sliding window."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for n in SAMPLE_LENGTHS:
            f.write(json.dumps({"input_ids": [rng.randrange(vocab_size) for _ in range(n)]}) + "\n")
    return path
