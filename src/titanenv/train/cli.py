"""``titanenv train``: typer command function.

Register it on the app, e.g. ``app.command()(train)``.
``train``'s options are generated from the table in :mod:`titanenv.train.settings`.
It can also be called from Python; ``train`` raises ``typer.Exit(code)`` when torchrun fails.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from titanenv import config
from titanenv.data.indexed import bin_path, idx_path
from titanenv.slurm import submit as submitlib
from titanenv.slurm.render import JobSpec
from titanenv.train import job, settings
from titanenv.train.rundir import stage_tokenizer
from titanenv.train.settings import SubmitArgs, TrainArgs

__all__ = ["check_data", "launch", "make_train", "stage_tokenizer", "train"]


def check_data(prefix: Path | None) -> None:
    if prefix is None:
        raise typer.BadParameter("no training data: pass --data PREFIX (from `titanenv preprocess`)",
                                 param_hint="--data")  # fmt: skip
    for p in (bin_path(prefix), idx_path(prefix)):
        if not p.is_file():
            raise typer.BadParameter(
                f"{p}: no such file; create the dataset with `titanenv preprocess` and pass its prefix (no extension)",
                param_hint="--data",
            )


def _check_trust(args: TrainArgs) -> None:
    if args.trust_unmarked and args.resume_from is None:
        raise typer.BadParameter("--trust-unmarked needs --resume-from step-N (the checkpoint to check and trust)",
                                 param_hint="--trust-unmarked")  # fmt: skip


def _train(args: TrainArgs, opts: SubmitArgs) -> None:
    """Pre-train a llama3-style model with TorchTitan on a tokenized dataset.

    Runs `torchrun ... -m torchtitan.train --module titanenv.train.recipes --config RECIPE`
    with this node's share of the Slurm allocation (or one local node), after a preflight
    check, and exits with torchrun's exit code; 3 when the preflight failed; 75 when
    training checkpointed and stopped early on request (SIGUSR1 or the stop file: the
    sbatch script requeues on 75). Under Slurm run it once per node: `srun
    --ntasks-per-node=1 titanenv train ...`, or submit with --submit. Running it again
    with the same --output-dir resumes from the newest complete checkpoint (log lines
    "resume: ..." and "Training starts at step N+1"). A run folder whose checkpoints all
    lack the completion marker is refused (exit 3) rather than overwritten: resume with
    --resume-from step-N --trust-unmarked, or pass a new --output-dir.
    """
    if opts.submit and opts.dependency:  # the job it waits for may be what writes the data; the preflight checks it
        typer.echo(f"--data {args.data}: checked when the job starts (after {opts.dependency})", err=True)
    else:
        check_data(args.data)
    launch(args, opts)


def launch(args: TrainArgs, opts: SubmitArgs, command: str = "train") -> None:
    """Submit, dry-run or run ``args`` here (the body of ``titanenv train`` once its data is checked).

    ``command``: the ``titanenv`` subcommand the batch job runs with ``args.argv()`` (``train``
    or ``finetune``), through the same sbatch script.
    """
    _check_trust(args)
    site = config.load(strict=opts.submit)  # submitting: a misspelt TITANENV_* name is an error
    if opts.submit:
        spec = JobSpec(
            machine=site.config.machine, account=opts.account or site.config.account or "CHANGE_ME",
            partition=opts.partition or site.config.gpu_partition, nodes=opts.nodes, time=opts.time,
            max_requeues=opts.max_requeues, stop_before_limit_s=opts.stop_before_limit,
            output=f"{args.output_dir.absolute()}/logs/%x-%j.out",
        )  # fmt: skip
        _submit(submitlib.prepare(args, spec, site, command=command, dependency=opts.dependency), opts.dry_run)
        return
    # Imported here: the runner loads torch, which is slow to import, and no other `titanenv` command needs it.
    from titanenv.train import runner

    if opts.dry_run:
        typer.echo(shlex.join(runner.plan_here(args, site).command))
        return
    sys.stdout.flush()
    rc, node = runner.run_here(args, site)
    if rc != 0:
        raise typer.Exit(code=rc)
    if args.export_at_end and node.node_index == 0:
        _export_at_end(node)


def _export_at_end(node: job.NodeRun) -> None:
    """--export-at-end: the Hugging Face export of the final checkpoint, when training reached its last step."""
    from titanenv import export
    from titanenv.train import control

    status = control.read_status(node.run.status)
    if not status or status.get("state") != "completed":
        typer.echo(f"--export-at-end: training did not complete ({status}); no export", err=True)
        return
    try:
        out = export.cached_export(node.run.root)
    except (ValueError, OSError) as e:  # ExportRefused is a ValueError
        typer.echo(f"--export-at-end: training completed, but the export failed: {e}\n"
                   f"  retry with: titanenv export {shlex.quote(str(node.run.root))}", err=True)  # fmt: skip
        raise typer.Exit(code=1) from None
    typer.echo(f"--export-at-end: exported the final checkpoint to {out}")


def make_train(args: type[TrainArgs] = TrainArgs, opts: type[SubmitArgs] = SubmitArgs) -> Callable[..., None]:
    """``titanenv train`` with one option per row of the tables ``args`` and ``opts`` (and ``extra`` last)."""
    return settings.command(_train, args, opts)


train = make_train()
"""``titanenv train``: typer options generated from :class:`~titanenv.train.settings.TrainArgs` and
:class:`~titanenv.train.settings.SubmitArgs`; callable from Python with the same keyword arguments
(``train(data=..., tokenizer=..., output_dir=..., steps=...)``)."""


def _submit(sub: submitlib.Submission, dry_run: bool) -> None:
    if dry_run:
        typer.echo(submitlib.dry_run_text(sub), nl=False)
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            typer.echo("sbatch --test-only: skipped (no sbatch here)", err=True)
            return
        rc, message = submitlib.test_only(sub, sbatch)
        typer.echo(f"sbatch --test-only (exit {rc}): {message}", err=True)
        if rc != 0:
            raise typer.Exit(code=rc)
        return
    job_id = submitlib.submit(sub)
    log = sub.spec.output.replace("%x", sub.spec.job_name).replace("%j", job_id)
    typer.echo(f"submitted job {job_id}: {sub.script_path}; batch log {log}")
