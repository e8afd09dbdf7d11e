"""``titanenv eval``: typer command functions (the lm-eval matrix; validation loss of a run with --data;
passkey retrieval with --passkey)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from titanenv.data.indexed import bin_path, idx_path

if TYPE_CHECKING:
    import torch

__all__ = ["evaluate", "generate"]

TASKS_NOT_OFFLINE = 2
"""Exit code when a task's data, metric or nltk package is not in the local caches."""


def evaluate(
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Run folder of `titanenv train` (holds trainer_config.json and checkpoint/); as --model."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Validation dataset prefix (PREFIX.bin/PREFIX.idx), same tokenizer as training: "
            "validation-loss mode instead of the lm-eval matrix."
        ),
    ] = None,
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
    batch_size: Annotated[int, typer.Option(help="Windows (--data) or lm-eval requests per forward pass.")] = 4,
    step: Annotated[int | None, typer.Option(help="Checkpoint step to load. Default: the latest complete one.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Also print a greedy continuation of this text.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate for --prompt.")] = 32,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            help="Run folder of `titanenv train` (exported on the fly), exported folder (RUN/export/step-N) "
            "or local Hugging Face folder (config.json); repeatable."
        ),
    ] = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="lm-eval tasks: T1,T2 | all (every task lm-eval knows) | @FILE (one name a line). "
            "Default: the bundled local tasks."
        ),
    ] = "titanenv_wikitext2,titanenv_next_sentence",
    num_fewshot: Annotated[str, typer.Option(help="Few-shot counts, e.g. 0,5.")] = "0",
    limit: Annotated[float | None, typer.Option(help="At most N documents per task (< 1: a fraction).")] = None,
    include_path: Annotated[
        list[Path] | None, typer.Option(help="Folder of custom task YAMLs (after the bundled ones); repeatable.")
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="Checkpoint steps of run folders, e.g. 10,20, or all (a series; plotted).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (lm-eval matrix).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16 (matrix and exports).")] = "float32",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder of the lm-eval matrix (default: RUN/eval for one run, else ./eval_results) "
            "or of --passkey (default: RUN/eval/passkey, else ./eval_results/passkey)."
        ),
    ] = None,
    by_position: Annotated[
        int | None,
        typer.Option(
            help="With --data: also the loss in N equal position buckets of the window "
            "(OUTPUT_DIR/loss_by_position.json and .png)."
        ),
    ] = None,
    passkey: Annotated[
        bool,
        typer.Option(
            "--passkey",
            help="Passkey retrieval mode: a 5-digit key hidden in filler text at several depths and lengths, "
            "greedy answers scored; writes passkey.json and passkey.png to --out.",
        ),
    ] = False,
    passkey_lengths: Annotated[
        str, typer.Option(help="Prompt lengths in tokens (those above the model's seq_len are skipped).")
    ] = "64,128,256",
    passkey_depths: Annotated[str, typer.Option(help="Needle depths in percent of the filler.")] = "0,25,50,75,100",
    passkey_trials: Annotated[int, typer.Option(help="Prompts (keys) per depth and length.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the pass keys (--passkey).")] = 0,
) -> None:
    """The lm-eval matrix (models x tasks x few-shot counts), offline; --data: validation loss; --passkey: retrieval.

    Matrix: checks that every task builds from the local caches before loading any model (a
    missing one exits 2 with its `titanenv assets fetch` line), loads each model once and writes
    the lm-eval JSON of each cell, results.csv, results.md and plots to --out.

    With --data: rebuilds the run's model from its recipe, loads the latest complete DCP
    checkpoint, scores the validation windows, prints loss (nats/token) and perplexity, and
    writes them to OUTPUT_DIR/eval.json (atomically); --by-position N adds the loss per position bucket.

    With --passkey: one run folder or Hugging Face folder answers the pass key of each (depth,
    length) cell --passkey-trials times; prints the accuracy table and writes passkey.json and
    passkey.png (depth x length heatmap) to --out.
    """
    from titanenv import eval as ev
    from titanenv.data import tokenizer as toklib
    from titanenv.eval.generate import generate as greedy_text

    passkey_options = dict(passkey_lengths=passkey_lengths, passkey_depths=passkey_depths,
                           passkey_trials=passkey_trials, seed=seed)  # fmt: skip
    if passkey:
        _not_in_mode("--passkey", data=data, prompt=prompt, tokenizer=tokenizer, max_windows=max_windows,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, tasks=tasks, num_fewshot=num_fewshot,
                     limit=limit, include_path=include_path, steps=steps, dtype=dtype,
                     by_position=by_position)  # fmt: skip
        models = [*([output_dir] if output_dir else []), *(model or [])]
        _passkey(models, step, device, out, passkey_lengths, passkey_depths, passkey_trials, seed)
        return
    if data is None:
        _not_in_mode("the lm-eval matrix (without --data)", prompt=prompt, tokenizer=tokenizer,
                     max_windows=max_windows, max_new_tokens=max_new_tokens, by_position=by_position,
                     **passkey_options)  # fmt: skip
        models = [*([output_dir] if output_dir else []), *(model or [])]
        _matrix(models, tasks, num_fewshot, limit, include_path or [], step, steps, batch_size, device, dtype, out)
        return
    _not_in_mode("--data (validation loss)", tasks=tasks, num_fewshot=num_fewshot, device=device, dtype=dtype,
                 limit=limit, include_path=include_path, steps=steps, out=out, **passkey_options)  # fmt: skip
    if output_dir is None:
        if not model or len(model) != 1:
            raise typer.BadParameter("--data scores one run folder: pass one --model (or --output-dir)")
        output_dir = model[0]
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
    if by_position is not None:
        _by_position(loaded[0], data, run.seq_len, by_position, max_windows, batch_size, output_dir)
    if prompt is not None:
        text = greedy_text(loaded[0], tokenizer, prompt, max_new_tokens=max_new_tokens, context=run.seq_len)
        typer.echo(f"{prompt}{text}")


