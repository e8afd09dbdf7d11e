"""The sbatch scripts: Jinja2 templates plus site data, rendered (never built as f-strings).

The templates, ``templates/train.sbatch.j2``, ``templates/preprocess.sbatch.j2`` (one
node, or a job array with ``parallel``) and ``templates/eval.sbatch.j2`` (one GPU), use
``@{ }@`` and ``@% %@`` as delimiters because bash owns ``{{``, ``{#`` and ``${...}``. Site
facts (partitions, GPUs and CPU cores per node) come from the machine profile
(:data:`titanenv.config.MACHINES`), exit codes from :mod:`titanenv.train.exitcodes`; job choices
(nodes, time, account, requeue limit) from :class:`JobSpec` (training), :class:`PreprocessSpec`
(tokenizing) and :class:`EvalSpec` (the lm-eval matrix). The files in ``jsc/`` are the renderings
of :data:`CHECKED_IN`, checked in (tests keep them in sync):

    python -m titanenv.slurm render --machine jwb > jsc/run_training_jwb.sbatch
    python -m titanenv.slurm render --job preprocess --machine jwc > jsc/preprocess_data_jwc.sbatch
    python -m titanenv.slurm render --job preprocess-parallel --machine jwc > jsc/preprocess_data_parallel_jwc.sbatch
    python -m titanenv.slurm render --job eval --machine jwb > jsc/run_eval_jwb.sbatch
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from titanenv.config import MACHINES, Machine
from titanenv.templating import environment
from titanenv.train import exitcodes

__all__ = [
    "CHECKED_IN",
    "EVAL_TEMPLATE",
    "PREPROCESS_TEMPLATE",
    "SRUN_OPTIONS",
    "TEMPLATE",
    "EvalSpec",
    "JobSpec",
    "PreprocessSpec",
    "job_files",
    "render",
]

TEMPLATE = Path(__file__).with_name("templates") / "train.sbatch.j2"
PREPROCESS_TEMPLATE = TEMPLATE.with_name("preprocess.sbatch.j2")
EVAL_TEMPLATE = TEMPLATE.with_name("eval.sbatch.j2")
SRUN_OPTIONS = ("--ntasks-per-node=1", "--cpu-bind=none")
"""One ``titanenv train`` per node, free to use all its cores. Not ``--kill-on-bad-exit``: the nodes of a
stopped run exit with 75 a moment apart, and the first one must not kill the others' exit status."""
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$|^\d+$")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """The #SBATCH choices of a training job.

    Attributes:
        machine: machine profile name (``jwb``, ``jrc``, ``jpb``, ``local`` ...).
        account: Slurm account (budget); ``CHANGE_ME`` in the checked-in script.
        partition: GPU partition; default: the profile's.
        nodes: nodes to allocate.
        gpus_per_node: ``--gres=gpu:N``; default: the profile's (0: none).
        cpus_per_task: CPU cores of the one task per node; default: the profile's cores per node.
        time: wall-clock limit (Slurm syntax: ``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``).
        stop_before_limit_s: seconds before the limit at which the job checkpoints and stops
            (``--signal=B:USR1@S``); must cover one step plus one checkpoint save. Slurm checks
            limits every 30 s, so the signal may come up to 30 s earlier.
        max_requeues: how often the job requeues itself after such a stop.
        job_name: ``--job-name``.
        output: ``--output`` of the batch log (relative to the submit directory).

    Raises:
        ValueError: a value Slurm would reject; the message names the field.
    """

    machine: str
    account: str = "CHANGE_ME"
    partition: str = ""
    nodes: int = 2
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str = "02:00:00"
    stop_before_limit_s: int = 600
    max_requeues: int = 10
    job_name: str = "titanenv-train"
    output: str = "logs/%x-%j.out"

    def __post_init__(self) -> None:
        _check(self.machine, self.account, self.time)
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.stop_before_limit_s < 0 or self.max_requeues < 0:
            raise ValueError("stop_before_limit_s and max_requeues must be >= 0")

    @property
    def profile(self) -> Machine:
        return MACHINES[self.machine]

    @property
    def job(self) -> str:
        """The ``titanenv slurm render --job`` name."""
        return "train"

    @property
    def filename(self) -> str:
        """Its name in ``jsc/``."""
        return f"run_training_{self.machine}.sbatch"

    def resolved(self) -> JobSpec:
        """This spec with the profile's partition, GPUs and cores filled in."""
        m = self.profile
        return replace(
            self,
            partition=self.partition or m.gpu_partition,
            gpus_per_node=m.gpus_per_node if self.gpus_per_node is None else self.gpus_per_node,
            cpus_per_task=(m.cpus_per_node or 1) if self.cpus_per_task is None else self.cpus_per_task,
        )


