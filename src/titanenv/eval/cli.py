"""``titanenv eval``: typer command function (validation loss of a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from titanenv.data.indexed import bin_path, idx_path

__all__ = ["evaluate"]


def evaluate(
    output_dir: Annotated[
        Path, typer.Option(help="Run folder of `titanenv train` (holds trainer_config.json and checkpoint/).")
    ],
    data: Annotated[
        Path, typer.Option(help="Validation dataset prefix (PREFIX.bin/PREFIX.idx), same tokenizer as training.")
    ],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="tokenizer.json or its folder, checked against the model and used for --prompt. "
            "Default: the run's copy in OUTPUT_DIR/tokenizer."
        ),
    ] = None,
    max_windows: Annotated[
        int, typer.Option(help="Score at most this many windows of seq_len tokens (file order).")
    ] = 64,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    step: Annotated[int | None, typer.Option(help="Checkpoint step to load. Default: the latest complete one.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Also print a greedy continuation of this text.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate for --prompt.")] = 32,
) -> None:
    """Validation loss and perplexity of a trained checkpoint (CPU, single process).

    Rebuilds the model from the run's recipe, loads the latest complete DCP checkpoint,
    scores the validation windows, prints loss (nats/token) and perplexity, and writes
    them to OUTPUT_DIR/eval.json (atomically).
    """
    from titanenv import eval as ev
    from titanenv.data import tokenizer as toklib

    for p in (bin_path(data), idx_path(data)):
        if not p.is_file():
            raise typer.BadParameter(
                f"{p}: no such file; tokenize the validation text with `titanenv preprocess`", param_hint="--data"
            )
    run = ev.read_run_record(output_dir)
    tokenizer = tokenizer or run.tokenizer_dir
    tok_vocab = toklib.load(tokenizer).vocab_size
    if tok_vocab > run.vocab_size:
        raise typer.BadParameter(
            f"{tokenizer} has {tok_vocab} tokens but the model in {output_dir} has {run.vocab_size}; "
            "pass the tokenizer the run was trained with",
            param_hint="--tokenizer",
        )
    loaded = ev.load_model(output_dir, step=step)  # once: scored, then continued from with --prompt
    result = ev.evaluate(output_dir, data, max_windows=max_windows, batch_size=batch_size, loaded=loaded)
    typer.echo(
        f"step {result.step}: val loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
        f"({result.tokens:,} tokens in {result.windows} windows) -> {Path(output_dir) / ev.EVAL_FILE}"
    )
    if prompt is not None:
        text = ev.generate(loaded[0], tokenizer, prompt, max_new_tokens=max_new_tokens, context=run.seq_len)
        typer.echo(f"{prompt}{text}")
