"""Validation loss of a training run's checkpoint on a Megatron ``.bin/.idx`` dataset.

Mean next-token cross-entropy over the first ``max_windows`` windows of a validation dataset
(same windowing as training, file order), with the model of :mod:`titanenv.train.model`. A
model trained with document-masked FlexAttention is scored without the document mask (and
with window-based RoPE positions), which may shift its loss slightly.

:func:`loss_by_position` splits the same mean by the position of the predicted token in its
window (``buckets`` equal ranges of ``[0, seq_len)``): with Infini-attention, later segments
should gain from the memory of the earlier ones. :func:`write_loss_by_position` writes
``OUT/loss_by_position.json``, ``{"seq_len": int, "buckets": [[lo, hi], ...] (hi exclusive),
"loss": [float per bucket, nats/token], "tokens": [int per bucket], "windows": int}``, and the
plot ``OUT/loss_by_position.png``. The token-weighted mean of ``loss`` is the validation loss of
the same windows.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from titanenv import atomic
from titanenv.train import checkpoints
from titanenv.train.model import RunRecord, load_model

__all__ = [
    "EVAL_FILE",
    "POSITION_FILE",
    "POSITION_PLOT",
    "EvalResult",
    "PositionLoss",
    "evaluate",
    "loss_by_position",
    "validation_loss",
    "write_loss_by_position",
]

EVAL_FILE = "eval.json"
POSITION_FILE, POSITION_PLOT = "loss_by_position.json", "loss_by_position.png"


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
    total, count, n = 0.0, 0, 0
    for inputs, labels in _batches(data, seq_len, max_windows, batch_size):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
        total += float(loss)
        count += labels.numel()
        n += len(labels)
    return total / count, count, n


@dataclass(frozen=True)
class PositionLoss:
    """Outcome of :func:`loss_by_position`; the fields of ``loss_by_position.json`` (module docstring)."""

    seq_len: int
    buckets: list[tuple[int, int]]
    """``[lo, hi)`` window positions (of the predicted token's input) per bucket."""
    loss: list[float]
    """Mean next-token cross-entropy per bucket, nats/token."""
    tokens: list[int]
    """Tokens scored per bucket."""
    windows: int


@torch.no_grad()
def loss_by_position(
    model: torch.nn.Module,
    data: str | os.PathLike[str],
    seq_len: int,
    *,
    buckets: int = 8,
    max_windows: int = 64,
    batch_size: int = 4,
) -> PositionLoss:
    """Mean next-token cross-entropy per position bucket over the windows of :func:`validation_loss`.

    Bucket ``i`` holds positions ``[i * seq_len // buckets, (i + 1) * seq_len // buckets)``.

    Raises:
        ValueError: ``buckets`` outside ``1..seq_len``, or ``data`` has no full window.
        FileNotFoundError: if ``data.bin``/``data.idx`` is missing.
    """
    if not 1 <= buckets <= seq_len:
        raise ValueError(f"--by-position {buckets}: must be in 1..{seq_len} (seq_len, one position a bucket)")
    per_position = torch.zeros(seq_len, dtype=torch.float64)
    n = 0
    for inputs, labels in _batches(data, seq_len, max_windows, batch_size):
        logits = model(inputs).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [B, L]
        per_position += loss.double().sum(0)
        n += len(labels)
    edges = [i * seq_len // buckets for i in range(buckets + 1)]
    ranges = list(zip(edges[:-1], edges[1:], strict=True))
    sums = [float(per_position[lo:hi].sum()) for lo, hi in ranges]
    tokens = [(hi - lo) * n for lo, hi in ranges]
    return PositionLoss(seq_len, ranges, [s / t for s, t in zip(sums, tokens, strict=True)], tokens, n)


def write_loss_by_position(result: PositionLoss, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``OUT/loss_by_position.json`` and ``OUT/loss_by_position.png``, atomically.

    Returns:
        ``(json path, png path)``.
    """
    out = Path(out)
    record = asdict(result) | {"buckets": [list(b) for b in result.buckets]}
    return atomic.write_json(out / POSITION_FILE, record), atomic.write_bytes(out / POSITION_PLOT, _plot(result))


def _batches(
    data: str | os.PathLike[str], seq_len: int, max_windows: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, labels)``, each ``int64[B, seq_len]``, of the first ``max_windows`` training windows."""
    from titanenv.train.dataloader import TokenWindowDataset

    ds = TokenWindowDataset(data, seq_len, shuffle=False)
    n = min(max_windows, ds.windows_per_rank)
    for start in range(0, n, batch_size):
        samples = [ds.window(i) for i in range(start, min(n, start + batch_size))]
        yield torch.stack([s[0]["input"] for s in samples]), torch.stack([s[1] for s in samples])


def _plot(result: PositionLoss) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on compute nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([(lo + hi - 1) / 2 for lo, hi in result.buckets], result.loss, marker="o")
    ax.set_xlabel(f"position in the window (of {result.seq_len})")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"validation loss by position, {result.windows} windows", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


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
