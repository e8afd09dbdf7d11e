"""The one ``sbatch`` call of titanenv: submit a job and return its id.

The training submitter (:mod:`titanenv.slurm.submit`) and the merge job of a preprocessing
array (``titanenv preprocess --submit-merge``) both submit through :func:`submit`;
``titanenv train --submit --dry-run`` asks Slurm through :func:`test_only`. Both run with
the caller's environment minus ``_TITANENV_INSIDE``: the job re-enters the image through
``container_run.sh``, which must not think it is inside already.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["command", "find", "job_env", "parse_parsable", "submit", "test_only"]

TIMEOUT_S = 60.0
"""Seconds sbatch may take to answer."""


def command(
    options: Sequence[str], *, dependency: str | None = None, test_only: bool = False, sbatch: str = "sbatch"
) -> list[str]:
    """``sbatch --parsable [--dependency=DEPENDENCY --kill-on-invalid-dep=yes] OPTIONS...``
    (``--test-only`` instead of ``--parsable``).

    Args:
        options: sbatch options, then the script and its arguments (or ``--wrap=...``).
        dependency: e.g. ``afterok:1234``; None: no dependency. A job whose dependency can never be
            met (the job it waits for failed) is cancelled rather than left pending for ever.
        test_only: ask whether Slurm would accept the job, and when it would start; nothing is queued.
        sbatch: the sbatch executable.
    """
    dep = [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"] if dependency else []
    return [sbatch, "--test-only" if test_only else "--parsable", *dep, *options]


def parse_parsable(stdout: str) -> str:
    """The job id from ``sbatch --parsable``'s output, ``JOBID`` or ``JOBID;CLUSTER``.

    Raises:
        RuntimeError: the output holds no job id.
    """
    lines = stdout.strip().splitlines()
    job_id = lines[-1].split(";")[0].strip() if lines else ""
    if not job_id:
        raise RuntimeError(f"sbatch --parsable printed no job id: {stdout!r}")
    return job_id


def job_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) without ``_TITANENV_INSIDE``, for sbatch to export to the job."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k != "_TITANENV_INSIDE"}


def find(sbatch: str | None = None) -> str:
    """``sbatch`` if given, else the sbatch on ``PATH``.

    Raises:
        FileNotFoundError: there is none (submit from a login node).
    """
    found = sbatch or shutil.which("sbatch")
    if found is None:
        raise FileNotFoundError("sbatch: not found; submit from a login node of the cluster")
    return found


def submit(
    options: Sequence[str],
    *,
    dependency: str | None = None,
    sbatch: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    what: str = "the job",
) -> str:
    """Run :func:`command` and return the new job's id.

    Args:
        options: sbatch options, then the script and its arguments (or ``--wrap=...``).
        dependency: e.g. ``afterok:1234`` (``--dependency``).
        sbatch: the sbatch executable; default the one on ``PATH``.
        cwd: the folder to submit from (the job's ``SLURM_SUBMIT_DIR``); default this one.
        env: the environment to submit with (see :func:`job_env`); default ``os.environ``.
        what: names the job in the error message, e.g. the script's path.

    Raises:
        FileNotFoundError: no ``sbatch`` here (submit from a login node).
        RuntimeError: sbatch refused the job (the message ends with sbatch's stderr), or gave no job id.
        subprocess.TimeoutExpired: sbatch did not answer within :data:`TIMEOUT_S`.
    """
    argv = command(options, dependency=dependency, sbatch=find(sbatch))
    proc = subprocess.run(argv, cwd=cwd, env=job_env(env), capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch refused {what}: {proc.stderr.strip()}")
    return parse_parsable(proc.stdout)


def test_only(
    options: Sequence[str], *, sbatch: str | None = None, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """``sbatch --test-only``: would Slurm accept the job, and when would it start? Returns (exit code, message).

    Arguments as for :func:`submit`. Raises FileNotFoundError when there is no sbatch.
    """
    argv = command(options, test_only=True, sbatch=find(sbatch))
    proc = subprocess.run(argv, cwd=cwd, env=job_env(env), capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, (proc.stdout + proc.stderr).strip()
