"""Validation loss of a training run's checkpoint on a Megatron ``.bin/.idx`` dataset.

Mean next-token cross-entropy over the first ``max_windows`` windows of a validation dataset
(same windowing as training, file order), with the model of :mod:`titanenv.train.model`. A
model trained with document-masked FlexAttention is scored without the document mask (and
with window-based RoPE positions), which may shift its loss slightly.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from titanenv.train import checkpoints
from titanenv.train.model import RunRecord, load_model

__all__ = ["EVAL_FILE", "EvalResult", "evaluate", "validation_loss"]

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`; ``loss`` in nats per token, ``perplexity = exp(loss)``."""

    output_dir: str
    checkpoint: str
    step: int
    data: str
    recipe: str
    seq_len: int
    vocab_size: int
    windows: int
    tokens: int
    loss: float
    perplexity: float


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    data: str | os.PathLike[str],
    seq_len: int,
    *,
    max_windows: int = 64,
    batch_size: int = 4,
) -> tuple[float, int, int]:
    """Mean next-token cross-entropy over the first ``max_windows`` windows of ``data``.

    Windows are those of training (``seq_len + 1`` tokens, file order).

    Returns:
        ``(loss in nats/token, tokens scored, windows scored)``.

    Raises:
        FileNotFoundError: if ``data.bin``/``data.idx`` is missing.
        ValueError: if ``data`` has no full window.
    """
    from titanenv.train.dataloader import TokenWindowDataset

    ds = TokenWindowDataset(data, seq_len, shuffle=False)
    n = min(max_windows, ds.windows_per_rank)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        samples = [ds.window(i) for i in range(start, min(n, start + batch_size))]
        inputs = torch.stack([s[0]["input"] for s in samples])
        labels = torch.stack([s[1] for s in samples])
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        total += float(loss)
        count += labels.numel()
    return total / count, count, n


def evaluate(
    output_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    max_windows: int = 64,
    batch_size: int = 4,
    step: int | None = None,
    loaded: tuple[torch.nn.Module, RunRecord, int, Path] | None = None,
) -> EvalResult:
    """Validation loss of the latest (or ``step``) checkpoint in ``output_dir``; writes ``OUTPUT/eval.json``.

    ``loaded``: what :func:`load_model` returned for ``output_dir``, to score a model already
    loaded (``step`` is then ignored); default: load it here.

    Raises:
        FileNotFoundError: missing record, checkpoint or data (the message names the path).
    """
    model, run, step, ckpt = loaded or load_model(output_dir, step=step)
    loss, tokens, windows = validation_loss(model, data, run.seq_len, max_windows=max_windows, batch_size=batch_size)
    result = EvalResult(
        output_dir=str(output_dir),
        checkpoint=str(ckpt),
        step=step,
        data=str(data),
        recipe=run.recipe,
        seq_len=run.seq_len,
        vocab_size=run.vocab_size,
        windows=windows,
        tokens=tokens,
        loss=loss,
        perplexity=math.exp(loss),
    )
    checkpoints.write_json_atomic(Path(output_dir) / EVAL_FILE, asdict(result))
    return result
