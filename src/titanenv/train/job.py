"""The training command as a typed value: from ``titanenv train`` flags to one node's torchrun launch.

:class:`TrainArgs` (the table of :mod:`titanenv.train.settings`) holds the flags of ``titanenv
train`` (and turns them back into an argv for a batch job); :func:`node_run` resolves them
against an environment (a Slurm allocation or none) and the machine profile into a
:class:`NodeRun`, planning the launch once.
Nothing is executed or written here, so the dry run and the batch job build the very same
command.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from titanenv import config as configlib
from titanenv.slurmenv import SlurmEnv, node_name
from titanenv.train import launch, settings
from titanenv.train.launch import LaunchPlan
from titanenv.train.rundir import RunDir, attempt_id
from titanenv.train.settings import TrainArgs

__all__ = ["NodeRun", "TrainArgs", "build_train_command", "node_run", "plan", "titan_overrides"]


@dataclass(frozen=True, kw_only=True)
class NodeRun:
    """Everything one node needs to run its share of a training run.

    Attributes:
        command: the torchrun argv.
        env: torchrun's environment.
        plan: nodes, processes per node, rendezvous (planned once, for the command and the preflight).
        run: run folder and attempt.
        node: this node's name.
        node_index: 0 on the first node.
        stop_file: the file whose appearance stops training (also created on SIGUSR1 here).
        args: the ``titanenv train`` flags, paths absolute (preflight, provenance).
        tokenizer: the run's tokenizer folder (preflight).
        gpus: CUDA devices this node must have (0: CPU node).
        site: the resolved site configuration (provenance), if any.
        seq_len: tokens per sample the run trains with (preflight: the data must hold one window).
    """

    command: Sequence[str]
    env: Mapping[str, str]
    plan: LaunchPlan
    run: RunDir
    node: str
    node_index: int
    stop_file: Path
    args: TrainArgs
    tokenizer: Path | None = None
    gpus: int = 0
    site: configlib.Resolved | None = field(default=None, repr=False)
    seq_len: int | None = None

    @property
    def data(self) -> tuple[Path, ...]:
        """Dataset prefixes (provenance, preflight); none for a run on ``--sft`` data."""
        return () if self.args.data is None else (self.args.data,)

    @property
    def base_model(self) -> Path | None:
        """The Hugging Face folder a fine-tune starts from (``titanenv finetune --from``), else None."""
        base = getattr(self.args, "base", None)  # FinetuneArgs (titanenv.finetune) adds this row
        return Path(base) if base is not None else None

    @property
    def settings(self) -> dict[str, object]:
        """The flags as a record, one entry per row of the table (provenance)."""
        return settings.record(self.args)


RECIPE_SEQ_LEN = {"titanenv_debug": 512, "titanenv_1b": 2048, "titanenv_debug_lora": 512, "titanenv_1b_lora": 2048,
                  "titanenv_debug_infini": 512, "titanenv_1b_infini": 2048}  # fmt: skip
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


def titan_overrides(args: TrainArgs, tokenizer_dir: Path) -> list[str]:
    """TorchTitan's flags for ``args``: the run's paths, then every row of the table that maps to one."""
    data = [] if args.data is None else ["--dataloader.path", str(args.data)]
    return ["--hf-assets-path", str(tokenizer_dir), "--dump-folder", str(args.output_dir), *data,
            *settings.titan_args(args)]  # fmt: skip


def plan(args: TrainArgs, env: Mapping[str, str], *, cuda_devices: int, rdzv_host: str) -> LaunchPlan:
    """This node's launch plan for ``args``; ``rdzv_host`` is the template used when ``--rdzv-host`` is unset."""
    return launch.plan_launch(
        env, cuda_devices=cuda_devices, nproc_per_node=args.nproc_per_node,
        rdzv_host_template=args.rdzv_host or rdzv_host, port=args.rdzv_port,
    )  # fmt: skip


def build_train_command(
    *,
    tokenizer_dir: Path,
    extra: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
    log_dir: Path | None = None,
    site: Mapping[str, str] | None = None,
    torchrun: str | None = None,
    **flags: Any,
) -> tuple[list[str], dict[str, str]]:
    """The torchrun argv and environment for a training run (nothing is started or written).

    ``flags`` are :class:`TrainArgs` fields (``data``, ``output_dir``, ``recipe``, ``steps``, ...;
    ``tokenizer`` is ``tokenizer_dir``), taken as given. ``env`` defaults to ``os.environ`` and
    ``cuda_devices`` to ``torch.cuda.device_count()``.
    """
    args = TrainArgs(tokenizer=tokenizer_dir, extra=tuple(extra or ()), **flags)
    env = dict(os.environ if env is None else env)
    if cuda_devices is None:
        import torch  # here, not at the top: every `titanenv` command imports this module

        cuda_devices = torch.cuda.device_count()
    launch_plan = plan(args, env, cuda_devices=cuda_devices, rdzv_host="{node}")
    overrides = [*titan_overrides(args, tokenizer_dir), *args.extra]
    cmd = launch.torchrun_command(launch_plan, args.recipe, overrides, log_dir=log_dir, torchrun=torchrun)
    return cmd, launch.worker_env(launch_plan, env, site=site)


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
    args = replace(args, data=None if args.data is None else args.data.absolute(),
                   tokenizer=args.tokenizer.absolute(), output_dir=args.output_dir.absolute())  # fmt: skip
    run = RunDir(args.output_dir, attempt_id(env))
    node = node_name(env)
    stop_file = Path(env.get("TITANENV_STOP_FILE") or run.provenance / "stop")
    control = ["--control.stop-file", str(stop_file), "--control.status-file", str(run.status)]
    tokenizer_dir = (tokenizer_dir or args.output_dir / "tokenizer").absolute()
    launch_plan = plan(args, env, cuda_devices=cuda_devices, rdzv_host=machine.rdzv_host)  # once: command and preflight
    overrides = [*titan_overrides(args, tokenizer_dir), *control, *args.extra]  # the user's flags last: they win
    cmd = launch.torchrun_command(launch_plan, args.recipe, overrides, log_dir=run.logs(node), torchrun=torchrun)
    slurm = SlurmEnv.from_env(env)
    on_node = slurm.gpus_on_node
    gpus = (machine.gpus_per_node if on_node is None else on_node) if machine.gpus_per_node else 0
    return NodeRun(
        command=cmd,
        env=launch.worker_env(launch_plan, env, site=launch.site_env(machine)),
        plan=launch_plan,
        run=run,
        node=node,
        node_index=slurm.node_id or 0,
        stop_file=stop_file,
        args=args,
        tokenizer=tokenizer_dir,
        gpus=gpus,
        site=site,
        seq_len=effective_seq_len(args.recipe, args.seq_len, args.extra),
    )
