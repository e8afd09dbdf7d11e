"""The flags of ``titanenv train`` as one table: each field of :class:`TrainArgs` is one row.

A row is a dataclass field whose ``metadata`` (built by :func:`option`) names its
``titanenv train`` flag, its help, and the TorchTitan flag it maps to, if any; the field's
name, type and default are the rest of the row. Everything else is generated from the
table:

- the typer options of ``titanenv train`` (:func:`command`, :func:`parameters`);
- :class:`TrainArgs` itself, and the CLI values turned into it (:meth:`Row.from_cli`);
- the argv that reproduces the flags in a batch job (:func:`argv`);
- the TorchTitan overrides of the torchrun command (:func:`titan_args`);
- the provenance record (:func:`record`).

Adding a flag is adding a field here. :class:`SubmitArgs` is a second table for the flags
that only shape ``--submit`` and ``--dry-run`` (they do not travel into the batch job).
"""

from __future__ import annotations

import dataclasses
import inspect
import keyword
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from titanenv.train import checkpoints

__all__ = ["Row", "SubmitArgs", "TrainArgs", "argv", "command", "option", "parameters", "record", "table", "titan_args"]

_SAME: Any = object()
"""``cli_type``/``cli_default`` not given: the CLI takes the field's own type and default."""


def option(
    flag: str | None = None,
    *,
    help: str,
    titan: str | None = None,
    argument: bool = False,
    always: bool = False,
    cli_type: Any = _SAME,
    cli_default: Any = _SAME,
    parse: Callable[[Any], Any] | None = None,
    show: Callable[[Any], str] | None = None,
) -> dict[str, Any]:
    """The metadata of one row: ``field(default=..., metadata=option("--flag", help=...))``.

    Args:
        flag: the ``titanenv train`` flag (``--a/--no-a`` for a switch with a negative);
            None for the positional argument.
        help: the ``--help`` text.
        titan: the TorchTitan flag the value is passed to (``--checkpoint.interval``), if any.
        argument: the positional argument (after ``--`` in the argv).
        always: the argv carries the flag even at its default (the batch job pins it).
        cli_type: the type typer parses, when it differs from the field's.
        cli_default: the CLI default, when it differs from the field's.
        parse: CLI value -> field value (a ``ValueError`` is a bad value for ``flag``).
        show: field value -> its text in the argv (default: absolute paths, ``%g`` floats).
    """
    return {"flag": flag, "help": help, "titan": titan, "argument": argument, "always": always,
            "cli_type": cli_type, "cli_default": cli_default, "parse": parse, "show": show}  # fmt: skip


def _show(value: Any) -> str:
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class Row:
    """One row of a table: a field with its flag, as :func:`table` reads it."""

    name: str
    type: Any
    default: Any
    flag: str | None
    help: str
    titan: str | None = None
    argument: bool = False
    always: bool = False
    cli_type: Any = _SAME
    cli_default: Any = _SAME
    parse: Callable[[Any], Any] | None = None
    show: Callable[[Any], str] | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def param(self) -> str:
        """The Python (typer) parameter name: the flag's, e.g. ``preflight_timeout`` for ``--preflight-timeout``."""
        if self.flag is None:
            return self.name
        name = self.flag.split("/")[0].lstrip("-").replace("-", "_")
        return self.name if keyword.iskeyword(name) else name  # --from: parameter `base`

    @property
    def is_switch(self) -> bool:
        return self.type is bool

    def typer_parameter(self) -> inspect.Parameter:
        info = typer.Argument(help=self.help) if self.argument else typer.Option(self.flag, help=self.help)
        cli_type = self.type if self.cli_type is _SAME else self.cli_type
        default = self.default if self.cli_default is _SAME else self.cli_default
        return inspect.Parameter(
            self.param,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if default is dataclasses.MISSING else default,
            annotation=Annotated[cli_type, info],
        )

    def from_cli(self, value: Any) -> Any:
        """The field's value for the CLI's ``value`` (raises ``typer.BadParameter`` on a bad one)."""
        if self.parse is None:
            return value
        try:
            return self.parse(value)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=self.flag) from None

    def argv(self, value: Any) -> list[str]:
        """This row's flags in an argv (nothing at the default, unless required or ``always``)."""
        if self.flag is None or (value == self.default and not self.always):
            return []
        if self.is_switch:
            on, _, off = self.flag.partition("/")
            return [on] if value else ([off] if off else [])
        return [self.flag, (self.show or _show)(value)]


