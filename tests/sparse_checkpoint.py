"""Header-only checkpoints: real safetensors headers over sparse files, for planning huge models on CI.

The files claim their full size (so SourceCheckpoint's truncation check passes) but occupy no disk:
planning reads headers only, which is exactly what these tests check.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BEHEMOTH_X_123B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 88,
    "hidden_size": 12288, "intermediate_size": 28672, "num_attention_heads": 96, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 32768, "tie_word_embeddings": False, "dtype": "bfloat16",
}
"""Behemoth-X-123B's config.json fields that fix its tensor shapes (Mistral-Large-2411 geometry)."""


def llama_like_shapes(config: dict) -> dict[str, list[int]]:
    """Every tensor name and shape of a Llama/Mistral checkpoint with this config."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = [v, h]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": [q, h], p + "self_attn.k_proj.weight": [kv, h],
                   p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, q],
                   p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                   p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                   p + "post_attention_layernorm.weight": [h]}
    return shapes


def write_sparse_checkpoint(directory: Path, config: dict, shard_tensors: int = 100) -> Path:
    """A BF16 checkpoint directory whose shards are headers followed by holes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = list(llama_like_shapes(config).items())
    weight_map = {}
    for k in range(0, len(names), shard_tensors):
        file = f"model-{k // shard_tensors + 1:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[k : k + shard_tensors]:
            nbytes = 2
            for d in shape:
                nbytes *= d
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        with open(directory / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory
