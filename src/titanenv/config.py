"""Site configuration: ``configuration.sh`` read into one typed, validated object.

``configuration.sh`` is plain bash assignments (``VAR="${VAR:-default}"``), so the sbatch
files and ``container_run.sh`` source it directly. Python sources it through ``bash`` too,
so both read exactly the same values. Site facts that users do not edit (partition names,
GPUs per node, the rendezvous hostname rule) live in :data:`MACHINES`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("titanenv.config")

MachineName = Literal["jwb", "jwc", "jrc", "jpb", "local"]
Runtime = Literal["auto", "apptainer", "singularity", "none"]


@dataclass(frozen=True)
class Machine:
    """Facts about one site that titanenv needs to launch jobs there."""

    name: str
    description: str
    systemname: str | None
    """JSC's ``$SYSTEMNAME`` on this machine, for ``TITANENV_MACHINE=auto``."""
    cpu_partition: str
    gpu_partition: str
    gpus_per_node: int
    rdzv_host: str
    """Template for the hostname ranks use to reach ``{node}``, the first node of the job."""
    socket_ifname: str | None
    """Network interface for NCCL/gloo (``NCCL_SOCKET_IFNAME``/``GLOO_SOCKET_IFNAME``)."""
    arch: str
    cpus_per_node: int = 0
    """CPU cores per GPU node (``--cpus-per-task`` of the one training task per node); 0: unknown."""
    comm_env: tuple[tuple[str, str], ...] = ()
    """Interconnect settings every training process gets unless the environment already sets them:
    NCCL/UCX timeouts and retries (JSC's recommendation for its InfiniBand machines)."""


# A lost InfiniBand packet otherwise aborts NCCL after ~4 s of retries; JSC recommends these.
_JSC_IB_TIMEOUTS = (("NCCL_IB_TIMEOUT", "50"), ("NCCL_IB_RETRY_CNT", "10"), ("UCX_RC_TIMEOUT", "4s"))

MACHINES: dict[str, Machine] = {
    m.name: m
    for m in (
        Machine(
            "jwb",
            "JUWELS Booster (4x A100 per node)",
            "juwelsbooster",
            "batch",
            "booster",
            4,
            "{node}i",
            "ib0",
            "x86_64",
            cpus_per_node=48,
            comm_env=_JSC_IB_TIMEOUTS,
        ),
        Machine(
            "jwc",
            "JUWELS Cluster (CPU; 4x V100 in 'gpus')",
            "juwels",
            "batch",
            "gpus",
            4,
            "{node}i",
            "ib0",
            "x86_64",
            cpus_per_node=40,
            comm_env=_JSC_IB_TIMEOUTS,
        ),
        Machine(
            "jrc",
            "JURECA-DC (4x A100 per node)",
            "jurecadc",
            "dc-cpu",
            "dc-gpu",
            4,
            "{node}i",
            "ib0",
            "x86_64",
            cpus_per_node=128,
            comm_env=_JSC_IB_TIMEOUTS,
        ),
        Machine(
            "jpb",
            "JUPITER Booster (4x GH200 per node)",
            "jupiter",
            "booster",
            "booster",
            4,
            "{node}-interconnect-1.jupiter.internal",
            None,
            "aarch64",
            cpus_per_node=288,
            comm_env=_JSC_IB_TIMEOUTS,
        ),
        Machine(
            "local",
            "this machine: a local Slurm or none, CPU with gloo",
            None,
            "batch",
            "booster",
            0,
            "127.0.0.1",
            None,
            "any",
        ),
    )
}


class ConfigError(ValueError):
    """A value in ``configuration.sh`` or the environment is invalid; the message names it."""


