"""``titanenv finetune``: typer command function (see :mod:`titanenv.finetune`)."""

from __future__ import annotations

import shlex

import typer

from titanenv.finetune import FinetuneArgs, FinetuneError, check_data, resolve
from titanenv.train import settings
from titanenv.train.cli import launch
from titanenv.train.settings import SubmitArgs

__all__ = ["finetune"]


def _finetune(args: FinetuneArgs, opts: SubmitArgs) -> None:
    """LoRA fine-tune of a Hugging Face Llama (or a titanenv run) on --data or --sft, offline.

    Checks the base model's config.json against the recipe (naming any differing field), the data
    (an SFT file line by line) and the LoRA settings before anything starts, then runs exactly as
    `titanenv train`: torchrun here, or --submit for the same sbatch script (the job requeues at
    the time limit and resumes). Only the LoRA adapters train; the run fails at start-up otherwise
    and logs the trainable and frozen parameter counts. Then: `titanenv export RUN` writes the
    adapter in PEFT's format (--merge: the full model) and `titanenv eval --model` scores it.
    """
    try:
        examples = check_data(args)
        resolved = resolve(args)
    except FinetuneError as e:
        raise typer.BadParameter(e.message, param_hint=e.flag) from None
    if examples is not None:
        typer.echo(f"--sft {resolved.sft}: {examples:,} examples", err=True)
    typer.echo(f"fine-tune: base {resolved.base}, recipe {resolved.recipe}, vocabulary {resolved.vocab_size}", err=True)
    if opts.dry_run and not opts.submit:
        typer.echo(f"# titanenv finetune {shlex.join(resolved.argv())}", err=True)
    launch(resolved, opts, command="finetune")


finetune = settings.command(_finetune, FinetuneArgs, SubmitArgs)
"""``titanenv finetune``: the options of :class:`~titanenv.finetune.FinetuneArgs` and
:class:`~titanenv.train.settings.SubmitArgs`; callable from Python with the same keyword arguments
(``finetune(base=..., sft=..., output_dir=...)``)."""
