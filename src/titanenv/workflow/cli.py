"""``titanenv workflow``: typer command; its options are generated from :class:`~titanenv.workflow.WorkflowConfig`.

One option per setting, named like the config-file key (``seq_len`` -> ``--seq-len``), so a file and
the flags say the same things; a flag given wins over the file.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from titanenv import workflow as wf

__all__ = ["workflow"]

_SKIP = {"torchtitan"}  # a table of TorchTitan flags: config file only, or after `--`


def _option(name: str, info: Any) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    annotation = info.annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    help_text = (info.description or "").strip().replace("``", "") or name.replace("_", " ")
    if annotation is bool:
        opt = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text)
        cli_type: Any = bool | None
    elif origin is list and args and args[0] is Path:
        opt = typer.Option(flag, help=help_text + " Repeatable.")
        cli_type = list[Path] | None
    elif origin is list:
        opt = typer.Option(flag, help=help_text + " Comma-separated.")
        cli_type = str | None
    elif origin is typing.Literal or (args and typing.get_origin(args[0]) is typing.Literal):
        opt = typer.Option(flag, help=help_text)
        cli_type = str | None
    else:
        opt = typer.Option(flag, help=help_text)
        cli_type = annotation if type(None) in args else annotation | None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[cli_type, opt])


def _run(
    config_file: Path | None, only: str | None, dry_run: bool, extra: list[str] | None, flags: dict[str, Any]
) -> None:
    for name, info in wf.WorkflowConfig.model_fields.items():
        value = flags.get(name)
        origin = typing.get_origin(info.annotation)
        if origin is list and isinstance(value, str):
            try:
                flags[name] = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise typer.BadParameter(f"{value!r}: comma-separated integers", param_hint=f"--{name}") from None
    if extra:
        flags["torchtitan"] = _torchtitan(extra)
    stages = tuple(s.strip() for s in (only or ",".join(wf.STAGES)).split(",") if s.strip())
    bad = [s for s in stages if s not in wf.STAGES]
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)}: choose from {', '.join(wf.STAGES)}", param_hint="--only")
    try:
        config = wf.load_config(config_file, flags)
        plan = wf.plan(config, only=stages)
    except wf.WorkflowError as e:
        raise typer.BadParameter(str(e), param_hint="--config-file/flags") from None
    say = typer.echo
    say(f"workflow: {', '.join(config.models)} on {plan.data}{' (from --raw-data)' if config.raw_data else ''}; "
        f"{'local' if config.local else 'Slurm jobs'}; outputs under {config.output_dir.absolute()}")  # fmt: skip
    if config.local:
        if dry_run:
            say(plan.text())
            return
        wf.save(plan)
        rc = wf.run_local(plan, say)
        if rc:
            raise typer.Exit(code=rc)
        _summary(plan, say)
        return
    from titanenv import config as configlib

    site = configlib.load(strict=True)
    try:
        ids = wf.submit_chain(plan, site, say, dry_run=dry_run)
    except (wf.WorkflowError, RuntimeError, FileNotFoundError) as e:
        typer.echo(f"titanenv workflow: {e}", err=True)
        raise typer.Exit(code=1) from None
    if not dry_run:
        say("jobs: " + ", ".join(f"{k} {v}" for k, v in ids.items()))
        say(f"report (when the last job ends): {plan.report / 'report.md'}")


def _torchtitan(extra: list[str]) -> dict[str, Any]:
    """``-- --a.b 1 --c`` -> ``{"a.b": "1", "c": True}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        key = extra[i]
        if not key.startswith("--"):
            raise typer.BadParameter(f"{key!r}: expected a TorchTitan flag (--name)", param_hint="extra")
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            out[key[2:]] = extra[i + 1]
            i += 2
        else:
            out[key[2:]] = True
            i += 1
    return out


def _summary(plan: wf.Plan, say: Any) -> None:
    say("outputs:")
    say(f"  data:    {plan.data}.bin/.idx" + (f", validation {plan.val}.bin/.idx" if plan.val else ""))
    for model, run in plan.runs.items():
        say(f"  {model + ':':8} {run}  (checkpoints, tb/, eval/)")
    say(f"  report:  {plan.report / 'report.md'}, {plan.report / 'report.png'}")
    spec = ",".join(f"{m}:{r / 'tb'}" for m, r in plan.runs.items())
    say(f"  compare: tensorboard --logdir_spec={spec}")


def _body(**kwargs: Any) -> None:
    """Raw text to an Infini-attention Llama trained beside its baseline, compared (TensorBoard and a report).

    Chains preprocess, train (baseline, Infini, or both), eval (validation loss by position,
    passkey retrieval) and the report: as Slurm jobs with --dependency=afterok (printing the job
    ids), or here with --local. Settings come from the flags and --config-file (TOML or YAML, the
    same names; flags win; an unknown key is an error); TorchTitan flags go after `--`. Checks the
    tokenizer, the data and the settings before anything runs; --dry-run prints the whole chain.
    """
    config_file = kwargs.pop("config_file")
    only = kwargs.pop("only")
    dry_run = kwargs.pop("dry_run")
    extra = kwargs.pop("extra")
    _run(config_file, only, bool(dry_run), extra, kwargs)


def _command() -> Any:
    params = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Path | None, typer.Option("--config-file", help="TOML or YAML file of these settings (keys as the "
                                      "flags, e.g. seq-len = 256; a 'torchtitan' table of TorchTitan flags).")]),
        inspect.Parameter("only", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            str | None, typer.Option("--only", help="Run only these stages: preprocess,train,eval,report.")]),
        inspect.Parameter("dry_run", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--dry-run", help="Print the whole chain; run, write and submit nothing.")]),
        *[_option(n, i) for n, i in wf.WorkflowConfig.model_fields.items() if n not in _SKIP],
        inspect.Parameter("extra", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            list[str] | None, typer.Argument(help="TorchTitan flags for both trainings after '--'.")]),
    ]  # fmt: skip

    def workflow(**kwargs: Any) -> None:
        _body(**kwargs)

    workflow.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    workflow.__doc__ = _body.__doc__
    return workflow


workflow = _command()
"""``titanenv workflow`` (typer command; callable with the same keyword arguments)."""
