"""What nvfp4_pp knows about each supported decoder architecture, in one place.

An entry says where the pieces of one transformers causal-LM class live and which conventions its
decoder forward follows (per-layer attention type -> mask, rotary tables per layer type or shared,
attention implementation). stage.py runs the same loop the model's own forward runs from these
facts, so adding a dense decoder whose forward follows one of these conventions is one entry here.
Everything is looked up by the exact class name the checkpoint's config.json declares.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from nvfp4_pp.errors import NvFp4PpError

FULL = "full_attention"
SLIDING = "sliding_attention"


def all_full_attention(config) -> list[str]:
    """Llama: one causal mask for every layer."""
    return [FULL] * config.num_hidden_layers


def sliding_if_window_set(config) -> list[str]:
    """Mistral: one mask for every layer, sliding-window whenever `config.sliding_window` is set."""
    return [FULL if config.sliding_window is None else SLIDING] * config.num_hidden_layers


def configured_layer_types(config) -> list[str]:
    """Qwen2/3, Cohere2, Gemma2/3: layer i uses the mask (and rope) of `config.layer_types[i]`."""
    return list(config.layer_types)


@dataclasses.dataclass(frozen=True, slots=True)
class Architecture:
    """Module paths (relative to the top-level model) and forward conventions of one causal-LM class."""

    name: str
    """The transformers class, exactly as config.json's `architectures` names it."""
    layer_types: Callable[[object], list[str]] = all_full_attention
    """Attention type of every global layer index; each type gets its own mask (stage.MASKS)."""
    rope_per_layer_type: bool = False
    """The rotary module takes the layer type and returns separate local/global tables (Gemma3)."""
    attn_implementation: str = "sdpa"
    """What transformers picks by default on CPU/GPU without flash-attn (eager where sdpa is unsupported)."""
    embedding_scale: str | None = None
    """Scaling applied to the embeddings; part of the embedding module, so it runs on the first stage only."""
    logits: str | None = None
    """What the model does after lm_head (soft-capping, scaling): never run here, no stage computes logits."""
    decoder: str = "model"
    """Path of the decoder module holding the embeddings, layers, final norm and rotary module."""
    embeddings: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    rotary: str = "rotary_emb"
    lm_head: str = "lm_head"
    text: Architecture | None = None
    """For a multimodal checkpoint (`name` is the image-text class): the causal-LM architecture of its
    language model, which builds the stages; `decoder` and `lm_head` are then the checkpoint's paths."""

    @property
    def builder(self) -> Architecture:
        """The architecture whose transformers class builds a stage's skeleton."""
        return self.text or self

    def layer_prefix(self, index: int) -> str:
        return f"{self.decoder}.{self.layers}.{index}."

    def layer_of(self, tensor_name: str) -> int | None:
        """Decoder-layer index of a tensor name, or None for embeddings, norm, lm_head."""
        m = re.match(re.escape(f"{self.decoder}.{self.layers}.") + r"(\d+)\.", tensor_name)
        return int(m.group(1)) if m else None

    def on_last_stage(self, tensor_name: str) -> bool:
        """Tensors outside the decoder layers that belong after the last layer."""
        return tensor_name.startswith((f"{self.decoder}.{self.final_norm}.", f"{self.lm_head}."))


_GEMMA_EMBEDDING = "x sqrt(hidden_size), inside embed_tokens (ScaledWordEmbedding)"

SUPPORTED: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM"),
        Architecture("MistralForCausalLM", layer_types=sliding_if_window_set),
        Architecture("Qwen2ForCausalLM", layer_types=configured_layer_types),
        Architecture("Qwen3ForCausalLM", layer_types=configured_layer_types),
        Architecture("Cohere2ForCausalLM", layer_types=configured_layer_types, logits="x logit_scale"),
        Architecture(
            "Gemma2ForCausalLM", layer_types=configured_layer_types, attn_implementation="eager",
            embedding_scale=_GEMMA_EMBEDDING, logits="final_logit_softcapping",
        ),
        Architecture(
            "Gemma3ForCausalLM", layer_types=configured_layer_types, rope_per_layer_type=True,
            embedding_scale=_GEMMA_EMBEDDING, logits="final_logit_softcapping",
        ),
    )
}


class UnsupportedArchitecture(NvFp4PpError):
    pass


LANGUAGE_MODEL_PATHS = (("language_model.model", "language_model.lm_head"), ("model.language_model", "lm_head"))
"""Where image-text checkpoints keep the language model's decoder and head: the layout transformers
writes (and vLLM names) first, then the one transformers 4.52-4.57 saved."""


def _language_model(hf_config: dict) -> Architecture | None:
    """The supported causal-LM architecture of a multimodal config's `text_config`, if any."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = hf_config.get("text_config")
    if "vision_config" not in hf_config or not isinstance(text, dict):
        return None
    return SUPPORTED.get(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text.get("model_type") or "", ""))


def _multimodal(name: str, text: Architecture, tensor_names: Iterable[str]) -> Architecture:
    """`text`, re-rooted at the checkpoint's language-model paths; vision tower and projector stay outside."""
    names = set(tensor_names)
    for decoder, lm_head in LANGUAGE_MODEL_PATHS:
        if any(n.startswith(f"{decoder}.{text.layers}.") for n in names):
            return dataclasses.replace(text, name=name, decoder=decoder, lm_head=lm_head, text=text)
    raise UnsupportedArchitecture(
        f"{name}: no language-model layers under {' or '.join(d + '.layers' for d, _ in LANGUAGE_MODEL_PATHS)} "
        "in the checkpoint; is it a complete Hugging Face checkpoint?"
    )


def architecture_of(hf_config: dict, tensor_names: Iterable[str] = ()) -> Architecture:
    """The Architecture for a config.json (and, for multimodal checkpoints, its tensor names), or one
    clear refusal listing what is supported."""
    names = hf_config.get("architectures") or []
    for name in names:
        if name in SUPPORTED:
            return SUPPORTED[name]
    text = _language_model(hf_config)
    if text is not None and names:
        return _multimodal(names[0], text, tensor_names)
    if "vision_config" in hf_config or "audio_config" in hf_config:
        text_type = (hf_config.get("text_config") or {}).get("model_type", "(none)")
        kind = (f"a multimodal model whose language model ({text_type!r}) is not one of the supported "
                "decoders; vision models are quantized through their language model only")
    elif any(hf_config.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        kind = "a mixture-of-experts model"
    elif hf_config.get("is_encoder_decoder"):
        kind = "an encoder-decoder model"
    else:
        kind = "not a decoder nvfp4_pp knows"
    raise UnsupportedArchitecture(
        f"architecture {names or '(none in config.json)'} is not supported ({kind}); nvfp4_pp quantizes "
        f"dense decoder-only text models ({', '.join(sorted(SUPPORTED))}) and image-text models built "
        "on one of them (their vision tower and projector stay BF16)"
    )
