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
            "Default: RUN_DIR/export/step-N (step-N-adapter for a LoRA run's adapter), as --export-at-end "
            "and the eval matrix use."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Weight dtype written: float32 or bfloat16.")] = "float32",
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="LoRA runs: write the base model with the adapters merged in (a full model) instead of the "
            "PEFT adapter. Refused for a run without LoRA.",
        ),
    ] = False,
) -> None:
    """Export a checkpoint as a Hugging Face LlamaForCausalLM folder (safetensors, config, tokenizer, README).

    Loads the DCP checkpoint on CPU (one process), renames the weights with TorchTitan's
    Llama3StateDictAdapter, refusing if any state would be dropped, and writes the folder
    atomically (a temporary sibling renamed into place). The tokenizer adds no BOS: titanenv's
    data has none, only the EOD token between documents. A LoRA run gives a PEFT adapter of its
    base model (adapter_config.json, adapter_model.safetensors), or with --merge the merged model.
    """
    # Imported here: torch and torchtitan are slow to import, and other `titanenv` commands do not need them.
    from titanenv import export as ex
    from titanenv.export.folder import export_kind

    if dtype not in ex.DTYPES:
        raise typer.BadParameter(f"{dtype!r}: choose one of {', '.join(ex.DTYPES)}", param_hint="--dtype")
    try:
        kind = export_kind(run_dir, merge)
    except ValueError as e:
        if not merge:
            raise
        raise typer.BadParameter(str(e), param_hint="--merge") from None
    if out is None:
        chosen, _ = ex.resolve_checkpoint(run_dir, step)
        step, out = chosen, ex.export_dir(run_dir, chosen, dtype, kind)
    result = ex.export_run(run_dir, out, step=step, dtype=dtype, merge=merge)
    cfg = result.config
    again = " (replaced the earlier export)" if result.replaced else ""
    if result.kind == "adapter":
        typer.echo(
            f"exported the LoRA adapter of {result.checkpoint} (r {cfg['r']}, alpha {cfg['lora_alpha']:g}, on "
            f"{', '.join(sorted(cfg['target_modules']))}; {result.parameters:,} parameters, {result.dtype}) "
            f"in {result.seconds:.1f} s{again}:"
        )
    else:
        merged = f", merged into base {result.base_model}" if result.kind == "merged" else ""
        typer.echo(
            f"exported {result.checkpoint} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"vocabulary {cfg['vocab_size']}, {result.parameters:,} parameters, {result.dtype}{merged}) "
            f"in {result.seconds:.1f} s{again}:"
        )
    for name, size in result.files.items():
        typer.echo(f"  {result.out / name}  {size:,} bytes")
    if result.kind == "adapter":
        typer.echo(
            "load it with peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
            f"{str(result.base_model)!r}), {str(result.out)!r}); or export --merge for a plain model"
        )
    else:
        typer.echo(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
