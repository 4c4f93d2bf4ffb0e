"""One rank's slice of the model: embeddings (first rank), its decoder layers, nothing else.

The model skeleton is built on the meta device (no memory), the stage keeps only its own
modules under their real global names (`model.layers.41...`), and their tensors are streamed
from the safetensors shards straight onto the stage's device.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from .arch import Architecture
from .source import SourceCheckpoint

ATTN_IMPLEMENTATION = "sdpa"


class Stage(nn.Module):
    """Decoder layers [start, stop) (+ embeddings on the first stage), run as the full model would."""

    def __init__(self, hf_config, arch: Architecture, decoder: nn.Module, start: int, stop: int):
        super().__init__()
        self.hf_config, self.start, self.stop = hf_config, start, stop
        body = nn.Module()
        if start == 0:
            body.embed_tokens = decoder.embed_tokens
        # ModuleDict keyed by the global index keeps real names: model.layers.41.self_attn...
        body.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in range(start, stop)})
        self.add_module(arch.decoder, body)
        self._decoder_name = arch.decoder
        self.rotary_emb: nn.Module | None = None

    @property
    def body(self) -> nn.Module:
        return self.get_submodule(self._decoder_name)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in, hidden states after this stage's layers out."""
        hidden = self.body.embed_tokens(x) if self.is_first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.hf_config,
            inputs_embeds=hidden,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.body.layers.values():
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
        return hidden


def load_hf_config(source: SourceCheckpoint):
    config = AutoConfig.from_pretrained(source.path)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def build_stage(
    source: SourceCheckpoint, arch: Architecture, start: int, stop: int, device: torch.device
) -> Stage:
    """Build layers [start, stop) on `device`, reading only their tensors from disk."""
    hf_config = load_hf_config(source)
    dtype = getattr(hf_config, "dtype", None) or torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    decoder = skeleton.get_submodule(arch.decoder)
    stage = Stage(hf_config, arch, decoder, start, stop)
    names = list(stage.state_dict().keys())
    tensors = source.load(names, device)
    stage.load_state_dict(tensors, strict=True, assign=True)
    # Rotary tables are non-persistent buffers: compute them as the model's own __init__ does.
    stage.rotary_emb = type(decoder.rotary_emb)(config=hf_config).to(device)
    still_meta = [n for n, t in stage.named_parameters() if t.is_meta]
    assert not still_meta, f"stage tensors left unloaded: {still_meta[:3]}"
    return stage.eval()
