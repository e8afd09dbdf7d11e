"""Text continuation with a run's model (greedy; no KV cache)."""

from __future__ import annotations

import os

import torch

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: str | os.PathLike[str],
    prompt: str,
    *,
    max_new_tokens: int = 32,
    context: int = 512,
    stop_at_eod: bool = True,
) -> str:
    """Greedy continuation of ``prompt`` (no KV cache: fine for small models and short texts).

    Args:
        model: from :func:`load_model`.
        tokenizer: ``tokenizer.json`` or a folder holding it.
        prompt: text to continue.
        max_new_tokens: upper bound on generated tokens.
        context: keep at most this many trailing tokens as model input (<= training seq_len).
        stop_at_eod: stop at the tokenizer's end-of-document token (same rule as preprocessing).

    Returns:
        The generated text only (without the prompt).

    Raises:
        FileNotFoundError: if there is no tokenizer at ``tokenizer``.
    """
    from titanenv.data import tokenizer as toklib

    info = toklib.load(tokenizer)
    tok = info.tokenizer
    eod = info.eod_id if stop_at_eod else None
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = tok.encode(prompt, add_special_tokens=False).ids  # as preprocessing encodes documents
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = (ids + new)[-context:]
        logits = model(torch.tensor([window], dtype=torch.int64))
        nxt = int(logits[0, -1, :vocab].argmax())  # padded vocabulary rows are never real tokens
        if nxt == eod:
            break
        new.append(nxt)
    return tok.decode(new)
