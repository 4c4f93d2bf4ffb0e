"""One rank's slice of the model: embeddings (first rank), its decoder layers, nothing else.

The model skeleton is built on the meta device (no memory) from the checkpoint's own transformers
class (for an image-text checkpoint, its language model's causal-LM class), the stage keeps only its
own modules under their real global names (`model.layers.41...`, `language_model.model.layers.41...`),
and their tensors are streamed from the safetensors shards straight onto the stage's device.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, cast

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from nvfp4_pp.model.arch import FULL, SLIDING, Architecture
from nvfp4_pp.progress import Progress
from nvfp4_pp.model.source import SourceCheckpoint

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

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


@dataclasses.dataclass(frozen=True, slots=True)
class LayerContext:
    """What every decoder layer of a stage needs beside the hidden states, for one micro-batch."""

    position_ids: torch.Tensor
    masks: dict[str, torch.Tensor | BlockMask | None]
    """Attention type -> causal mask (None where the attention kernel builds it itself; a BlockMask
    for flex attention)."""
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Attention type -> rotary (cos, sin)."""


class Stage(nn.Module):
    """Decoder layers [start, stop) (+ embeddings on the first stage), run as the full model would."""

    def __init__(self, hf_config, arch: Architecture, decoder: nn.Module, start: int, stop: int):
        super().__init__()
        self.hf_config, self.arch, self.start, self.stop = hf_config, arch, start, stop
        self.layer_types = arch.layer_types(hf_config)
        if start == 0:
            _attach(self, f"{arch.decoder}.{arch.embeddings}", decoder.get_submodule(arch.embeddings))
        layers = cast(nn.ModuleList, decoder.get_submodule(arch.layers))
        # ModuleDict keyed by the global index keeps real names: model.layers.41.self_attn...
        _attach(self, f"{arch.decoder}.{arch.layers}", nn.ModuleDict({str(i): layers[i] for i in range(start, stop)}))
        # Rotary tables are non-persistent buffers: not in the checkpoint, nor in state_dict().
        _attach(self, f"{arch.decoder}.{arch.rotary}", decoder.get_submodule(arch.rotary))

    @property
    def is_first(self) -> bool:
        return self.start == 0

    def _part(self, name: str) -> nn.Module:
        return self.get_submodule(f"{self.arch.decoder}.{name}")

    def layer_prefix(self, index: int) -> str:
        """Global module name of decoder layer `index` (`model.layers.41`)."""
        return f"{self.arch.decoder}.{self.arch.layers}.{index}"

    def layer_prefixes(self) -> list[str]:
        return [f"{self.layer_prefix(index)}." for index in range(self.start, self.stop)]

    def layers(self) -> list[tuple[int, nn.Module]]:
        """(global index, decoder layer) of this stage, in order."""
        return [(int(i), layer) for i, layer in cast(nn.ModuleDict, self._part(self.arch.layers)).items()]

    def replace_layer(self, index: int, layer: nn.Module) -> None:
        """Decoder layer `index` (global) replaced by another fitted copy of it (`auto`'s guard)."""
        cast(nn.ModuleDict, self._part(self.arch.layers))[str(index)] = layer

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The first stage's token embeddings: the first decoder layer's input."""
        return self._part(self.arch.embeddings)(ids)

    def context(self, hidden: torch.Tensor) -> LayerContext:
        """Positions, causal masks and rotary tables for a micro-batch, built as the model's own forward
        builds them (one mask and one rotary table per attention type of this stage's layers)."""
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
        return LayerContext(position_ids, masks, rope)

    def run_layer(self, index: int, layer: nn.Module, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """Decoder layer `index` (global) on `hidden`, with its attention type's mask and rotary table.

        No KV cache is passed: every call is a fresh prefill, so replaying a layer's inputs several
        times (layer-by-layer calibration) gives the same outputs each time.
        """
        kind = self.layer_types[index]  # the global layer's type, not its place in the stage
        return layer(hidden, attention_mask=context.masks[kind], position_ids=context.position_ids,
                     position_embeddings=context.rope[kind])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or hidden states in, hidden states after this stage's layers out."""
        hidden = self.embed(x) if self.is_first else x
        context = self.context(hidden)
        for index, layer in self.layers():
            hidden = self.run_layer(index, layer, hidden, context)
        return hidden


def drop_weights(layer: nn.Module) -> None:
    """A decoder layer's parameters back to the meta device (its buffers, quantizer state included, stay):
    once its weights are exported (or handed to the exporter) the stage no longer holds them."""
    for module in layer.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def load_hf_config(source: SourceCheckpoint, arch: Architecture):
    """The language model's transformers config (an image-text checkpoint's `text_config`)."""
    config = AutoConfig.from_pretrained(source.path).get_text_config()
    config._attn_implementation = arch.attn_implementation
    return config


def model_skeleton(hf_config, arch: Architecture, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The checkpoint's transformers model class on the meta device: module tree, no memory."""
    model_class = getattr(transformers, arch.builder.name)
    with torch.device("meta"):
        return model_class._from_config(hf_config, dtype=dtype, attn_implementation=arch.attn_implementation)


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
    source: SourceCheckpoint, arch: Architecture, start: int, stop: int, device: torch.device,
    streaming: bool = False,
) -> Stage:
    """Build layers [start, stop) on `device`, reading only their tensors from disk.

    `streaming`: the decoder layers' tensors stay on the meta device (no memory); `streaming.LayerStream`
    brings each layer in when it is calibrated and frees it once it is written.
    """
    hf_config = load_hf_config(source, arch)
    skeleton = model_skeleton(hf_config, arch, source.dtype)  # FP8 weights are dequantised to it too
    decoder = skeleton.get_submodule(arch.builder.decoder)
    stage = Stage(hf_config, arch, decoder, start, stop)
    _materialize_non_persistent_buffers(stage, skeleton, device)
    names = list(stage.state_dict().keys())
    if streaming:
        names = [n for n in names if not any(n.startswith(p) for p in stage.layer_prefixes())]
    progress = Progress("load", sum(source.nbytes(n) for n in names), "GB", scale=1e9)
    stage.load_state_dict(source.load(names, device, loaded=progress.advance), strict=False, assign=True)
    still_meta = [n for n, t in [*stage.named_parameters(), *stage.named_buffers()]
                  if t.is_meta and not (streaming and any(n.startswith(p) for p in stage.layer_prefixes()))]
    assert not still_meta, f"stage tensors left unloaded: {still_meta[:3]}"
    return stage.eval()
