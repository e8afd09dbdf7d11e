"""``titanenv export``: typer command function (a run's checkpoint as a Hugging Face folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["export"]


def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of `titanenv train` (trainer_config.json, checkpoint/).")],
    step: Annotated[int | None, typer.Option(help="Checkpoint step. Default: the newest complete one.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder to write: missing, empty, or an earlier export of this run (then replaced). "
            "Default: RUN_DIR/export/step-N, as --export-at-end and the eval matrix use."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Weight dtype written: float32 or bfloat16.")] = "float32",
) -> None:
    """Export a checkpoint as a Hugging Face LlamaForCausalLM folder (safetensors, config, tokenizer, README).

    Loads the DCP checkpoint on CPU (one process), renames the weights with TorchTitan's
    Llama3StateDictAdapter, refusing if any state would be dropped, and writes the folder
    atomically (a temporary sibling renamed into place). The tokenizer adds no BOS: titanenv's
    data has none, only the EOD token between documents.
    """
    # Imported here: torch and torchtitan are slow to import, and other `titanenv` commands do not need them.
    from titanenv import export as ex

    if dtype not in ex.DTYPES:
        raise typer.BadParameter(f"{dtype!r}: choose one of {', '.join(ex.DTYPES)}", param_hint="--dtype")
    if out is None:
        chosen, _ = ex.resolve_checkpoint(run_dir, step)
        step, out = chosen, ex.export_dir(run_dir, chosen, dtype)
    result = ex.export_run(run_dir, out, step=step, dtype=dtype)
    cfg = result.config
    typer.echo(
        f"exported {result.checkpoint} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocabulary {cfg['vocab_size']}, {result.parameters:,} parameters, {result.dtype}) "
        f"in {result.seconds:.1f} s{' (replaced the earlier export)' if result.replaced else ''}:"
    )
    for name, size in result.files.items():
        typer.echo(f"  {result.out / name}  {size:,} bytes")
    typer.echo(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
