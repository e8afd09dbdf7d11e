"""A throwaway, real Slurm cluster on localhost for tests.

``LocalSlurm`` installs Slurm if needed (root + apt only), writes a private
configuration into a temp dir, starts ``munged``, ``slurmctld`` and one
``slurmd`` per node as child processes, and offers small helpers to submit
jobs and wait for them.  Nothing under /etc is modified: every client command
gets ``SLURM_CONF`` pointing at the private ``slurm.conf``, and slurm talks to
a private ``munged`` socket through ``AuthInfo=socket=...``.

The cluster mirrors JUWELS just enough for our sbatch files: partitions
``batch`` (default) and ``booster``, fake ``gpu`` GRES (device files are /dev/null symlinks), any
``--account`` accepted, requeue and ``--signal`` enabled, short timeouts.

Use from tests through the session fixture ``slurm_cluster`` (re-export it in
``tests/conftest.py``).  Without Slurm and without root the fixture skips,
except under ``CI=true`` where it fails: CI must run these tests.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

APT_PACKAGES = ("munge", "slurm-client", "slurmctld", "slurmd")
DAEMON_BINARIES = ("munged", "slurmctld", "slurmd")
CLIENT_BINARIES = ("munge", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "sacct")
# Client env vars that would leak a surrounding (real) Slurm job into ours.
# An outer job's Slurm variables, and the site settings container_run.sh exported for the test
# process: each test states the titanenv settings its jobs run with.
LEAKY_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SACCT_", "TITANENV_", "_TITANENV_")
KEEP_DIR_ENV = "TITANENV_SLURM_KEEP"

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# Pending reasons that mean "this job will never start by itself".
HOPELESS_REASONS = frozenset({"DependencyNeverSatisfied", "PartitionConfig", "PartitionNodeLimit", "BadConstraints"})

_apt_updated = False


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be provided here (no binaries and no way to install, not root)."""


class SlurmError(RuntimeError):
    """The local cluster misbehaved (daemon died, timeout, bad sbatch call)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SlurmConfig:
    """Shape of the local cluster.

    ``partitions``: names, all containing every node; the first is the default.
    ``cpus_per_node`` may exceed the real core count (``config_overrides``;
    nothing binds tasks to cores, so over-declaring only oversubscribes).
    ``gpus_per_node``: fake ``gpu`` GRES count per node, 0 disables GRES.
    ``cred_expire``: seconds (min 5) a requeued job waits before restarting.
    """

    nodes: int = 2
    cpus_per_node: int = 48  # a JUWELS Booster node; our sbatch files ask --cpus-per-task=48
    gpus_per_node: int = 4
    partitions: tuple[str, ...] = ("batch", "booster")
    cluster_name: str = "titanenv"
    cred_expire: int = 5
    start_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.cpus_per_node < 1 or self.gpus_per_node < 0:
            raise ValueError(f"invalid cluster shape: {self}")
        if not self.partitions:
            raise ValueError("at least one partition is required")
        if self.cred_expire < 5:
            raise ValueError("Slurm requires cred_expire >= 5")

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]


@dataclass(frozen=True)
class ClusterPaths:
    """Every file and directory the cluster writes, all below ``root``."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def gres_conf(self) -> Path:
        # slurmd looks for gres.conf next to slurm.conf.
        return self.root / "etc" / "gres.conf"

    @property
    def fake_gpus(self) -> Path:
        return self.root / "dev"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def jobcomp(self) -> Path:
        return self.logs / "jobcomp.txt"

    @property
    def work(self) -> Path:
        return self.root / "work"


