"""The training command as a typed value: from ``titanenv train`` flags to one node's torchrun launch.

:class:`TrainArgs` holds the flags of ``titanenv train`` (and turns them back into an argv
for a batch job); :func:`node_run` resolves them against an environment (a Slurm
allocation or none) and the machine profile into a :class:`~titanenv.train.runner.NodeRun`.
Nothing is executed or written here, so the dry run and the batch job build the very same
command.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from titanenv import config as configlib
from titanenv.train import launch
from titanenv.train.launch import LaunchPlan
from titanenv.train.rundir import RunDir, attempt_id, node_name

__all__ = ["NodeRun", "TrainArgs", "build_train_command", "node_run"]


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """The flags of ``titanenv train`` (see its ``--help`` for each)."""

    data: Path
    tokenizer: Path
    output_dir: Path
    steps: int | None = None
    recipe: str = "titanenv_debug"
    seq_len: int | None = None
    batch_size: int | None = None
    checkpoint_interval: int | None = None
    nproc_per_node: int | None = None
    rdzv_host: str | None = None
    rdzv_port: int | None = None
    eod_token: str | None = None
    preflight: bool = True
    preflight_timeout_s: float = 120.0
    resume_from: int | None = None
    trust_unmarked: bool = False
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """``titanenv train`` flags that reproduce these arguments (absolute paths; for a batch job)."""
        out = [
            "--data", str(self.data.absolute()),
            "--tokenizer", str(self.tokenizer.absolute()),
            "--output-dir", str(self.output_dir.absolute()),
            "--recipe", self.recipe,
        ]  # fmt: skip
        optional = {
            "--steps": self.steps,
            "--seq-len": self.seq_len,
            "--batch-size": self.batch_size,
            "--checkpoint-interval": self.checkpoint_interval,
            "--nproc-per-node": self.nproc_per_node,
            "--rdzv-host": self.rdzv_host,
            "--rdzv-port": self.rdzv_port,
            "--eod-token": self.eod_token,
        }
        for flag, value in optional.items():
            if value is not None:
                out += [flag, str(value)]
        if not self.preflight:
            out.append("--no-preflight")
        if self.resume_from is not None:
            out += ["--resume-from", f"step-{self.resume_from}"]
        if self.trust_unmarked:
            out.append("--trust-unmarked")
        if self.preflight_timeout_s != TrainArgs.preflight_timeout_s:
            out += ["--preflight-timeout", f"{self.preflight_timeout_s:g}"]
        return out + (["--", *self.extra] if self.extra else [])


@dataclass(frozen=True, kw_only=True)
class NodeRun:
    """Everything one node needs to run its share of a training run.

    Attributes:
        command: the torchrun argv.
        env: torchrun's environment.
        plan: nodes, processes per node, rendezvous.
        run: run folder and attempt.
        node: this node's name.
        node_index: 0 on the first node.
        stop_file: the file whose appearance stops training (also created on SIGUSR1 here).
        data: dataset prefixes (provenance, preflight).
        tokenizer: the run's tokenizer folder (preflight).
        gpus: CUDA devices this node must have (0: CPU node).
        preflight: run the preflight checks.
        preflight_timeout_s: how long the rendezvous check waits for all nodes.
        site: the resolved site configuration (provenance), if any.
        seq_len: tokens per sample the run trains with (preflight: the data must hold one window).
        resume_from: ``--resume-from`` step, if given.
        trust_unmarked: ``--trust-unmarked``.
    """

    command: Sequence[str]
    env: Mapping[str, str]
    plan: LaunchPlan
    run: RunDir
    node: str
    node_index: int
    stop_file: Path
    data: Sequence[Path] = ()
    tokenizer: Path | None = None
    gpus: int = 0
    preflight: bool = True
    preflight_timeout_s: float = 120.0
    site: configlib.Resolved | None = field(default=None, repr=False)
    seq_len: int | None = None
    resume_from: int | None = None
    trust_unmarked: bool = False


RECIPE_SEQ_LEN = {"titanenv_debug": 512, "titanenv_1b": 2048}
"""Default ``--training.seq-len`` of each recipe (used by :mod:`titanenv.train.recipes`; here without torch)."""


def effective_seq_len(recipe: str, seq_len: int | None, extra: Sequence[str]) -> int | None:
    """The sequence length TorchTitan will train with: the last ``--training.seq-len`` in ``extra``
    (the user's flags win), else ``seq_len``, else the recipe's default (None: unknown recipe)."""
    found = None
    for i, arg in enumerate(extra):
        name, eq, value = arg.partition("=")
        if name in ("--training.seq-len", "--training.seq_len"):
            value = value if eq else (extra[i + 1] if i + 1 < len(extra) else "")
            found = int(value) if value.isdigit() else found
    return found or seq_len or RECIPE_SEQ_LEN.get(recipe)


def build_train_command(
    *,
    data: Path,
    tokenizer_dir: Path,
    output_dir: Path,
    recipe: str = "titanenv_debug",
    steps: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    checkpoint_interval: int | None = None,
    nproc_per_node: int | None = None,
    rdzv_host: str = "{node}",
    rdzv_port: int | None = None,
    eod_token: str | None = None,
    extra: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
    log_dir: Path | None = None,
    site: Mapping[str, str] | None = None,
    torchrun: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The torchrun argv and environment for a training run (nothing is started or written).

    ``env`` defaults to ``os.environ`` and ``cuda_devices`` to ``torch.cuda.device_count()``.
    """
    env = dict(os.environ if env is None else env)
    if cuda_devices is None:
        import torch  # here, not at the top: every `titanenv` command imports this module

        cuda_devices = torch.cuda.device_count()
    plan = launch.plan_launch(
        env, cuda_devices=cuda_devices, nproc_per_node=nproc_per_node, rdzv_host_template=rdzv_host, port=rdzv_port
    )
    overrides = [
        "--hf-assets-path", str(tokenizer_dir),
        "--dump-folder", str(output_dir),
        "--dataloader.path", str(data),
    ]  # fmt: skip
    optional = {
        "--training.steps": steps,
        "--training.seq-len": seq_len,
        "--training.local-batch-size": batch_size,
        "--checkpoint.interval": checkpoint_interval,
        "--dataloader.eod-token": eod_token,
    }
    for flag, value in optional.items():
        if value is not None:
            overrides += [flag, str(value)]
    cmd = launch.torchrun_command(plan, recipe, overrides + list(extra or []), log_dir=log_dir, torchrun=torchrun)
    return cmd, launch.worker_env(plan, env, site=site)


def node_run(
    args: TrainArgs,
    *,
    env: Mapping[str, str],
    cuda_devices: int,
    site: configlib.Resolved | None,
    tokenizer_dir: Path | None = None,
    torchrun: str | None = None,
) -> NodeRun:
    """This node's launch for ``args`` in the allocation described by ``env``.

    Args:
        args: the ``titanenv train`` flags.
        env: the environment (``SLURM_*`` decide nodes, rendezvous and attempt).
        cuda_devices: CUDA devices on this node.
        site: the site configuration (machine profile); None: the ``local`` profile.
        tokenizer_dir: the staged tokenizer folder; default ``OUTPUT/tokenizer``.
        torchrun: the torchrun executable; default the one beside this Python.
    """
    machine = site.config.profile if site else configlib.MACHINES["local"]
    output = args.output_dir.absolute()
    run = RunDir(output, attempt_id(env))
    node = node_name(env)
    stop_file = Path(env.get("TITANENV_STOP_FILE") or run.provenance / "stop")
    control = ["--control.stop-file", str(stop_file), "--control.status-file", str(run.status)]
    tokenizer_dir = (tokenizer_dir or output / "tokenizer").absolute()
    cmd, worker_env = build_train_command(
        data=args.data.absolute(),
        tokenizer_dir=tokenizer_dir,
        output_dir=output,
        recipe=args.recipe,
        steps=args.steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        checkpoint_interval=args.checkpoint_interval,
        nproc_per_node=args.nproc_per_node,
        rdzv_host=args.rdzv_host or machine.rdzv_host,
        rdzv_port=args.rdzv_port,
        eod_token=args.eod_token,
        extra=[*control, *args.extra],  # the user's flags last: they win
        env=env,
        cuda_devices=cuda_devices,
        log_dir=run.logs(node),
        site=launch.site_env(machine),
        torchrun=torchrun,
    )
    plan = launch.plan_launch(
        env, cuda_devices=cuda_devices, nproc_per_node=args.nproc_per_node,
        rdzv_host_template=args.rdzv_host or machine.rdzv_host, port=args.rdzv_port,
    )  # fmt: skip
    gpus = int(env.get("SLURM_GPUS_ON_NODE") or machine.gpus_per_node) if machine.gpus_per_node else 0
    return NodeRun(
        command=cmd,
        env=worker_env,
        plan=plan,
        run=run,
        node=node,
        node_index=int(env.get("SLURM_NODEID") or 0),
        stop_file=stop_file,
        data=(args.data.absolute(),),
        tokenizer=tokenizer_dir,
        gpus=gpus,
        preflight=args.preflight,
        preflight_timeout_s=args.preflight_timeout_s,
        site=site,
        seq_len=effective_seq_len(args.recipe, args.seq_len, args.extra),
        resume_from=args.resume_from,
        trust_unmarked=args.trust_unmarked,
    )
