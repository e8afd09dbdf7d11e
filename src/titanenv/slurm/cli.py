"""``titanenv slurm``: the sbatch template (register ``app`` on the main CLI, or ``python -m titanenv.slurm``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from titanenv.config import MACHINES
from titanenv.slurm.render import CHECKED_IN, EvalSpec, JobSpec, PreprocessSpec, render

app = typer.Typer(help="Slurm job scripts for training and tokenizing.", no_args_is_help=True, add_completion=False)


class Job(str, Enum):
    train = "train"
    preprocess = "preprocess"
    preprocess_parallel = "preprocess-parallel"
    eval = "eval"


_CHECKED_IN = {spec.job: spec for spec in CHECKED_IN}  # the default machine of each job: its jsc/ file's


@app.callback()
def _group() -> None:
    """Slurm job scripts for training and tokenizing."""


@app.command("render")
def render_cmd(
    job: Annotated[
        Job,
        typer.Option(help="train, preprocess (one node), preprocess-parallel (job array) or eval (one GPU, lm-eval)."),
    ] = Job.train,
    machine: Annotated[
        str | None,
        typer.Option(help=f"Machine profile: {', '.join(MACHINES)}; default: jwb for train and eval, else jwc."),
    ] = None,
    account: Annotated[str, typer.Option(help="Slurm account in the #SBATCH line.")] = "CHANGE_ME",
    nodes: Annotated[int, typer.Option(help="Nodes (train).")] = 2,
    time: Annotated[str | None, typer.Option(help="Wall-clock limit; default 02:00:00 (preprocess: 01:00:00).")] = None,
    shards: Annotated[int, typer.Option(help="Array tasks (preprocess-parallel).")] = 4,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Print the sbatch script of JOB for MACHINE; the files in jsc/ are `--machine jwb` (train, eval), else `jwc`."""
    machine = machine or _CHECKED_IN[job.value].machine
    try:
        if job is Job.train:
            spec: JobSpec | PreprocessSpec | EvalSpec = JobSpec(
                machine=machine, account=account, nodes=nodes, time=time or "02:00:00"
            )
        elif job is Job.eval:
            spec = EvalSpec(machine=machine, account=account, time=time or "02:00:00")
        else:
            spec = PreprocessSpec(
                machine=machine, parallel=job is Job.preprocess_parallel, account=account, time=time, shards=shards
            )
        text = render(spec)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