class SiteConfig(BaseModel):
    """Resolved site configuration. Each field is read from the variable named by its alias."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    root: Path = Field(alias="TITANENV_ROOT", description="Repository root holding configuration.sh.")
    machine: MachineName = Field(alias="TITANENV_MACHINE", description="Site profile.")
    account: str = Field(alias="TITANENV_ACCOUNT", description="Slurm account (budget).")
    cpu_partition: str = Field(alias="TITANENV_CPU_PARTITION", description="Partition for CPU jobs.")
    gpu_partition: str = Field(alias="TITANENV_GPU_PARTITION", description="Partition for GPU jobs.")
    project_dir: Path = Field(alias="TITANENV_PROJECT_DIR", description="Shared project root.")
    scratch_dir: Path = Field(alias="TITANENV_SCRATCH_DIR", description="Scratch root.")
    data_dir: Path = Field(alias="TITANENV_DATA_DIR", description="Tokenized data.")
    checkpoint_dir: Path = Field(alias="TITANENV_CHECKPOINT_DIR", description="Training runs and checkpoints.")
    hf_home: Path = Field(alias="HF_HOME", description="Hugging Face cache.")
    pip_cache_dir: Path = Field(alias="PIP_CACHE_DIR", description="pip cache.")
    triton_cache_dir: Path = Field(alias="TRITON_CACHE_DIR", description="Triton kernel cache.")
    inductor_cache_dir: Path = Field(alias="TORCHINDUCTOR_CACHE_DIR", description="TorchInductor cache.")
    nltk_data: Path = Field(alias="NLTK_DATA", description="nltk data for lm-eval tasks.")
    container_runtime: Runtime = Field(alias="TITANENV_CONTAINER_RUNTIME", description="Container runtime.")
    image: Path = Field(alias="TITANENV_IMAGE", description="Apptainer image (.sif).")
    venv: Path = Field(alias="TITANENV_VENV", description="Python venv inside the container.")

    @field_validator(
        "root",
        "project_dir",
        "scratch_dir",
        "data_dir",
        "checkpoint_dir",
        "hf_home",
        "pip_cache_dir",
        "triton_cache_dir",
        "inductor_cache_dir",
        "nltk_data",
        "image",
        "venv",
    )
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(v)!r}")
        return v

    @property
    def profile(self) -> Machine:
        return MACHINES[self.machine]

    def job_environment(self) -> dict[str, str]:
        """Variables a job needs, as strings: every alias plus the cache directories."""
        return {name: str(getattr(self, field)) for field, name in _aliases().items()}


@dataclass(frozen=True)
class Resolved:
    """A :class:`SiteConfig` plus, for every variable, where its value came from."""

    config: SiteConfig
    origins: dict[str, str]
    warnings: tuple[str, ...] = ()
    """Unknown ``TITANENV_*`` names (likely misspelt) and anything the file printed to stderr."""


def _aliases() -> dict[str, str]:
    return {name: f.alias for name, f in SiteConfig.model_fields.items() if f.alias}


# TITANENV_* names that are not SiteConfig fields: set by titanenv's scripts and jobs, or read by them.
OTHER_NAMES: dict[str, str] = {
    "TITANENV_CONFIG": "the configuration file to read instead of the repository's configuration.sh",
    "TITANENV_OFFLINE": "0: container_run.sh keeps the network (fetching on a login node)",
    "TITANENV_BIND": "extra container binds, comma-separated (container_run.sh)",
    "TITANENV_NO_VENV": "1: container_run.sh does not activate the venv (env/set_up.sh)",
    "TITANENV_PYTHON": "the python3 that starts env/set_up.sh and container/build_container.sh",
    "TITANENV_FROM_ENVIRONMENT": "names the user's environment set, recorded by container_run.sh for value origins",
    "TITANENV_MAX_REQUEUES": "how often the training job requeues itself (sbatch script)",
    "TITANENV_STOP_FILE": "the file that asks training to checkpoint and stop (sbatch script)",
    "TITANENV_BATCH_SCRIPT": "the batch script recorded in provenance (sbatch script)",
    "TITANENV_VERSION": "titanenv's version, set inside the image",
    "TITANENV_UPDATE_GOLDEN": "tests: 1 rewrites the golden files",
    "TITANENV_SLURM_KEEP": "tests: folder where the local Slurm's files are kept",
}


def known_names() -> list[str]:
    """Every ``TITANENV_*`` name titanenv reads or sets; any other is reported as unknown."""
    return [*(n for n in _aliases().values() if n.startswith("TITANENV_")), *OTHER_NAMES]


def repository() -> Path | None:
    """The checkout this titanenv runs from (the folder of ``container_run.sh``); None for an installed wheel."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "container_run.sh").is_file() else None


def default_path(environ: dict[str, str] | os._Environ | None = None) -> Path:
    """``$TITANENV_CONFIG``, else ``configuration.sh`` in ``$TITANENV_ROOT`` or the repository."""
    environ = os.environ if environ is None else environ
    if p := environ.get("TITANENV_CONFIG"):
        return Path(p)
    root = environ.get("TITANENV_ROOT") or repository() or Path.cwd()
    return Path(root) / "configuration.sh"


def _user_environment(given: dict[str, str]) -> dict[str, str]:
    """What the user's environment set: container_run.sh exports every value of the file, and records
    in ``TITANENV_FROM_ENVIRONMENT`` which names were there before it did. (A value changed after
    container_run.sh ran, keeping the record, is labelled by the file; the value itself is right.)"""
    record = given.get("TITANENV_FROM_ENVIRONMENT")
    if record is None:
        return given
    names = set(record.split())
    return {k: v for k, v in given.items() if k in names}


