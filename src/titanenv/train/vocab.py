"""The model vocabulary follows the tokenizer: read its size, pad it, resize the model config."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.models.llama3.model import Llama3Model
from torchtitan.trainer import Trainer

__all__ = ["VOCAB_MULTIPLE", "padded_vocab_size", "set_vocab_size", "tokenizer_vocab_size"]

VOCAB_MULTIPLE = 64
"""Model vocabularies are padded up to a multiple of this (tensor-core friendly)."""


def tokenizer_vocab_size(tokenizer_dir: str | os.PathLike[str]) -> int:
    """Vocabulary size, added tokens included, of ``tokenizer_dir/tokenizer.json``.

    Raises:
        FileNotFoundError: if the file is missing.
    """
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer; pass --hf-assets-path DIR with DIR/tokenizer.json "
            "(`titanenv train --tokenizer` copies a tokenizer.json into OUTPUT/tokenizer/)"
        )
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def padded_vocab_size(vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab`` rounded up to a multiple of ``multiple`` (50257 -> 50304, 2020 -> 2048)."""
    return -(-vocab // multiple) * multiple


def set_vocab_size(config: Trainer.Config, vocab_size: int) -> None:
    """Resize the model's embedding, output layer and loss to ``vocab_size`` rows, in place."""
    model = config.model_spec.model
    if not isinstance(model, Llama3Model.Config):
        raise TypeError(f"titanenv recipes build Llama3 models; got {type(model).__name__}")
    model.vocab_size = vocab_size
    model.tok_embeddings.num_embeddings = vocab_size
    model.lm_head.out_features = vocab_size
    for _, loss_cfg, _, _ in config.loss.traverse(CrossEntropyLoss.Config):
        loss_cfg.global_vocab_size = vocab_size