def render_slurm_conf(
    config: SlurmConfig,
    paths: ClusterPaths,
    ctld_port: int,
    node_ports: Sequence[int],
    real_memory_mb: int,
) -> str:
    """Return slurm.conf text for ``config`` (pure; unit-testable without root)."""
    if len(node_ports) != config.nodes:
        raise ValueError("one port per node is required")
    gres = config.gpus_per_node > 0
    lines = [
        f"ClusterName={config.cluster_name}",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # Private munged; cred_expire also delays the restart of requeued jobs.
        f"AuthInfo=socket={paths.munge_socket},cred_expire={config.cred_expire}",
        f"StateSaveLocation={paths.state}",
        f"SlurmdSpoolDir={paths.spool}/%n",
        f"SlurmctldPidFile={paths.run}/slurmctld.pid",
        f"SlurmdPidFile={paths.run}/slurmd-%n.pid",
        f"SlurmctldLogFile={paths.logs}/slurmctld.log",
        f"SlurmdLogFile={paths.logs}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups in containers/CI: track processes via /proc, no task binding.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        # No slurmdbd: any --account is accepted; finished jobs land in a text file.
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={paths.jobcomp}",
        # Trust slurm.conf (more CPUs than the host has, fake GPUs).
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        # Reject impossible requests (e.g. more nodes than exist) at submit time.
        "EnforcePartLimits=ALL",
        "MailProg=/bin/true",
        "JobRequeue=1",
        # Short timeouts keep time-limit/requeue tests fast.
        "KillWait=2",
        "OverTimeLimit=0",
        "MinJobAge=300",
        "InactiveLimit=0",
        "MessageTimeout=10",
        "SlurmdTimeout=60",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1",
    ]
    if gres:
        lines.append("GresTypes=gpu")
    for name, port in zip(config.node_names, node_ports, strict=False):
        node = (
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port}"
            f" CPUs={config.cpus_per_node} RealMemory={real_memory_mb} State=UNKNOWN"
        )
        lines.append(node + (f" Gres=gpu:{config.gpus_per_node}" if gres else ""))
    all_nodes = ",".join(config.node_names)
    for i, part in enumerate(config.partitions):
        default = "YES" if i == 0 else "NO"
        lines.append(f"PartitionName={part} Nodes={all_nodes} Default={default} MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def render_gres_conf(config: SlurmConfig, paths: ClusterPaths) -> str:
    """gres.conf with ``gpus_per_node`` fake GPUs ``<root>/dev/gpu[0-N]``.

    slurmd drops a gpu GRES without ``File`` and complains unless each File
    is a character device, so the files are symlinks to /dev/null.
    """
    nodes = ",".join(config.node_names)
    files = f"{paths.fake_gpus}/gpu[0-{config.gpus_per_node - 1}]"
    return f"AutoDetect=off\nNodeName={nodes} Name=gpu File={files}\n"


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobRecord:
    """One job (or array task) as seen by ``scontrol`` or the jobcomp file."""

    job_id: str  # "12", or "12_3" for an array task
    state: str  # first word of JobState, e.g. COMPLETED, CANCELLED
    exit_code: int
    signal: int
    reason: str = ""
    fields: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_key_values(line: str) -> dict[str, str]:
    """Split ``A=1 B=x y C=3`` into a dict; values may contain spaces."""
    matches = list(_KEY_RE.finditer(line))
    out: dict[str, str] = {}
    for m, nxt in zip(matches, matches[1:] + [None], strict=False):
        end = nxt.start() if nxt else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def record_from_fields(fields: Mapping[str, str]) -> JobRecord:
    """Build a ``JobRecord`` from ``scontrol show job -o`` / jobcomp key=values."""
    array_job, array_task = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
    if array_job and array_task and array_task.isdigit():
        job_id = f"{array_job}_{array_task}"
    elif array_job and array_task:  # pending, not yet split array remainder
        job_id = f"{array_job}_[{array_task}]"
    else:
        job_id = fields["JobId"]
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return JobRecord(
        job_id=job_id,
        state=fields.get("JobState", "UNKNOWN").split()[0],
        exit_code=int(code or 0),
        signal=int(sig or 0),
        reason=fields.get("Reason", ""),
        fields=dict(fields),
    )


def _parse_records(text: str) -> list[JobRecord]:
    """One record per non-empty ``Key=value ...`` line."""
    return [record_from_fields(parse_key_values(line)) for line in text.splitlines() if line.strip()]


def _base_job_id(job_id: int | str) -> str:
    return str(job_id).split("_")[0]


# --------------------------------------------------------------------------- install


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-root PATH may lack.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _bin(name: str) -> str:
    """Absolute path of a Slurm/munge executable (after ``ensure_slurm_installed``)."""
    path = _which(name)
    if path is None:
        raise SlurmUnavailable(f"{name} not found")
    return path


def missing_binaries() -> list[str]:
    """Slurm/munge executables not found on this machine."""
    return [b for b in DAEMON_BINARIES + CLIENT_BINARIES if _which(b) is None]


def _apt_get(*args: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        # Usually "offline": unavailable (skip locally, fail under CI), not a harness bug.
        raise SlurmUnavailable(f"apt-get {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def ensure_slurm_installed() -> None:
    """Install Slurm + munge with apt if missing; ``SlurmUnavailable`` if we can't."""
    global _apt_updated
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and not root to install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries missing ({', '.join(missing)}) and no apt-get")
    if not _apt_updated:  # once per process: package lists are often absent in containers
        _apt_get("update", "-q")
        _apt_updated = True
    _apt_get("install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES)
    still = missing_binaries()
    if still:
        raise SlurmError(f"apt-get installed {APT_PACKAGES} but still missing: {still}")


def _require_root_and_munge_user() -> pwd.struct_passwd:
    # slurmd must run as root to launch jobs; munged refuses to run as root.
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd/munged needs root")
    try:
        return pwd.getpwnam("munge")
    except KeyError:
        raise SlurmUnavailable("no 'munge' user (is the munge package installed?)") from None


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def host_real_memory_mb() -> int:
    """RealMemory as ``slurmd -C`` reports it (slurmd rejects a larger value)."""
    out = subprocess.run([_bin("slurmd"), "-C"], capture_output=True, text=True).stdout
    m = re.search(r"RealMemory=(\d+)", out)
    if not m:
        raise SlurmError(f"cannot parse `slurmd -C` output: {out!r}")
    return int(m.group(1))


# --------------------------------------------------------------------------- cluster


class LocalSlurm:
    """A private Slurm cluster (munged + slurmctld + N slurmd) on localhost.

    Use as a context manager or call ``start()`` / ``stop()``.  Client
    commands must run with ``self.env`` (or through ``self.run``).
    """

    def __init__(self, config: SlurmConfig | None = None, root: Path | None = None) -> None:
        self.config = config or SlurmConfig()
        self._root_given = root
        self.paths: ClusterPaths | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._script_count = 0
        self.started_s: float | None = None  # wall time start() took

    # ---- lifecycle

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalSlurm:
        """Install if needed, write config, start daemons, wait for idle nodes."""
        t0 = time.monotonic()
        ensure_slurm_installed()
        munge_user = _require_root_and_munge_user()
        self.paths = self._make_dirs(munge_user)
        atexit.register(self.stop)
        try:
            self._write_config()
            self._start_munged(munge_user)
            self._start_slurmctld()
            for node in self.config.node_names:
                self._spawn(f"slurmd-{node}", [_bin("slurmd"), "-D", "-N", node])
            self.wait_nodes_idle(self.config.start_timeout)
        except BaseException:
            self.stop(keep_dir=True)
            raise
        self.started_s = time.monotonic() - t0
        return self

    def stop(self, keep_dir: bool | None = None) -> None:
        """Cancel jobs, stop daemons by PID (TERM, then KILL), remove the dir.

        ``keep_dir`` defaults to env ``TITANENV_SLURM_KEEP``; idempotent.
        """
        atexit.unregister(self.stop)
        if self._alive("slurmctld"):
            self._cancel_all_jobs()
        # Reverse start order: slurmds, then slurmctld, then munged.
        for name in reversed(list(self._procs)):
            _terminate(self._procs.pop(name))
        if keep_dir is None:
            keep_dir = os.environ.get(KEEP_DIR_ENV, "") not in ("", "0")
        if self.paths and not keep_dir and self._root_given is None:
            shutil.rmtree(self.paths.root, ignore_errors=True)

    # ---- environment and client commands

    @property
    def conf_path(self) -> Path:
        return self._paths().conf

    @property
    def workdir(self) -> Path:
        """Default cwd for jobs (and their slurm-<id>.out files)."""
        return self._paths().work

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running daemons by name (munged, slurmctld, slurmd-nodeN)."""
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients: ours, minus an outer job's SLURM_* and titanenv's TITANENV_* vars."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a client command (``sinfo``, ``scontrol`` ...) against this cluster."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} -> rc {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(
        self,
        script: str | Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        script_args: Sequence[str] = (),
    ) -> int:
        """Submit a batch job and return its id.

        ``script``: a ``Path`` to an sbatch file, or the script text (a
        ``#!/bin/bash`` line is added if missing).  ``args`` go before the
        script (sbatch options), ``script_args`` after it, ``env`` is merged
        into ``self.env``, ``cwd`` defaults to ``self.workdir``.
        """
        path = script if isinstance(script, Path) else self._write_script(script)
        full_env = self.env | dict(env or {})
        proc = subprocess.run(
            [_bin("sbatch"), "--parsable", *args, str(path), *script_args],
            env=full_env,
            cwd=str(cwd or self.workdir),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed (rc {proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    # ---- job state

    def jobs(self, job_id: int | str) -> list[JobRecord]:
        """Records for a job (all tasks of an array): live, else from jobcomp."""
        proc = self.run(_bin("scontrol"), "show", "job", "-o", str(job_id), check=False)
        if proc.returncode == 0:
            return _parse_records(proc.stdout)
        if "Invalid job id" not in proc.stderr:
            raise SlurmError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return self._latest_per_job(self.sacct(job_id))

    def sacct(self, job_id: int | str | None = None) -> list[JobRecord]:
        """Finished-job records from the jobcomp file (like ``sacct -c``).

        A requeued job has one record per run, oldest first.  ``job_id`` may be
        an array's base id (matches all its tasks) or ``"<base>_<task>"``.
        """
        jobcomp = self._paths().jobcomp
        if not jobcomp.exists():
            return []
        records = _parse_records(jobcomp.read_text())
        if job_id is None:
            return records
        want = str(job_id)
        return [r for r in records if want in (r.job_id, r.fields.get("JobId"), _base_job_id(r.job_id))]

    def wait_all(self, job_id: int | str, timeout: float = 60.0, poll: float = 0.3) -> list[JobRecord]:
        """Wait until the job (every task of an array) has finished."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r.finished for r in records):
                return records
            self._fail_if_hopeless(records)
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} not finished after {timeout:.0f}s: "
                    f"{[(r.job_id, r.state, r.reason) for r in records]}\n{self.logs_tail()}"
                )
            time.sleep(poll)

    def wait(self, job_id: int | str, timeout: float = 60.0) -> JobRecord:
        """Wait for a single (non-array) job; return its final record."""
        records = self.wait_all(job_id, timeout)
        if len(records) != 1:
            raise SlurmError(f"job {job_id} has {len(records)} records; use wait_all()")
        return records[0]

    def wait_nodes_idle(self, timeout: float) -> None:
        """Poll ``sinfo`` until every node is idle; raise with logs on timeout."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            self._check_daemons()
            states = self.node_states()
            if len(states) == self.config.nodes and set(states.values()) == {"idle"}:
                return
            time.sleep(0.2)
        raise SlurmError(f"nodes not idle after {timeout:.0f}s: {states}\n{self.logs_tail()}")

    def node_states(self) -> dict[str, str]:
        """``{node: state}`` from ``sinfo`` (empty while slurmctld is not up)."""
        proc = self.run(_bin("sinfo"), "-h", "-N", "-o", "%N %T", check=False, timeout=15)
        if proc.returncode != 0:
            return {}
        return dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())

    def logs_tail(self, lines: int = 30) -> str:
        """Last ``lines`` of every daemon log, for error messages."""
        if self.paths is None or not self.paths.logs.exists():
            return "(no logs)"
        chunks = []
        for log in sorted(self.paths.logs.iterdir()):
            # <daemon>.out is the daemon's stderr: it repeats <daemon>.log if any.
            if log == self.paths.jobcomp or (log.suffix == ".out" and log.with_suffix(".log").exists()):
                continue
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"==> {log} <==\n" + "\n".join(tail))
        return "\n".join(chunks)

    # ---- internals

    def _paths(self) -> ClusterPaths:
        if self.paths is None:
            raise SlurmError("cluster not started")
        return self.paths

    def _make_dirs(self, munge_user: pwd.struct_passwd) -> ClusterPaths:
        root = self._root_given or Path(tempfile.mkdtemp(prefix="titanenv-slurm-"))
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged (user munge) must traverse to its socket dir
        paths = ClusterPaths(root)
        node_spools = [paths.spool / n for n in self.config.node_names]
        for d in (paths.conf.parent, paths.state, paths.run, paths.logs, paths.work, paths.munge_dir, *node_spools):
            d.mkdir(parents=True, exist_ok=True)
        # munged insists on: dir owned by munge, executable by all; key 0600.
        os.chown(paths.munge_dir, munge_user.pw_uid, munge_user.pw_gid)
        paths.munge_dir.chmod(0o755)
        paths.munge_key.write_bytes(os.urandom(1024))
        os.chown(paths.munge_key, munge_user.pw_uid, munge_user.pw_gid)
        paths.munge_key.chmod(0o600)
        return paths

    def _write_config(self) -> None:
        paths = self._paths()
        ctld_port, *node_ports = free_ports(1 + self.config.nodes)
        conf = render_slurm_conf(self.config, paths, ctld_port, node_ports, host_real_memory_mb())
        paths.conf.write_text(conf)
        if self.config.gpus_per_node:
            paths.fake_gpus.mkdir(exist_ok=True)
            for i in range(self.config.gpus_per_node):
                (paths.fake_gpus / f"gpu{i}").symlink_to("/dev/null")
            paths.gres_conf.write_text(render_gres_conf(self.config, paths))

    def _spawn(self, name: str, cmd: list[str], **kwargs: object) -> subprocess.Popen:
        """Start a foreground daemon as our child; its stdout/stderr go to log/<name>.out."""
        with open(self._paths().logs / f"{name}.out", "ab") as out:
            # New session: a Ctrl-C in pytest must not kill daemons before teardown.
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )
        self._procs[name] = proc
        return proc

    def _start_munged(self, munge_user: pwd.struct_passwd) -> None:
        p = self._paths()
        cmd = [
            _bin("munged"),
            "--foreground",
            f"--socket={p.munge_socket}",
            f"--key-file={p.munge_key}",
            f"--pid-file={p.munge_dir}/munged.pid",
            f"--log-file={p.logs}/munged.log",
            f"--seed-file={p.munge_dir}/munged.seed",
        ]
        self._spawn("munged", cmd, user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[])
        self._poll(self._munge_answers, "munged to answer", timeout=15)

    def _munge_answers(self) -> bool:
        cmd = [_bin("munge"), "--no-input", f"--socket={self._paths().munge_socket}"]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def _start_slurmctld(self) -> None:
        # -i: ignore (empty) saved state; -D: stay in foreground so we own the PID.
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i"])
        self._poll(self._slurmctld_answers, "slurmctld to answer ping", timeout=30)

    def _slurmctld_answers(self) -> bool:
        return "UP" in self.run(_bin("scontrol"), "ping", check=False).stdout

    def _poll(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_daemons()
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs_tail()}")
            time.sleep(0.1)

    def _check_daemons(self) -> None:
        dead = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
        if dead:
            raise SlurmError(f"daemon(s) exited: {dead}\n{self.logs_tail()}")

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _cancel_all_jobs(self, timeout: float = 15.0) -> None:
        """scancel every job so no slurmstepd outlives the cluster."""
        try:
            ids = self.run(_bin("squeue"), "-h", "-o", "%A", check=False).stdout.split()
            if not ids:
                return
            self.run(_bin("scancel"), *ids, check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.run(_bin("squeue"), "-h", "-o", "%A", check=False).stdout.split():
                    return
                time.sleep(0.2)
        except subprocess.TimeoutExpired:
            pass  # best effort: daemons get stopped anyway

    def _write_script(self, text: str) -> Path:
        self._script_count += 1
        path = self._paths().root / "scripts" / f"job-{self._script_count}.sh"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text if text.startswith("#!") else "#!/bin/bash\n" + text)
        return path

    def _fail_if_hopeless(self, records: list[JobRecord]) -> None:
        for r in records:
            if r.state == "PENDING" and r.reason in HOPELESS_REASONS:
                raise SlurmError(
                    f"job {r.job_id} can never start ({r.reason}); for dependencies "
                    "submit with --kill-on-invalid-dep=yes"
                )

    @staticmethod
    def _latest_per_job(records: list[JobRecord]) -> list[JobRecord]:
        latest: dict[str, JobRecord] = {}
        for r in records:  # file order is chronological; keep the last run
            latest[r.job_id] = r
        return list(latest.values())


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a child daemon, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# --------------------------------------------------------------------------- pytest


def skip_or_fail(reason: str) -> None:
    """Skip, but fail under ``CI=true``: CI must never silently skip Slurm tests."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Slurm required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """One ``LocalSlurm`` for the whole session; ``SLURM_CONF`` exported meanwhile."""
    cluster = LocalSlurm()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        skip_or_fail(str(exc))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf_path)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        cluster.stop()
