"""The model's vocabulary, agreed on by config.json, the embedding rows and the tokenizer.

Read from the safetensors headers (no weight is loaded) on the first rank, before calibration:
a token id past the embedding rows would otherwise surface deep in the first stage as an
IndexError (a device-side assert on GPU), and a config that disagrees with its weights as a
size-mismatch traceback.
"""

from __future__ import annotations

from nvfp4_pp.model.arch import Architecture
from nvfp4_pp.errors import NvFp4PpError
from nvfp4_pp.model.source import SourceCheckpoint
from nvfp4_pp.data.samples import Tokenizer


class VocabularyError(NvFp4PpError):
    """config.json, the embeddings and the tokenizer disagree on the vocabulary size."""


def check_vocabulary(source: SourceCheckpoint, arch: Architecture, tokenizer: Tokenizer) -> int:
    """The number of token ids the model embeds (its embedding rows), after checking that config.json's
    vocab_size, the lm_head and the tokenizer fit it."""
    embedding = f"{arch.decoder}.{arch.embeddings}.weight"
    rows = source.shape(embedding)[0]
    where = f"{embedding} in {source.path / source.weight_map[embedding]}"
    config_vocab = source.text_config.get("vocab_size")
    if config_vocab is not None and config_vocab != rows:
        raise VocabularyError(
            f"{source.path / 'config.json'}: vocab_size is {config_vocab} but {where} has {rows} rows; the config "
            "does not describe these weights: set vocab_size to the embedding rows (or use the config of this checkpoint)")
    head = f"{arch.lm_head}.weight"
    if head in source.weight_map and source.shape(head)[0] != rows:
        raise VocabularyError(f"{head} in {source.path / source.weight_map[head]} has {source.shape(head)[0]} rows but "
                              f"{where} has {rows}; the checkpoint is inconsistent: download it again")
    ids = tokenizer.ids
    beyond = sum(1 for i in ids if i >= rows)
    if beyond:
        raise VocabularyError(
            f"the tokenizer in {tokenizer.directory} has token ids up to {max(ids)} ({beyond} beyond the embeddings) "
            f"but {where} has {rows} rows (ids 0..{rows - 1}); resize the model's embeddings to the tokenizer "
            "(resize_token_embeddings) or use the tokenizer the model was trained with")
    return rows
