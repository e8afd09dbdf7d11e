"""The Slurm job this process runs in, read once from the ``SLURM_*`` environment.

:class:`SlurmEnv` is the only reader of ``SLURM_*`` variables in titanenv (in the spirit of
submitit's ``JobEnvironment``); code that *sets* them for a child process, and the sbatch
templates, name them directly. :func:`node_name` is the one name of this node.

Unset and empty variables read as unset. Integers are parsed here, so a malformed value
fails where it is read, naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SlurmEnv", "node_name"]


def _text(env: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` that is set and not empty."""
    for name in names:
        if value := env.get(name):
            return value
    return None


def _int(env: Mapping[str, str], *names: str) -> int | None:
    value = _text(env, *names)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{names[0]}={value!r} is not an integer") from None


@dataclass(frozen=True, kw_only=True)
class SlurmEnv:
    """What Slurm tells this process about its job (all None outside a job).

    Attributes:
        job_id: ``SLURM_JOB_ID``; None outside a Slurm job.
        job_name: ``SLURM_JOB_NAME``.
        partition: ``SLURM_JOB_PARTITION``.
        account: ``SLURM_JOB_ACCOUNT``.
        restart_count: ``SLURM_RESTART_COUNT``: requeues of this job so far (None: never requeued).
        array_job_id: ``SLURM_ARRAY_JOB_ID``: the job id of the whole array.
        array_task_id: ``SLURM_ARRAY_TASK_ID``.
        array_task_count: ``SLURM_ARRAY_TASK_COUNT``.
        array_task_min: ``SLURM_ARRAY_TASK_MIN``.
        array_task_step: ``SLURM_ARRAY_TASK_STEP`` (``--array=0-6:2`` gives 2).
        array_task_max: ``SLURM_ARRAY_TASK_MAX``.
        step_id: ``SLURM_STEP_ID`` (inside ``srun``).
        nodelist: the compressed node list, ``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``,
            else ``SLURM_NODELIST`` (step values first: inside ``srun`` they name the nodes of the step).
        num_nodes: ``SLURM_STEP_NUM_NODES``, else ``SLURM_JOB_NUM_NODES``, else ``SLURM_NNODES``.
        nodename: ``SLURMD_NODENAME``: this node's Slurm name (see :func:`node_name`).
        node_id: ``SLURM_NODEID``: this node's index in the job, 0-based.
        proc_id: ``SLURM_PROCID``: this task's global rank.
        local_id: ``SLURM_LOCALID``: this task's rank on its node.
        ntasks: ``SLURM_NTASKS``.
        cpus_per_task: ``SLURM_CPUS_PER_TASK``.
        gpus_on_node: ``SLURM_GPUS_ON_NODE``: GPUs allocated on this node.
        submit_dir: ``SLURM_SUBMIT_DIR``: the folder ``sbatch`` ran in.
    """

    job_id: str | None = None
    job_name: str | None = None
    partition: str | None = None
    account: str | None = None
    restart_count: int | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None
    array_task_count: int | None = None
    array_task_min: int | None = None
    array_task_step: int | None = None
    array_task_max: int | None = None
    step_id: str | None = None
    nodelist: str | None = None
    num_nodes: int | None = None
    nodename: str | None = None
    node_id: int | None = None
    proc_id: int | None = None
    local_id: int | None = None
    ntasks: int | None = None
    cpus_per_task: int | None = None
    gpus_on_node: int | None = None
    submit_dir: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SlurmEnv:
        """Parse ``environ`` (default ``os.environ``; an empty mapping is no job).

        Raises:
            ValueError: an integer variable (e.g. ``SLURM_NODEID``) holds something else.
        """
        env = os.environ if environ is None else environ
        return cls(
            job_id=_text(env, "SLURM_JOB_ID"),
            job_name=_text(env, "SLURM_JOB_NAME"),
            partition=_text(env, "SLURM_JOB_PARTITION"),
            account=_text(env, "SLURM_JOB_ACCOUNT"),
            restart_count=_int(env, "SLURM_RESTART_COUNT"),
            array_job_id=_text(env, "SLURM_ARRAY_JOB_ID"),
            array_task_id=_int(env, "SLURM_ARRAY_TASK_ID"),
            array_task_count=_int(env, "SLURM_ARRAY_TASK_COUNT"),
            array_task_min=_int(env, "SLURM_ARRAY_TASK_MIN"),
            array_task_max=_int(env, "SLURM_ARRAY_TASK_MAX"),
            array_task_step=_int(env, "SLURM_ARRAY_TASK_STEP"),
            step_id=_text(env, "SLURM_STEP_ID"),
            nodelist=_text(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
            num_nodes=_int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
            nodename=_text(env, "SLURMD_NODENAME"),
            node_id=_int(env, "SLURM_NODEID"),
            proc_id=_int(env, "SLURM_PROCID"),
            local_id=_int(env, "SLURM_LOCALID"),
            ntasks=_int(env, "SLURM_NTASKS"),
            cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK"),
            gpus_on_node=_int(env, "SLURM_GPUS_ON_NODE"),
            submit_dir=_text(env, "SLURM_SUBMIT_DIR"),
        )

    @property
    def in_job(self) -> bool:
        """True inside a Slurm job (``SLURM_JOB_ID`` is set)."""
        return self.job_id is not None

    @property
    def array_index(self) -> int:
        """This task's 0-based position in its job array (``(TASK_ID - TASK_MIN) / TASK_STEP``); 0 outside an array.

        Raises:
            ValueError: the task id is not on the array's step (a sparse ``--array=0,3,7`` list).
        """
        if self.array_task_id is None:
            return 0
        offset, step = self.array_task_id - (self.array_task_min or 0), self.array_task_step or 1
        if offset % step:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={self.array_task_id} is not on the array's step {step}: "
                             "submit a contiguous array, e.g. --array=0-N")  # fmt: skip
        return offset // step

    def job_record(self) -> dict[str, str]:
        """The job's identity for a provenance record: ``{variable: value}`` of those that are set."""
        values = {
            "SLURM_JOB_ID": self.job_id,
            "SLURM_RESTART_COUNT": None if self.restart_count is None else str(self.restart_count),
            "SLURM_JOB_PARTITION": self.partition,
            "SLURM_JOB_ACCOUNT": self.account,
            "SLURM_JOB_NAME": self.job_name,
        }
        return {k: v for k, v in values.items() if v is not None}


def node_name(environ: Mapping[str, str] | None = None) -> str:
    """This node's name: its Slurm name (``SLURMD_NODENAME``), else the host name (``uname -n``).

    ``environ`` defaults to ``os.environ``.
    """
    return SlurmEnv.from_env(environ).nodename or os.uname().nodename