def table(cls: type) -> tuple[Row, ...]:
    """The rows of a table dataclass (its fields that carry :func:`option` metadata), in order."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        rows.append(Row(name=f.name, type=hints[f.name], default=default, **f.metadata))
    return tuple(rows)


def parameters(*tables: type) -> list[inspect.Parameter]:
    """typer parameters of the tables' rows: the options in order, then the positional arguments."""
    rows = [r for cls in tables for r in table(cls)]
    return [r.typer_parameter() for r in rows if not r.argument] + [r.typer_parameter() for r in rows if r.argument]


def command(body: Callable[..., None], *tables: type) -> Callable[..., None]:
    """A typer command (and a Python function taking the CLI's keyword arguments) built from ``tables``.

    The command's parameters are :func:`parameters` of ``tables``; a call turns its keyword
    arguments (defaults filled in) into one instance of each table and calls
    ``body(*instances)``. Name and help come from ``body``.
    """
    signature = inspect.Signature(parameters(*tables), return_annotation=None)

    def run(**kwargs: Any) -> None:
        bound = signature.bind(**kwargs)
        bound.apply_defaults()
        values = bound.arguments
        body(*(cls(**{r.name: r.from_cli(values[r.param]) for r in table(cls)}) for cls in tables))

    run.__signature__ = signature  # type: ignore[attr-defined]
    run.__doc__ = body.__doc__
    run.__name__ = run.__qualname__ = body.__name__.lstrip("_")
    run.__module__ = body.__module__
    return run


def argv(values: Any) -> list[str]:
    """Flags that reproduce ``values`` (a table instance): required and ``always`` rows first, then
    every other row that is not at its default, in table order, then ``-- ARGUMENTS``."""
    rows = table(type(values))
    first = [r for r in rows if (r.required or r.always) and not r.argument]
    rest = [r for r in rows if r not in first and not r.argument]
    out = [arg for r in first + rest for arg in r.argv(getattr(values, r.name))]
    for r in rows:
        if r.argument and getattr(values, r.name):
            out += ["--", *map(str, getattr(values, r.name))]
    return out


def titan_args(values: Any) -> list[str]:
    """``TITAN_FLAG VALUE`` for every row that maps to a TorchTitan flag and is set, in table order
    (a tuple value gives ``TITAN_FLAG V1 V2 ...``, as tyro reads a list)."""
    out = []
    for r in table(type(values)):
        value = getattr(values, r.name)
        if r.titan is not None and value is not None:
            out += [r.titan, *map(str, value)] if isinstance(value, tuple) else [r.titan, str(value)]
    return out


def _json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    return value


def record(values: Any) -> dict[str, Any]:
    """Every row's value, JSON-ready (provenance)."""
    return {r.name: _json(getattr(values, r.name)) for r in table(type(values))}


def _step(value: str | None) -> int | None:
    return None if value is None else checkpoints.parse_step(value)


