"""``titanenv train`` and ``titanenv evaluate``: plain functions with typer annotations.

Register them on the app, e.g. ``app.command()(train)`` and ``app.command()(evaluate)``.
Both can also be called from Python; ``train`` raises ``typer.Exit(code)`` when torchrun fails.
"""

from __future__ import annotations

import filecmp
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from titanenv import config
from titanenv.data.indexed import bin_path, idx_path
from titanenv.slurm import submit as submitlib
from titanenv.slurm.render import JobSpec
from titanenv.train import checkpoints, job

__all__ = ["evaluate", "stage_tokenizer", "train"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def stage_tokenizer(tokenizer: Path, output_dir: Path) -> Path:
    """Copy the tokenizer into ``OUTPUT/tokenizer/`` and return that folder.

    ``tokenizer`` is a ``tokenizer.json`` file (any name), a folder holding one (its
    ``tokenizer_config.json`` is copied too) or a Hub id in the local cache, found by
    :func:`titanenv.data.tokenizer.resolve`. TorchTitan loads ``<folder>/tokenizer.json``
    from ``--hf-assets-path``; a copy in the output folder keeps the run self-contained
    for resuming and evaluation. Copies are atomic, so concurrent nodes are safe.

    Raises:
        FileNotFoundError: if there is no tokenizer at ``tokenizer``.
    """
    from titanenv.data import tokenizer as toklib

    found = toklib.resolve(tokenizer)  # the one resolver; TokenizerNotFound is a FileNotFoundError
    sources = {"tokenizer.json": found}
    if not Path(tokenizer).is_file():  # a folder (or cached Hub id): its tokenizer_config.json too
        folder = Path(tokenizer) if Path(tokenizer).is_dir() else found.parent
        sources |= {n: folder / n for n in TOKENIZER_FILES[1:] if (folder / n).is_file()}
    dest = Path(output_dir) / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        target = dest / name
        if target.is_file() and filecmp.cmp(src, target, shallow=False):
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    return dest


def _check_data(prefix: Path) -> None:
    for p in (bin_path(prefix), idx_path(prefix)):
        if not p.is_file():
            raise typer.BadParameter(
                f"{p}: no such file; create the dataset with `titanenv preprocess` and pass its prefix (no extension)",
                param_hint="--data",
            )


def _resume_step(resume_from: str | None, trust_unmarked: bool) -> int | None:
    if resume_from is None:
        if trust_unmarked:
            raise typer.BadParameter("--trust-unmarked needs --resume-from step-N (the checkpoint to check and trust)",
                                     param_hint="--trust-unmarked")  # fmt: skip
        return None
    try:
        return checkpoints.parse_step(resume_from)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--resume-from") from None


def train(
    data: Annotated[
        Path, typer.Option(help="Tokenized dataset prefix (PREFIX.bin/PREFIX.idx from `titanenv preprocess`).")
    ],
    tokenizer: Annotated[
        Path, typer.Option(help="tokenizer.json, or a folder containing it; copied to OUTPUT_DIR/tokenizer/.")
    ],
    output_dir: Annotated[
        Path,
        typer.Option(
            help="Run folder: checkpoints (checkpoint/step-N), TensorBoard (tb/), logs, provenance. Reuse it to resume."
        ),
    ],
    steps: Annotated[
        int | None,
        typer.Option(help="Total optimizer steps (a resumed run continues up to this). Default: the recipe's."),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="Config function in titanenv.train.recipes: titanenv_debug (tiny, CPU ok) or titanenv_1b (GPU)."
        ),
    ] = "titanenv_debug",
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per training sample. Default: the recipe's (debug 512, 1b 2048).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Samples per data-parallel rank per step (--training.local-batch-size). Default: the recipe's."
        ),
    ] = None,
    checkpoint_interval: Annotated[
        int | None,
        typer.Option(
            help="Save a DCP checkpoint every N steps (the last step is always saved). Default: the recipe's."
        ),
    ] = None,
    nproc_per_node: Annotated[
        int | None, typer.Option(help="Worker processes per node. Default: number of CUDA devices, or 1 on CPU.")
    ] = None,
    rdzv_host: Annotated[
        str | None,
        typer.Option(
            help="Rendezvous host of a multi-node run, {node} being the first node, e.g. '{node}i'. "
            "Default: the configured machine's (TITANENV_MACHINE; see `titanenv config show`)."
        ),
    ] = None,
    rdzv_port: Annotated[
        int | None,
        typer.Option(help="Rendezvous port. Default: 29500 + job id % 3000 (distinct for concurrent jobs)."),
    ] = None,
    eod_token: Annotated[
        str | None,
        typer.Option(
            help="End-of-document token separating documents (GPU document masking). Default: the one recorded in DATA.manifest.json by preprocess."
        ),
    ] = None,
    preflight: Annotated[
        bool,
        typer.Option(
            "--preflight/--no-preflight",
            help="Before torchrun, check on every node: GPUs, shared run folder, offline assets, rendezvous reachable.",
        ),
    ] = True,
    preflight_timeout: Annotated[
        float, typer.Option(help="Seconds the preflight waits for all nodes at the rendezvous.")
    ] = 120.0,
    resume_from: Annotated[
        str | None,
        typer.Option(
            help="Resume from this checkpoint (step-N under OUTPUT_DIR/checkpoint); no other folder may be newer "
            "(once a newer one is complete, e.g. on a requeue, the run resumes from that). "
            "Default: the newest complete checkpoint."
        ),
    ] = None,
    trust_unmarked: Annotated[
        bool,
        typer.Option(
            "--trust-unmarked",
            help="With --resume-from: accept a checkpoint without titanenv's completion marker after checking its "
            "DCP .metadata and shard sizes, and mark it complete.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the torchrun command and exit without training. With --submit: print the sbatch script, "
            "the sbatch, srun and torchrun commands, and run `sbatch --test-only`.",
        ),
    ] = False,
    submit: Annotated[
        bool,
        typer.Option(
            "--submit",
            help="Render the sbatch script for the configured machine (`titanenv config show`) and submit it "
            "with these flags (on a login node). The job requeues itself at the time limit and resumes.",
        ),
    ] = False,
    nodes: Annotated[int, typer.Option(help="With --submit: nodes to allocate.")] = 2,
    time: Annotated[str, typer.Option(help="With --submit: wall-clock limit (HH:MM:SS or D-HH:MM:SS).")] = "02:00:00",
    account: Annotated[
        str | None, typer.Option(help="With --submit: Slurm account. Default: TITANENV_ACCOUNT.")
    ] = None,
    partition: Annotated[
        str | None, typer.Option(help="With --submit: partition. Default: TITANENV_GPU_PARTITION.")
    ] = None,
    max_requeues: Annotated[
        int, typer.Option(help="With --submit: how often the job requeues itself after stopping at the time limit.")
    ] = 10,
    stop_before_limit: Annotated[
        int,
        typer.Option(
            help="With --submit: seconds before the time limit to checkpoint and stop (--signal=B:USR1@N); "
            "must cover a step plus a checkpoint save."
        ),
    ] = 600,
    extra: Annotated[
        list[str] | None,
        typer.Argument(help="Extra TorchTitan flags after '--', e.g. -- --debug.seed 0 --lr-scheduler.warmup-steps 10"),
    ] = None,
) -> None:
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
    args = job.TrainArgs(
        data=data, tokenizer=tokenizer, output_dir=output_dir, steps=steps, recipe=recipe, seq_len=seq_len,
        batch_size=batch_size, checkpoint_interval=checkpoint_interval, nproc_per_node=nproc_per_node,
        rdzv_host=rdzv_host, rdzv_port=rdzv_port, eod_token=eod_token, preflight=preflight,
        preflight_timeout_s=preflight_timeout, resume_from=_resume_step(resume_from, trust_unmarked),
        trust_unmarked=trust_unmarked, extra=tuple(extra or ()),
    )  # fmt: skip
    _check_data(data)
    site = config.load(strict=submit)  # submitting: a misspelt TITANENV_* name is an error
    if submit:
        spec = JobSpec(
            machine=site.config.machine, account=account or site.config.account or "CHANGE_ME",
            partition=partition or site.config.gpu_partition, nodes=nodes, time=time, max_requeues=max_requeues,
            stop_before_limit_s=stop_before_limit, output=f"{output_dir.absolute()}/logs/%x-%j.out",
        )  # fmt: skip
        _submit(submitlib.prepare(args, spec, site), dry_run)
        return
    # Imported here: torch (and the runner, which loads it) is slow to import, and no other `titanenv` command needs it.
    import torch

    from titanenv.train import runner

    tokenizer_dir = stage_tokenizer(tokenizer, output_dir) if not dry_run else output_dir / "tokenizer"
    node = job.node_run(args, env=dict(os.environ), cuda_devices=torch.cuda.device_count(), site=site,
                        tokenizer_dir=tokenizer_dir)  # fmt: skip
    if dry_run:
        typer.echo(shlex.join(node.command))
        return
    sys.stdout.flush()
    rc = runner.run_node(node)
    if rc != 0:
        raise typer.Exit(code=rc)


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
    typer.echo(
        f"submitted job {job_id}: {sub.script_path}; batch log {sub.spec.output.replace('%x', sub.spec.job_name).replace('%j', job_id)}"
    )


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
            help="tokenizer.json or its folder, checked against the model and used for --prompt. Default: the run's copy in OUTPUT_DIR/tokenizer."
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
    result = ev.evaluate(output_dir, data, max_windows=max_windows, batch_size=batch_size, step=step)
    typer.echo(
        f"step {result.step}: val loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
        f"({result.tokens:,} tokens in {result.windows} windows) -> {Path(output_dir) / ev.EVAL_FILE}"
    )
    if prompt is not None:
        model, _, _, _ = ev.load_model(output_dir, step=result.step)
        text = ev.generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, context=run.seq_len)
        typer.echo(f"{prompt}{text}")