def _by_position(
    net: torch.nn.Module, data: Path, seq_len: int, buckets: int, max_windows: int, batch_size: int, out: Path
) -> None:
    """``--data --by-position N``: the loss per position bucket, printed and written next to eval.json."""
    from titanenv.eval import loss

    try:
        result = loss.loss_by_position(net, data, seq_len, buckets=buckets, max_windows=max_windows,
                                       batch_size=batch_size)  # fmt: skip
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--by-position") from None
    paths = loss.write_loss_by_position(result, out)
    for (lo, hi), value in zip(result.buckets, result.loss, strict=True):
        typer.echo(f"  positions {lo:>6}-{hi - 1:<6} loss {value:.4f}")
    typer.echo(f"loss by position -> {paths[0]}, {paths[1]}")


def _passkey(
    models: list[Path],
    step: int | None,
    device: str,
    out: Path | None,
    lengths: str,
    depths: str,
    trials: int,
    seed: int,
) -> None:
    """``titanenv eval --passkey``: parse, run :func:`titanenv.eval.passkey.evaluate_passkey`, print."""
    from rich.console import Console
    from rich.table import Table

    from titanenv.eval import matrix, passkey
    from titanenv.eval.generate import ModelNotFound

    if len(models) != 1:
        raise typer.BadParameter("--passkey scores one model: pass one --model (or --output-dir)")
    err = Console(stderr=True)
    try:
        config = passkey.PasskeyConfig(
            lengths=tuple(matrix.parse_ints(lengths, "--passkey-lengths")),
            depths=tuple(matrix.parse_ints(depths, "--passkey-depths")),
            trials=trials, seed=seed,
        )  # fmt: skip
        result, paths = passkey.evaluate_passkey(
            models[0], config, step=step, device=device, out=out,
            progress=lambda line: err.print(f"[dim]passkey:[/dim] {line}", highlight=False),
        )  # fmt: skip
    except ModelNotFound as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    except (FileNotFoundError, ValueError) as e:  # a checkpoint step, --step with an HF folder, a grid setting
        raise typer.BadParameter(str(e)) from None
    table = Table(title=f"passkey accuracy ({result.trials} trials a cell)")
    table.add_column("depth", justify="right")
    for n in result.lengths:
        table.add_column(f"{n} tok", justify="right")
    for depth, row in zip(result.depths, result.accuracy, strict=True):
        table.add_row(f"{depth}%", *(f"{a:.2f}" for a in row))
    Console().print(table)
    if result.skipped_lengths:
        typer.echo(f"note: lengths {result.skipped_lengths} skipped: above the model's context")
    typer.echo(f"results: {paths[0]}; heatmap: {paths[1]}")