def load(
    path: str | os.PathLike | None = None, environ: dict[str, str] | None = None, strict: bool = False
) -> Resolved:
    """Source ``configuration.sh`` with bash and validate the result.

    The file is sourced as the sbatch files do, under ``set -euo pipefail``, so an error there
    fails here too. ``TITANENV_ROOT`` is the repository whatever file is read (see configuration.sh).

    Args:
        path: the configuration file; :func:`default_path` when None.
        environ: the environment to resolve against; ``os.environ`` when None.
        strict: warnings (unknown ``TITANENV_*`` names) are errors; ``--submit`` uses it.

    Raises:
        ConfigError: the file is missing or does not source, or a value is invalid;
            the message names the variable, where its value came from, and the fix.
    """
    given = dict(os.environ if environ is None else environ)
    path = Path(path) if path else default_path(given)
    user = _user_environment(given)
    env = dict(given)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file (set TITANENV_CONFIG or run from the repository)")
    env.setdefault("TITANENV_ROOT", str(repository() or path.resolve().parent))
    names = list(_aliases().values())
    script = (
        'set -euo pipefail; source "$1" >/dev/null; shift; for v in "$@"; do printf "%s\\0" "${!v-}"; done; '
        'printf "%s\\0" $(compgen -v TITANENV_ || true)'
    )
    proc = subprocess.run(
        ["bash", "-c", script, "titanenv-config", str(path), *names], env=env, capture_output=True, text=True
    )
    lines = _assignment_lines(path)
    if proc.returncode != 0:
        raise ConfigError(_explain_source_error(path, proc.returncode, proc.stderr))
    fields = proc.stdout.split("\0")
    values = dict(zip(names, fields, strict=False))
    warnings = [f"{path}: {line}" for line in proc.stderr.splitlines() if line.strip()]
    warnings += _unknown_names([f for f in fields[len(names) :] if f], user, lines, path)
    origins = {}
    for name, value in values.items():
        if user.get(name) and user[name] == value:
            origins[name] = "environment"
        elif name == "TITANENV_ROOT":
            origins[name] = "repository" if repository() and Path(value) == repository() else f"folder of {path.name}"
        else:
            origins[name] = f"{path.name}:{lines[name]}" if name in lines else "default"
    _apply_profile(values, origins, env)
    try:
        config = SiteConfig.model_validate(values)
    except ValidationError as e:
        raise ConfigError(_explain(e, values, origins)) from None
    if strict and warnings:
        raise ConfigError("refused under --strict:\n  " + "\n  ".join(warnings))
    for w in warnings:
        if w not in _warned:
            _warned.add(w)
            log.warning("%s", w)
    return Resolved(config, origins, tuple(warnings))


_warned: set[str] = set()


def _unknown_names(names: list[str], user: dict[str, str], lines: dict[str, int], path: Path) -> list[str]:
    known = known_names()
    out = []
    for name in sorted(set(names) - set(known)):
        where = "environment" if name in user or name not in lines else f"{path.name}:{lines[name]}"
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; known names: {', '.join(known)}"
        out.append(f"unknown variable {name} (from {where}): not a titanenv setting{hint}")
    return out


def _explain_source_error(path: Path, rc: int, stderr: str) -> str:
    msg = (
        f"{path}: sourcing failed (exit {rc}, sourced with `set -euo pipefail` as the sbatch files do):\n"
        f"  {stderr.strip()}"
    )
    m = re.search(rf"{re.escape(str(path))}: line (\d+): ([A-Za-z_][A-Za-z0-9_]*): command not found", stderr)
    if m:
        text = (path.read_text().splitlines() + [""] * int(m.group(1)))[int(m.group(1)) - 1]
        if re.match(rf"\s*{m.group(2)}\s+=", text):
            msg += (
                f"\n  fix: bash reads {text.strip()!r} as a command; "
                f"write {m.group(2)}=VALUE, with no spaces around '='"
            )
    return msg


def _apply_profile(values: dict[str, str], origins: dict[str, str], env: dict[str, str]) -> None:
    """Resolve ``auto`` machine and fill empty partitions from the machine profile."""
    if values["TITANENV_MACHINE"] == "auto":
        sysname = env.get("SYSTEMNAME", "")
        found = next((m.name for m in MACHINES.values() if m.systemname and m.systemname == sysname), "local")
        values["TITANENV_MACHINE"] = found
        origins["TITANENV_MACHINE"] = f"auto ($SYSTEMNAME={sysname!r})" if sysname else "auto (no $SYSTEMNAME)"
    machine = MACHINES.get(values["TITANENV_MACHINE"])
    if machine is None:
        return  # validation names the bad value
    for var, default in (
        ("TITANENV_CPU_PARTITION", machine.cpu_partition),
        ("TITANENV_GPU_PARTITION", machine.gpu_partition),
    ):
        if not values[var]:
            values[var] = default
            origins[var] = f"machine profile {machine.name}"


def _explain(err: ValidationError, values: dict[str, str], origins: dict[str, str]) -> str:
    aliases = _aliases()
    msgs = []
    for e in err.errors():
        field = str(e["loc"][0])
        var = aliases.get(field, field)
        value = values.get(var, "")
        hint = ""
        if var == "TITANENV_MACHINE":
            close = difflib.get_close_matches(value, [*MACHINES, "auto"], n=1)
            hint = f"; use one of {', '.join([*MACHINES, 'auto'])}" + (
                f" (did you mean {close[0]!r}?)" if close else ""
            )
        elif var == "TITANENV_CONTAINER_RUNTIME":
            hint = "; use one of auto, apptainer, singularity, none"
        msgs.append(f"{var}={value!r} (from {origins.get(var, 'default')}): {e['msg']}{hint}")
    return "invalid configuration:\n  " + "\n  ".join(msgs)


def _assignment_lines(path: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    pattern = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if m := pattern.match(line):
            found.setdefault(m.group(1), n)
    return found
