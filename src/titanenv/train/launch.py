"""Build the ``torchrun`` command line for a TorchTitan run, from a Slurm allocation or locally.

Pure functions: the environment comes in as a mapping and nothing is executed, so
every decision can be tested with a fake ``SLURM_*`` environment.

Multi-node runs use torchrun's c10d rendezvous. ``titanenv train`` (and so this
command) must run once per node, e.g. ``srun --ntasks-per-node=1 titanenv train ...``;
all nodes compute the same rendezvous endpoint (first node of the allocation, mapped
by the site template, port derived from the job id) and meet there.

The rendezvous host is the first node's name put through a template, ``{node}i`` on JUWELS
and JURECA (the InfiniBand name), ``{node}-interconnect-1.jupiter.internal`` on JUPITER; the
templates are site data in :data:`titanenv.config.MACHINES`. One node always uses loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from titanenv.config import Machine
from titanenv.slurmenv import SlurmEnv

__all__ = [
    "LaunchPlan",
    "expand_hostlist",
    "plan_launch",
    "rdzv_host",
    "rdzv_port",
    "site_env",
    "torchrun_command",
    "worker_env",
]

PORT_BASE = 29500
PORT_SPAN = 3000
"""Ports ``29500 .. 32499``: per job, and below Linux's ephemeral range (32768+)."""


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist expression into node names, in order.

    Handles comma-separated items, bracketed ranges and lists with zero padding, and
    several bracket groups per item (cartesian product): ``node[1-2]`` ->
    ``node1, node2``; ``jwb[0001-0002,0010]`` -> ``jwb0001, jwb0002, jwb0010``;
    ``a1,b[3,5-6]`` -> ``a1, b3, b5, b6``; ``r[1-2]n[1-2]`` -> ``r1n1, r1n2, r2n1, r2n2``.

    Raises:
        ValueError: on unbalanced brackets, empty items or descending ranges.
    """
    hostlist = hostlist.strip()
    if not hostlist:
        raise ValueError("empty hostlist")
    return [host for item in _split_top_level(hostlist) for host in _expand_item(item)]


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise ValueError(f"empty item in hostlist {text!r}")
    return [item.strip() for item in items]


_GROUP = re.compile(r"\[([^\]]*)\]")


def _expand_item(item: str) -> list[str]:
    match = _GROUP.search(item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    return [head + value + rest for value in _expand_ranges(match.group(1), item) for rest in _expand_item(tail)]


def _expand_ranges(spec: str, item: str) -> list[str]:
    values: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty range in hostlist item {item!r}")
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ValueError(f"bad range {part!r} in hostlist item {item!r}")
            width = len(lo)  # Slurm pads to the width of the range start
            values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        else:
            values.append(part)
    return values


def rdzv_host(first_node: str, template: str) -> str:
    """Rendezvous address for ``first_node``: ``template`` with ``{node}`` filled in."""
    return template.format(node=first_node)


def rdzv_port(job_id: str | int, base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """Rendezvous port for a job: ``base + job_id % span`` (non-numeric ids are hashed stably)."""
    text = str(job_id)
    number = int(text) if text.isdigit() else sum((i + 1) * ord(c) for i, c in enumerate(text))
    return base + number % span


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    """Where and how many workers torchrun starts.

    Attributes:
        nnodes: number of nodes (one torchrun per node).
        nproc_per_node: worker processes per node (GPUs per node, or CPU processes).
        rdzv_endpoint: ``HOST:PORT`` of the c10d rendezvous; ``None`` for ``--standalone``.
        rdzv_id: rendezvous id shared by all nodes of the run (the Slurm job id).
        device: ``"cuda"`` (NCCL) or ``"cpu"`` (gloo).
        nodes: node names of the allocation (empty outside Slurm).
    """

    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: str | None
    rdzv_id: str
    device: str
    nodes: tuple[str, ...] = ()


def plan_launch(
    env: Mapping[str, str],
    *,
    cuda_devices: int,
    cpu_procs: int = 1,
    nproc_per_node: int | None = None,
    rdzv_host_template: str = "{node}",
    port: int | None = None,
) -> LaunchPlan:
    """Decide nodes, processes per node and rendezvous from the environment.

    Inside Slurm (``SLURM_JOB_ID`` set): node count and node names from
    :class:`~titanenv.slurmenv.SlurmEnv` (step values first: inside ``srun`` they describe
    the nodes actually running torchrun);
    rendezvous at ``rdzv_host(first node, rdzv_host_template):rdzv_port(job id)``, or on
    loopback for a single node.
    Outside Slurm: one node, ``--standalone`` rendezvous on localhost.

    Args:
        env: environment variables (normally ``os.environ``).
        cuda_devices: visible CUDA devices on this node (``torch.cuda.device_count()``).
        cpu_procs: processes per node when there is no CUDA device.
        nproc_per_node: explicit override of the processes per node.
        rdzv_host_template: the site's rendezvous host, ``{node}`` being the first node
            (``Machine.rdzv_host`` of the configured machine).
        port: explicit rendezvous port; default :func:`rdzv_port` of the job id.

    Raises:
        ValueError: if the Slurm node count and node list disagree, or counts are < 1.
    """
    device = "cuda" if cuda_devices > 0 else "cpu"
    nproc = nproc_per_node or (cuda_devices if device == "cuda" else cpu_procs)
    if nproc < 1:
        raise ValueError(f"processes per node must be >= 1, got {nproc}")
    slurm = SlurmEnv.from_env(env)
    job_id = slurm.job_id
    if not job_id:
        return LaunchPlan(nnodes=1, nproc_per_node=nproc, rdzv_endpoint=None, rdzv_id="local", device=device)
    nodelist = slurm.nodelist
    nodes = tuple(expand_hostlist(nodelist)) if nodelist else ()
    nnodes = slurm.num_nodes if slurm.num_nodes is not None else max(1, len(nodes))
    if nodes and len(nodes) != nnodes:
        raise ValueError(f"Slurm says {nnodes} nodes but the node list {nodelist!r} has {len(nodes)}")
    if nnodes < 1:
        raise ValueError(f"Slurm node count must be >= 1, got {nnodes}")
    first = nodes[0] if nodes else (slurm.nodename or "127.0.0.1")
    # One node needs no network name: loopback always works.
    host = "127.0.0.1" if nnodes == 1 else rdzv_host(first, rdzv_host_template)
    return LaunchPlan(
        nnodes=nnodes,
        nproc_per_node=nproc,
        rdzv_endpoint=f"{host}:{port or rdzv_port(job_id)}",
        rdzv_id=job_id,
        device=device,
        nodes=nodes,
    )


def _torchrun() -> str:
    beside = Path(sys.executable).with_name("torchrun")  # the venv's torchrun, not whatever is on PATH
    return str(beside) if beside.exists() else (shutil.which("torchrun") or "torchrun")


def torchrun_command(
    plan: LaunchPlan,
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    log_rank: int | None = 0,
    log_dir: str | os.PathLike[str] | None = None,
    torchrun: str | None = None,
) -> list[str]:
    """The full argv: ``torchrun <rendezvous> -m torchtitan.train --module ... --config RECIPE OVERRIDES``.

    Args:
        plan: from :func:`plan_launch`.
        recipe: config function in :mod:`titanenv.train.recipes`, e.g. ``titanenv_debug``.
        overrides: TorchTitan flags appended verbatim (``--training.steps 10`` ...).
        log_rank: only this local rank's output is shown (``--tee 3 --local-ranks-filter``);
            ``None`` shows every rank.
        log_dir: torchrun's ``--log-dir``: every local rank's stdout and stderr also go to
            ``LOG_DIR/<run id>_<random>/attempt_<n>/<local rank>/{stdout,stderr}.log``.
        torchrun: executable; defaults to the ``torchrun`` next to this Python.
    """
    cmd = [torchrun or _torchrun(), "--nnodes", str(plan.nnodes), "--nproc-per-node", str(plan.nproc_per_node)]
    if plan.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", plan.rdzv_endpoint, "--rdzv-id", plan.rdzv_id]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir)]
    if log_rank is not None or log_dir is not None:
        cmd += ["--tee", "3"]
    if log_rank is not None:
        cmd += ["--local-ranks-filter", str(log_rank)]
    cmd += ["-m", "torchtitan.train", "--module", "titanenv.train.recipes", "--config", recipe]
    return cmd + list(overrides)


def site_env(machine: Machine) -> dict[str, str]:
    """Interconnect variables of a site profile: ``*_SOCKET_IFNAME`` and its NCCL/UCX timeouts."""
    out = dict(machine.comm_env)
    if machine.socket_ifname:
        out["NCCL_SOCKET_IFNAME"] = out["GLOO_SOCKET_IFNAME"] = machine.socket_ifname
    return out


def worker_env(
    plan: LaunchPlan,
    env: Mapping[str, str],
    *,
    cpu_count: int | None = None,
    site: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for torchrun: ``env`` plus what the workers need.

    - ``PYTHONPATH`` starts with the directory holding this ``titanenv`` package, so
      every worker imports the same code as the launcher.
    - On CPU, ``OMP_NUM_THREADS`` = cores / processes (torchrun would otherwise force 1
      thread per worker), unless already set.
    - ``site`` (:func:`site_env` of the machine profile) fills interconnect settings the
      environment does not set already, so a user's ``export NCCL_IB_TIMEOUT=...`` wins.
    """
    out = dict(env)
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in paths if p != package_root])
    if plan.device == "cpu" and "OMP_NUM_THREADS" not in out:
        cores = cpu_count or os.cpu_count() or 1
        out["OMP_NUM_THREADS"] = str(max(1, cores // plan.nproc_per_node))
    for name, value in (site or {}).items():
        out.setdefault(name, value)
    return out