def _check(machine: str, account: str, time: str | None) -> None:
    if machine not in MACHINES:
        raise ValueError(f"machine {machine!r}: use one of {', '.join(MACHINES)}")
    if time is not None and not _TIME.match(time):
        raise ValueError(f"time {time!r}: use MM, HH:MM:SS or D-HH:MM:SS")
    if not account.strip() or any(c.isspace() for c in account):
        raise ValueError(f"account {account!r}: give your Slurm budget (TITANENV_ACCOUNT)")


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    """The #SBATCH choices of a tokenizing job (``titanenv preprocess`` on one CPU node per task).

    Attributes:
        machine: machine profile name.
        parallel: a job array of ``shards`` tasks, each writing one shard, merged by a dependent
            job that task 0 submits (``--submit-merge``); else one task (the validation split).
        account: Slurm account (budget); ``CHANGE_ME`` in the checked-in scripts.
        partition: default: the profile's CPU partition.
        cpus_per_task: cores, and so ``--workers``, of each task.
        time: wall-clock limit; default ``01:00:00``, ``02:00:00`` for the array.
        shards: tasks of the array (``--array=0-(shards-1)``); only with ``parallel``.
        job_name: default ``titanenv-preprocess-val``, ``titanenv-preprocess-train`` for the array.
        output: the batch log; default ``logs/%x-%j.out``, ``logs/%x-%A_%a.out`` for the array.

    Raises:
        ValueError: a value Slurm would reject; the message names the field.
    """

    machine: str
    parallel: bool = False
    account: str = "CHANGE_ME"
    partition: str = ""
    cpus_per_task: int = 8
    time: str | None = None
    shards: int = 4
    job_name: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        _check(self.machine, self.account, self.time)
        if self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")

    @property
    def job(self) -> str:
        """The ``titanenv slurm render --job`` name."""
        return "preprocess-parallel" if self.parallel else "preprocess"

    @property
    def profile(self) -> Machine:
        return MACHINES[self.machine]

    @property
    def filename(self) -> str:
        """Its name in ``jsc/``."""
        return f"preprocess_data{'_parallel' if self.parallel else ''}_{self.machine}.sbatch"

    def resolved(self) -> PreprocessSpec:
        """This spec with the profile's CPU partition and the variant's defaults filled in."""
        p = self.parallel
        return replace(
            self,
            partition=self.partition or self.profile.cpu_partition,
            time=self.time or ("02:00:00" if p else "01:00:00"),
            job_name=self.job_name or ("titanenv-preprocess-train" if p else "titanenv-preprocess-val"),
            output=self.output or ("logs/%x-%A_%a.out" if p else "logs/%x-%j.out"),
        )


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    """The #SBATCH choices of an evaluation job (``titanenv eval``, the lm-eval matrix, on one GPU).

    Attributes:
        machine: machine profile name.
        account: Slurm account (budget); ``CHANGE_ME`` in the checked-in script.
        partition: default: the profile's GPU partition.
        gpus: ``--gres=gpu:N``; default 1 where the profile has GPUs, else 0 (and ``--device cpu``).
        cpus_per_task: cores of the one task; default: the profile's cores per node.
        time: wall-clock limit.
        job_name: ``--job-name``.
        output: the batch log.

    Raises:
        ValueError: a value Slurm would reject; the message names the field.
    """

    machine: str
    account: str = "CHANGE_ME"
    partition: str = ""
    gpus: int | None = None
    cpus_per_task: int | None = None
    time: str = "02:00:00"
    job_name: str = "titanenv-eval"
    output: str = "logs/%x-%j.out"

    def __post_init__(self) -> None:
        _check(self.machine, self.account, self.time)
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")

    @property
    def job(self) -> str:
        """The ``titanenv slurm render --job`` name."""
        return "eval"

    @property
    def profile(self) -> Machine:
        return MACHINES[self.machine]

    @property
    def filename(self) -> str:
        """Its name in ``jsc/``."""
        return f"run_eval_{self.machine}.sbatch"

    def resolved(self) -> EvalSpec:
        """This spec with the profile's GPU partition, one GPU (if it has any) and its cores filled in."""
        m = self.profile
        return replace(
            self,
            partition=self.partition or m.gpu_partition,
            gpus=min(1, m.gpus_per_node) if self.gpus is None else self.gpus,
            cpus_per_task=(m.cpus_per_node or 1) if self.cpus_per_task is None else self.cpus_per_task,
        )


CHECKED_IN = (
    JobSpec(machine="jwb"),
    PreprocessSpec(machine="jwc"),
    PreprocessSpec(machine="jwc", parallel=True),
    EvalSpec(machine="jwb"),
)
"""The specs whose renderings are the files in ``jsc/`` (named by their ``filename``)."""


def job_files(checkpoint_dir: Path, job_id: str, restart: int = 0) -> dict[str, str]:
    """The variables the template exports for a job: its stop file and its copy of the batch script.

    Mirrors the template's ``job_dir`` lines (the Slurm tests check that both agree); used to
    show the exact torchrun command of a job in a dry run.
    """
    job_dir = Path(checkpoint_dir) / ".titanenv-jobs" / str(job_id)
    return {
        "TITANENV_STOP_FILE": str(job_dir / f"stop.{restart}"),
        "TITANENV_BATCH_SCRIPT": str(job_dir / "batch_script.sh"),
    }


def render(spec: JobSpec | PreprocessSpec | EvalSpec) -> str:
    """The sbatch script text for ``spec``: training (:class:`JobSpec`), tokenizing (:class:`PreprocessSpec`)
    or evaluation (:class:`EvalSpec`)."""
    spec = spec.resolved()
    templates = {PreprocessSpec: PREPROCESS_TEMPLATE, EvalSpec: EVAL_TEMPLATE}
    path = templates.get(type(spec), TEMPLATE)
    template = environment(path.parent).get_template(path.name)
    return template.render(
        spec=spec,
        machine=spec.profile,
        site=spec.profile.description.split(" (")[0],  # "JUWELS Cluster"
        srun_options=" ".join(SRUN_OPTIONS),
        exit_codes=exitcodes.table(),
    )