def _extra(value: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(value or ())


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """The flags of ``titanenv train`` that define a run (see its ``--help`` for each); the table.

    ``recipe`` goes to TorchTitan as ``--config``, and ``nproc_per_node``/``rdzv_*`` to torchrun,
    through :func:`titanenv.train.launch.plan_launch`; ``data``, ``tokenizer`` (its staged copy)
    and ``output_dir`` are resolved per node by :func:`titanenv.train.job.node_run`.
    """

    # fmt: off
    data: Path | None = field(metadata=option(
        "--data", help="Tokenized dataset prefix (PREFIX.bin/PREFIX.idx from `titanenv preprocess`)."))
    tokenizer: Path = field(metadata=option(
        "--tokenizer", help="tokenizer.json, or a folder containing it; copied to OUTPUT_DIR/tokenizer/."))
    output_dir: Path = field(metadata=option(
        "--output-dir",
        help="Run folder: checkpoints (checkpoint/step-N), TensorBoard (tb/), logs, provenance. Reuse it to resume."))
    steps: int | None = field(default=None, metadata=option(
        "--steps", titan="--training.steps",
        help="Total optimizer steps (a resumed run continues up to this). Default: the recipe's."))
    recipe: str = field(default="titanenv_debug", metadata=option(
        "--recipe", always=True,
        help="Config function in titanenv.train.recipes: titanenv_debug (tiny, CPU ok) or titanenv_1b (GPU)."))
    seq_len: int | None = field(default=None, metadata=option(
        "--seq-len", titan="--training.seq-len",
        help="Tokens per training sample. Default: the recipe's (debug 512, 1b 2048)."))
    batch_size: int | None = field(default=None, metadata=option(
        "--batch-size", titan="--training.local-batch-size",
        help="Samples per data-parallel rank per step (--training.local-batch-size). Default: the recipe's."))
    checkpoint_interval: int | None = field(default=None, metadata=option(
        "--checkpoint-interval", titan="--checkpoint.interval",
        help="Save a DCP checkpoint every N steps (the last step is always saved). Default: the recipe's."))
    nproc_per_node: int | None = field(default=None, metadata=option(
        "--nproc-per-node", help="Worker processes per node. Default: number of CUDA devices, or 1 on CPU."))
    rdzv_host: str | None = field(default=None, metadata=option(
        "--rdzv-host",
        help="Rendezvous host of a multi-node run, {node} being the first node, e.g. '{node}i'. "
        "Default: the configured machine's (TITANENV_MACHINE; see `titanenv config show`)."))
    rdzv_port: int | None = field(default=None, metadata=option(
        "--rdzv-port", help="Rendezvous port. Default: 29500 + job id % 3000 (distinct for concurrent jobs)."))
    eod_token: str | None = field(default=None, metadata=option(
        "--eod-token", titan="--dataloader.eod-token",
        help="End-of-document token separating documents (GPU document masking). Default: the one recorded in "
        "DATA.manifest.json by preprocess."))
    preflight: bool = field(default=True, metadata=option(
        "--preflight/--no-preflight",
        help="Before torchrun, check on every node: GPUs, shared run folder, offline assets, rendezvous reachable."))
    preflight_timeout_s: float = field(default=120.0, metadata=option(
        "--preflight-timeout", help="Seconds the preflight waits for all nodes at the rendezvous."))
    resume_from: int | None = field(default=None, metadata=option(
        "--resume-from", cli_type=str | None, parse=_step, show=lambda step: f"step-{step}",
        help="Resume from this checkpoint (step-N under OUTPUT_DIR/checkpoint); no other folder may be newer "
        "(once a newer one is complete, e.g. on a requeue, the run resumes from that). "
        "Default: the newest complete checkpoint."))
    trust_unmarked: bool = field(default=False, metadata=option(
        "--trust-unmarked",
        help="With --resume-from: accept a checkpoint without titanenv's completion marker after checking its "
        "DCP .metadata and shard sizes, and mark it complete."))
    export_at_end: bool = field(default=False, metadata=option(
        "--export-at-end",
        help="When training reaches its final step, the first node writes the Hugging Face export of that "
        "checkpoint into OUTPUT_DIR/export/step-N (as `titanenv export`)."))
    extra: tuple[str, ...] = field(default=(), metadata=option(
        argument=True, cli_type=list[str] | None, cli_default=None, parse=_extra,
        help="Extra TorchTitan flags after '--', e.g. -- --debug.seed 0 --lr-scheduler.warmup-steps 10"))
    # fmt: on

    def argv(self) -> list[str]:
        """``titanenv train`` flags that reproduce these arguments (absolute paths; for a batch job)."""
        return argv(self)


@dataclass(frozen=True, kw_only=True)
class SubmitArgs:
    """The flags of ``titanenv train`` that shape ``--dry-run`` and ``--submit``; not part of the run."""

    # fmt: off
    dry_run: bool = field(default=False, metadata=option(
        "--dry-run",
        help="Print the torchrun command and exit without training. With --submit: print the sbatch script, "
        "the sbatch, srun and torchrun commands, and run `sbatch --test-only`."))
    submit: bool = field(default=False, metadata=option(
        "--submit",
        help="Render the sbatch script for the configured machine (`titanenv config show`) and submit it "
        "with these flags (on a login node). The job requeues itself at the time limit and resumes."))
    nodes: int = field(default=2, metadata=option("--nodes", help="With --submit: nodes to allocate."))
    time: str = field(default="02:00:00", metadata=option(
        "--time", help="With --submit: wall-clock limit (HH:MM:SS or D-HH:MM:SS)."))
    account: str | None = field(default=None, metadata=option(
        "--account", help="With --submit: Slurm account. Default: TITANENV_ACCOUNT."))
    partition: str | None = field(default=None, metadata=option(
        "--partition", help="With --submit: partition. Default: TITANENV_GPU_PARTITION."))
    max_requeues: int = field(default=10, metadata=option(
        "--max-requeues", help="With --submit: how often the job requeues itself after stopping at the time limit."))
    stop_before_limit: int = field(default=600, metadata=option(
        "--stop-before-limit",
        help="With --submit: seconds before the time limit to checkpoint and stop (--signal=B:USR1@N); "
        "must cover a step plus a checkpoint save."))
    dependency: str | None = field(default=None, metadata=option(
        "--dependency", help="With --submit: Slurm's --dependency for the job, e.g. afterok:1234 (after that job "
        "succeeded)."))
    # fmt: on
