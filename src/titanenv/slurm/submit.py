"""``titanenv train --submit [--dry-run]``: render the sbatch script for the configured machine and submit it.

Rendering and submitting are separate steps: :func:`prepare` renders the script and builds
every command the job will run, for an *example allocation* (the real node names and job
id exist only once Slurm starts the job; the rendezvous port follows the job id); the dry
run prints all of it and asks ``sbatch --test-only`` whether the request is valid;
:func:`submit` writes the script to ``OUTPUT/train.sbatch`` and submits it.
"""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from titanenv import config as configlib
from titanenv import sbatch as sbatchlib
from titanenv.slurm.render import SRUN_OPTIONS, JobSpec, job_files, render
from titanenv.train.job import TrainArgs, node_run

__all__ = ["EXAMPLE_JOB_ID", "Submission", "dry_run_text", "example_allocation", "prepare", "submit", "test_only"]

EXAMPLE_JOB_ID = "1234567"


def example_allocation(machine: str, nodes: int, job_id: str = EXAMPLE_JOB_ID) -> dict[str, str]:
    """The ``SLURM_*`` variables the first node would see in a job of ``nodes`` nodes (names are examples)."""
    width = 1 if machine == "local" else 4
    base = "node" if machine == "local" else machine
    first, last = str(1).zfill(width), str(nodes).zfill(width)
    nodelist = f"{base}{first}" if nodes == 1 else f"{base}[{first}-{last}]"
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURMD_NODENAME": f"{base}{first}",
        "SLURM_NODEID": "0",
    }


@dataclass(frozen=True)
class Submission:
    """A rendered training job and the commands it runs."""

    spec: JobSpec
    script: str
    script_path: Path
    job_args: list[str]
    root: Path
    example: dict[str, str] = field(default_factory=dict)
    torchrun: list[str] = field(default_factory=list)
    torchrun_env: dict[str, str] = field(default_factory=dict)
    command: str = "train"
    """The ``titanenv`` subcommand of the job: ``train``, or ``finetune`` (then the script's first argument)."""
    dependency: str | None = None
    """Slurm's ``--dependency`` of the job (``afterok:1234``), or None."""

    @property
    def script_args(self) -> list[str]:
        """The arguments after the script: ``finetune`` first for a fine-tune, then the flags."""
        return self.job_args if self.command == "train" else [self.command, *self.job_args]

    @property
    def sbatch_argv(self) -> list[str]:
        dep = [f"--dependency={self.dependency}"] if self.dependency else []
        return ["sbatch", *dep, str(self.script_path), *self.script_args]

    @property
    def srun_argv(self) -> list[str]:
        return ["srun", *SRUN_OPTIONS, str(self.root / "container_run.sh"), "titanenv", self.command, *self.job_args]


def prepare(
    args: TrainArgs, spec: JobSpec, site: configlib.Resolved, *, command: str = "train", dependency: str | None = None
) -> Submission:
    """Render the script for ``spec`` and build the commands of the job for an example allocation.

    ``command``: ``train``, or ``finetune`` for :class:`titanenv.finetune.FinetuneArgs` ``args``.
    """
    resolved = spec.resolved()
    root = site.config.root
    script = render(resolved)
    example = example_allocation(resolved.machine, resolved.nodes)
    env = {**site.config.job_environment(), **example, **job_files(site.config.checkpoint_dir, example["SLURM_JOB_ID"])}
    if resolved.gpus_per_node:
        env["SLURM_GPUS_ON_NODE"] = str(resolved.gpus_per_node)
    job = node_run(
        args, env=env, cuda_devices=resolved.gpus_per_node or 0, site=site,
        torchrun=str(site.config.venv / "bin" / "torchrun"),
    )  # fmt: skip
    added = {k: v for k, v in job.env.items() if env.get(k) != v and k != "PYTHONPATH"}
    return Submission(
        spec=resolved,
        script=script,
        script_path=args.output_dir.absolute() / "train.sbatch",
        job_args=args.argv(),
        root=root,
        example=example,
        torchrun=list(job.command),
        torchrun_env=dict(sorted(added.items())),
        command=command,
        dependency=dependency,
    )


def dry_run_text(sub: Submission) -> str:
    """Everything the job would run, for the terminal (deterministic: golden-file tested)."""
    nodes = sub.example["SLURM_JOB_NODELIST"]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sub.torchrun_env.items())
    return "\n".join([
        f"# dry run: nothing written, nothing submitted. The sbatch script ({sub.script_path}):",
        sub.script.rstrip("\n"),
        "# the submit command (from the repository root):",
        shlex.join(sub.sbatch_argv),
        "# the batch script then runs, once per node:",
        shlex.join(sub.srun_argv),
        f"# and titanenv {sub.command} on each node runs, e.g. on {sub.example['SLURMD_NODENAME']} of job "
        f"{sub.example['SLURM_JOB_ID']} on {nodes} (the port follows the job id), with {env or 'no extra variables'}:",
        shlex.join(sub.torchrun),
        "",
    ])  # fmt: skip


def _sbatch_env(sub: Submission, env: Mapping[str, str] | None) -> dict[str, str]:
    # sbatch exports this environment to the job (sbatchlib drops _TITANENV_INSIDE from it).
    return {**sbatchlib.job_env(env), "TITANENV_ROOT": str(sub.root)}


def test_only(sub: Submission, sbatch: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """``sbatch --test-only``: would Slurm accept the job, and when would it start? Returns (rc, message)."""
    with tempfile.TemporaryDirectory(prefix="titanenv-submit-") as tmp:
        script = Path(tmp, "train.sbatch")
        script.write_text(sub.script)
        return sbatchlib.test_only([str(script), *sub.script_args], sbatch=sbatch, cwd=sub.root,
                                   env=_sbatch_env(sub, env))  # fmt: skip


def submit(sub: Submission, sbatch: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Write ``OUTPUT/train.sbatch`` and submit it from the repository root (:func:`titanenv.sbatch.submit`).

    Returns:
        The job id.

    Raises:
        FileNotFoundError: no ``sbatch`` here (submit from a login node).
        RuntimeError: sbatch refused the job; the message is sbatch's.
    """
    sbatch = sbatchlib.find(sbatch)
    sub.script_path.parent.mkdir(parents=True, exist_ok=True)
    sub.script_path.write_text(sub.script)
    (sub.root / Path(sub.spec.output).parent).mkdir(parents=True, exist_ok=True)
    return sbatchlib.submit([str(sub.script_path), *sub.script_args], dependency=sub.dependency, sbatch=sbatch,
                            cwd=sub.root, env=_sbatch_env(sub, env), what=str(sub.script_path))  # fmt: skip
