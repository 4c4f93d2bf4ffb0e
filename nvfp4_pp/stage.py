"""One rank's slice of the model: embeddings (first rank), its decoder layers, nothing else.

The model skeleton is built on the meta device (no memory) from the checkpoint's own transformers
class (for an image-text checkpoint, its language model's causal-LM class), the stage keeps only its
own modules under their real global names (`model.layers.41...`, `language_model.model.layers.41...`),
and their tensors are streamed from the safetensors shards straight onto the stage's device.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .arch import FULL, SLIDING, Architecture
from .progress import Progress
from .source import SourceCheckpoint

MASKS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
"""The mask builder each attention type uses in the transformers decoders' own forward."""


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Place `module` at dotted `path` under `root`, creating empty parents, so names stay global."""
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, module)


class Stage(nn.Module):
    """Decoder layers [start, stop) (+ embeddings on the first stage), run as the full model would."""

    def __init__(self, hf_config, arch: Architecture, decoder: nn.Module, start: int, stop: int):
        super().__init__()
        self.hf_config, self.arch, self.start, self.stop = hf_config, arch, start, stop
        self.layer_types = arch.layer_types(hf_config)
        if start == 0:
            _attach(self, f"{arch.decoder}.{arch.embeddings}", decoder.get_submodule(arch.embeddings))
        layers = decoder.get_submodule(arch.layers)
        # ModuleDict keyed by the global index keeps real names: model.layers.41.self_attn...
        _attach(self, f"{arch.decoder}.{arch.layers}", nn.ModuleDict({str(i): layers[i] for i in range(start, stop)}))
        # Rotary tables are non-persistent buffers: not in the checkpoint, nor in state_dict().
        _attach(self, f"{arch.decoder}.{arch.rotary}", decoder.get_submodule(arch.rotary))

    @property
    def is_first(self) -> bool:
        return self.start == 0

    def _part(self, name: str) -> nn.Module:
        return self.get_submodule(f"{self.arch.decoder}.{name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in, hidden states after this stage's layers out."""
        hidden = self._part(self.arch.embeddings)(x) if self.is_first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        types = {self.layer_types[i] for i in range(self.start, self.stop)}
        masks = {
            t: MASKS[t](config=self.hf_config, inputs_embeds=hidden, attention_mask=None,
                        past_key_values=None, position_ids=position_ids)
            for t in types
        }
        rotary = self._part(self.arch.rotary)
        if self.arch.rope_per_layer_type:
            rope = {t: rotary(hidden, position_ids, t) for t in types}
        else:
            shared = rotary(hidden, position_ids)
            rope = {t: shared for t in types}
        for index, layer in self._part(self.arch.layers).items():
            kind = self.layer_types[int(index)]  # the global layer's type, not its place in the stage
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids,
                           position_embeddings=rope[kind])
        return hidden


def load_hf_config(source: SourceCheckpoint, arch: Architecture):
    """The language model's transformers config (an image-text checkpoint's `text_config`)."""
    config = AutoConfig.from_pretrained(source.path).get_text_config()
    config._attn_implementation = arch.attn_implementation
    return config


def _materialize_non_persistent_buffers(stage: nn.Module, skeleton, device: torch.device) -> None:
    """Compute rotary tables, embedding scales, ... as from_pretrained does: the model class's own init.

    They are not stored in checkpoints; transformers allocates them and runs the model's
    `_init_weights` on their modules. Parameters are still on meta here, so that init touches
    nothing else.
    """
    for module in stage.modules():
        names = [n for n in module._non_persistent_buffers_set if getattr(module, n, None) is not None]
        if not names:
            continue
        for name in names:
            setattr(module, name, torch.empty_like(getattr(module, name), device=device))
        skeleton._init_weights(module)


def build_stage(
    source: SourceCheckpoint, arch: Architecture, start: int, stop: int, device: torch.device
) -> Stage:
    """Build layers [start, stop) on `device`, reading only their tensors from disk."""
    hf_config = load_hf_config(source, arch)
    dtype = source.dtype  # FP8 weights are dequantised to it too
    model_class = getattr(transformers, arch.builder.name)
    with torch.device("meta"):
        skeleton = model_class._from_config(hf_config, dtype=dtype, attn_implementation=arch.attn_implementation)
    decoder = skeleton.get_submodule(arch.builder.decoder)
    stage = Stage(hf_config, arch, decoder, start, stop)
    _materialize_non_persistent_buffers(stage, skeleton, device)
    names = list(stage.state_dict().keys())
    progress = Progress("load", sum(source.nbytes(n) for n in names), "GB", scale=1e9)
    tensors = source.load(names, device, loaded=progress.advance)
    stage.load_state_dict(tensors, strict=True, assign=True)
    still_meta = [n for n, t in [*stage.named_parameters(), *stage.named_buffers()] if t.is_meta]
    assert not still_meta, f"stage tensors left unloaded: {still_meta[:3]}"
    return stage.eval()
