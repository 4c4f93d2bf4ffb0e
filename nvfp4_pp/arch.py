"""What nvfp4_pp knows about each supported decoder architecture, in one place.

An architecture is described by where its pieces live inside the transformers model; the stage
forward (stage.py) is the same loop the model's own forward runs, so adding a Llama-like
architecture is one entry here.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True, slots=True)
class Architecture:
    """Module paths of one causal-LM class (relative to the top-level model)."""

    name: str
    decoder: str = "model"
    """Path of the decoder module holding embed_tokens, layers, norm and rotary_emb."""
    lm_head: str = "lm_head"

    def layer_prefix(self, index: int) -> str:
        return f"{self.decoder}.layers.{index}."

    def layer_of(self, tensor_name: str) -> int | None:
        """Decoder-layer index of a tensor name, or None for embeddings, norm, lm_head."""
        m = re.match(re.escape(self.decoder) + r"\.layers\.(\d+)\.", tensor_name)
        return int(m.group(1)) if m else None

    def on_last_stage(self, tensor_name: str) -> bool:
        """Tensors outside the decoder layers that belong after the last layer."""
        return tensor_name.startswith((f"{self.decoder}.norm.", f"{self.lm_head}."))


SUPPORTED = {
    name: Architecture(name)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
}


class UnsupportedArchitecture(ValueError):
    pass


def architecture_of(hf_config: dict) -> Architecture:
    """The Architecture for a config.json, or one clear refusal listing what is supported."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in SUPPORTED:
            return SUPPORTED[name]
    raise UnsupportedArchitecture(
        f"architecture {names or '(none in config.json)'} is not supported; "
        f"supported: {', '.join(sorted(SUPPORTED))}"
    )
