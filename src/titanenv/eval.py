"""Validation loss (and greedy generation) from a titanenv/TorchTitan training output folder.

Single process, CPU, no torch.distributed: the model is rebuilt from the same recipe
(:mod:`titanenv.train.recipes`) with the vocabulary and sequence length the run
recorded in ``OUTPUT/trainer_config.json``, its weights are read from the latest
complete DCP checkpoint ``OUTPUT/checkpoint/step-N`` (complete = titanenv's completion
marker, see :mod:`titanenv.train.checkpoints`), and mean next-token cross-entropy is computed
over the first ``max_windows`` windows of a validation ``.bin/.idx`` (same windowing
as training, file order). Attention is plain causal SDPA here, as in CPU training; a
model trained with document-masked FlexAttention is scored without the document
mask (and with window-based RoPE positions), which may shift its loss slightly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from titanenv.train import checkpoints

__all__ = [
    "EvalResult",
    "RunRecord",
    "evaluate",
    "generate",
    "latest_checkpoint",
    "load_model",
    "read_run_record",
    "validation_loss",
]

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class RunRecord:
    """What evaluation needs to know about a training run.

    Attributes:
        recipe: config function name in :mod:`titanenv.train.recipes`.
        vocab_size: model vocabulary (rows of the embedding).
        seq_len: training sequence length in tokens (RoPE cache size).
        tokenizer_dir: folder with ``tokenizer.json``.
    """

    recipe: str
    vocab_size: int
    seq_len: int
    tokenizer_dir: Path


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


def read_run_record(output_dir: str | os.PathLike) -> RunRecord:
    """Read ``OUTPUT/trainer_config.json`` (written by rank 0 of a titanenv recipe run).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it lacks the recipe name (not a titanenv recipe run).
    """
    from titanenv.train.recipes import CONFIG_RECORD

    path = Path(output_dir) / CONFIG_RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no training record; is {output_dir} the --output-dir of `titanenv train`? "
            f"(plain torchtitan runs need --debug.save-config-file {CONFIG_RECORD})"
        )
    cfg = json.loads(path.read_text())
    if not cfg.get("recipe"):
        raise ValueError(f"{path}: no 'recipe' entry; the run did not use a titanenv.train.recipes config")
    return RunRecord(
        recipe=cfg["recipe"],
        vocab_size=int(cfg["vocab_size"]),
        seq_len=int(cfg["training"]["seq_len"]),
        tokenizer_dir=Path(cfg["hf_assets_path"]),
    )


def latest_checkpoint(output_dir: str | os.PathLike, folder: str = "checkpoint") -> tuple[int, Path]:
    """Newest ``step-N`` under ``OUTPUT/folder`` that is complete (has titanenv's completion marker).

    Returns:
        ``(N, path)``.

    Raises:
        FileNotFoundError: if there is none.
    """
    root = Path(output_dir) / folder
    decision = checkpoints.choose_resume(root)
    if decision.path is None:
        raise FileNotFoundError(
            f"{root}: no complete checkpoint (step-N/{checkpoints.MARKER}); train first with `titanenv train`"
        )
    return decision.step, decision.path


def load_model(
    output_dir: str | os.PathLike, *, step: int | None = None
) -> tuple[torch.nn.Module, RunRecord, int, Path]:
    """Rebuild the run's model on CPU and load checkpoint weights (latest, or ``step``).

    Returns:
        ``(model in eval mode, run record, step, checkpoint path)``. The model maps
        ``int64[B, L]`` token ids to ``float32[B, L, vocab_size]`` logits, ``L <= seq_len``.

    Raises:
        FileNotFoundError: if the record or the checkpoint is missing.
    """
    import torch.distributed.checkpoint as dcp

    from titanenv.train.recipes import load_recipe, set_vocab_size, use_causal_sdpa

    run = read_run_record(output_dir)
    if step is None:
        step, ckpt = latest_checkpoint(output_dir)
    else:
        ckpt = Path(output_dir) / "checkpoint" / f"step-{step}"
        state = next((s for s in checkpoints.scan(ckpt.parent) if s.step == step), None)
        if state is None or not state.complete:
            reason = state.reason if state else "no such folder"
            raise FileNotFoundError(f"{ckpt}: not a complete checkpoint ({reason})")
    config = load_recipe(run.recipe)
    set_vocab_size(config, run.vocab_size)
    config.training.seq_len = run.seq_len
    use_causal_sdpa(config.model_spec)  # FlexAttention has no CPU path worth using here
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)  # buffers (RoPE cache) are not in the checkpoint
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(ckpt))  # reads only the model keys; DTensor shards are gathered
    model.load_state_dict(state)
    model.eval()
    return model, run, step, ckpt


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    data: str | os.PathLike,
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
    output_dir: str | os.PathLike,
    data: str | os.PathLike,
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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: str | os.PathLike,
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