def _not_in_mode(mode: str, **given: object) -> None:
    """Reject an option the chosen mode would ignore: one set to other than its default."""
    defaults = inspect.signature(evaluate).parameters
    for name, value in given.items():
        if value not in (None, []) and value != defaults[name].default:
            option = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{option} does not apply to {mode}", param_hint=option)


def _matrix(
    models: list[Path],
    tasks: str,
    num_fewshot: str,
    limit: float | None,
    include_path: list[Path],
    step: int | None,
    steps: str | None,
    batch_size: int,
    device: str,
    dtype: str,
    out: Path | None,
) -> None:
    """``titanenv eval`` without --data: parse, run :func:`titanenv.eval.matrix.run_matrix`, print."""
    from rich.console import Console

    from titanenv.assets.spec import AssetListError
    from titanenv.eval import matrix, report

    console, err = Console(), Console(stderr=True)
    try:
        config = matrix.MatrixConfig(
            models=models, tasks=matrix.parse_tasks(tasks), num_fewshot=matrix.parse_ints(num_fewshot, "--num-fewshot"),
            limit=limit, include_path=include_path, step=step, steps=matrix.parse_steps(steps) if steps else None,
            batch_size=batch_size, device=device, dtype=dtype, out=out,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    try:
        results = matrix.run_matrix(config, progress=lambda line: err.print(f"[dim]eval:[/dim] {line}"))
    except matrix.TasksNotOffline as e:
        for c in e.checks:
            typer.echo(f"{typer.style(c.name, fg='red')}: not available offline: {c.reason}", err=True)
            typer.echo(f"  fetch it on a login node: {c.fix}", err=True)
        raise typer.Exit(TASKS_NOT_OFFLINE) from None
    except matrix.ModelNotFound as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    except FileNotFoundError as e:  # a checkpoint step, an include path, a file of the export
        raise typer.BadParameter(str(e)) from None
    except AssetListError as e:
        raise typer.BadParameter(str(e), param_hint="--tasks") from None
    console.print(report.rich_table(results.rows))
    for note in results.notes:
        console.print(f"note: {note}", highlight=False)
    reused = sum(c.reused for c in results.cells)
    console.print(
        f"{len(results.cells)} cells ({reused} reused) in {results.seconds:.1f} s; "
        f"results: {results.csv}, {results.markdown}; plots: {', '.join(map(str, results.plots)) or 'none'}; "
        f"lm-eval JSON per cell under {results.out / matrix.CELLS_DIR}",
        highlight=False,
    )


def generate(
    model: Annotated[
        Path,
        typer.Argument(
            help="Run folder of `titanenv train` (trainer_config.json, checkpoint/step-N/) "
            "or an exported / Hugging Face folder (config.json, weights, tokenizer files)."
        ),
    ],
    prompt: Annotated[
        list[str],
        typer.Option(
            help="Text to continue; repeatable. @FILE: one prompt per non-empty line "
            '(FILE.jsonl: the "prompt" field of each JSON line). @@TEXT: the literal @TEXT.'
        ),
    ],
    max_new_tokens: Annotated[int, typer.Option(help="Upper bound on generated tokens per prompt.")] = 32,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0); 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the most likely tokens of this mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler (each prompt starts from it).")] = 0,
    greedy: Annotated[bool, typer.Option(help="Argmax decoding (ignores --temperature, --top-p, --seed).")] = False,
    step: Annotated[
        int | None, typer.Option(help="Checkpoint step of a run folder. Default: the latest complete one.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Continue prompts with a run's model or an exported / Hugging Face model, offline.

    Prints each prompt followed by its continuation, one block per prompt. The same seed gives
    the same text; a run and its export give the same text too (one sampler for both).
    """
    from titanenv import eval as ev

    try:
        prompts = ev.read_prompts(prompt)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--prompt") from None
    try:
        texts = ev.generate_text(
            model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            greedy=greedy, step=step, device=device,
        )  # fmt: skip
    except ev.ModelNotFound as e:
        raise typer.BadParameter(str(e), param_hint="MODEL") from None
    except ValueError as e:  # a sampler setting, --step with a Hugging Face folder, --device, an empty prompt
        raise typer.BadParameter(str(e)) from None
    for i, (text, continuation) in enumerate(zip(prompts, texts, strict=True)):
        if i:
            typer.echo("")
        typer.echo(typer.style(text, bold=True) + continuation)
