"""``titanenv container``: check, render, build, verify and activate the image; shell and exec in it.

Register on the main app with ``app.add_typer(container_cli.app, name="container")``.
``build`` and ``activate`` are the same code as ``container/build_container.sh`` and
``container/move_built_container_to_active.sh``, which also work before titanenv is installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, cast

import typer

from titanenv import config
from titanenv.container import activate as activate_mod
from titanenv.container import build as build_mod
from titanenv.container import client as client_mod
from titanenv.container import render as render_mod
from titanenv.container import verify as verify_mod
from titanenv.container.spec import shipped_specs
from titanenv.container.validate import check_file
from titanenv.env.lockfile import Lock

__all__ = ["app"]


def _root() -> Path:
    """The repository: ``TITANENV_ROOT`` (set inside the image by container_run.sh), else this checkout."""
    return Path(os.environ.get("TITANENV_ROOT") or Path(__file__).resolve().parents[3])


app = typer.Typer(
    help="The Apptainer image: check, render, build, activate; shell and exec in it.", no_args_is_help=True
)


@app.command()
def check(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Apptainer definition file.")],
    build_arg: Annotated[
        list[str] | None, typer.Option("--build-arg", help="KEY=VALUE, as given to apptainer build.")
    ] = None,
) -> None:
    """Validate a definition by Apptainer 1.4/1.5's parser rules; print FILE:LINE for each problem."""
    args = dict(a.split("=", 1) for a in build_arg or [] if "=" in a)
    problems = check_file(file, args)
    for p in problems:
        typer.echo(p.format(file), err=True)
    errors = sum(p.severity == "error" for p in problems)
    if errors:
        raise typer.Exit(1)
    typer.echo(f"{file}: ok" + (f" ({len(problems)} warning(s))" if problems else ""))


@app.command()
def render(
    out: Annotated[Path | None, typer.Option(help="Folder to write the definitions to (default: container/).")] = None,
    check_only: Annotated[
        bool, typer.Option("--check", help="Only report definitions that differ from a fresh render.")
    ] = False,
) -> None:
    """Render the shipped definitions (x86_64 and aarch64, online and offline) from the lock."""
    out = out or _root() / "container"
    specs = shipped_specs(Lock.read(_root() / "env" / "requirements.lock"))
    if check_only:
        stale = [
            s.filename
            for s in specs
            if not (out / s.filename).is_file() or (out / s.filename).read_text() != render_mod.render(s)
        ]
        if stale:
            typer.echo(f"out of date in {out}: {', '.join(stale)}; run `titanenv container render`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out}: definitions up to date")
        return
    for path in render_mod.write(specs, out):
        typer.echo(f"wrote {path}")


@app.command()
def build(
    mode: Annotated[str, typer.Argument(help="online, download or offline.")] = "online",
    arch: Annotated[str | None, typer.Option(help="x86_64 or aarch64 (default: this machine's).")] = None,
    wheelhouse: Annotated[Path | None, typer.Option(help="Wheel folder (default: under TITANENV_SCRATCH_DIR).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the steps; change nothing.")] = False,
) -> None:
    """Build the image into staging (same as container/build_container.sh)."""
    argv = [
        mode,
        *(["--arch", arch] if arch else []),
        *(["--wheelhouse", str(wheelhouse)] if wheelhouse else []),
        *(["--dry-run"] if dry_run else []),
    ]
    _site_environment()
    raise typer.Exit(build_mod.main(argv))


@app.command()
def activate(
    staged: Annotated[Path | None, typer.Argument(help="Image to activate (default: newest finished build).")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Swap the previous image back in.")] = False,
) -> None:
    """Make a staged image active, keeping the previous one (same as move_built_container_to_active.sh)."""
    _site_environment()
    raise typer.Exit(activate_mod.main([*([str(staged)] if staged else []), *(["--rollback"] if rollback else [])]))


@app.command()
def verify(
    image: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Built image (.sif).")],
    definition: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Compare with this file (default: container/*.def, rendered)."),
    ] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="Also import every recorded package inside (exec --nv).")
    ] = False,
    runtime: Annotated[
        str | None,
        typer.Option(help="apptainer, singularity or auto (default: TITANENV_CONTAINER_RUNTIME, else auto)."),
    ] = None,
) -> None:
    """Check a built image: its embedded definition against the rendered .def (sha256), its labels against the pins."""
    lock = Lock.read(_root() / "env" / "requirements.lock")
    try:
        name = client_mod.find_runtime(runtime or os.environ.get("TITANENV_CONTAINER_RUNTIME") or "auto")
        verdict = verify_mod.verify(image, lock, name, definition)
        for problem in verdict.problems:
            typer.echo(f"titanenv container verify: {problem}", err=True)
        if not verdict.ok:
            raise typer.Exit(1)
        typer.echo(f"{image}: definition {verdict.definition} (sha256 {verdict.sha256[:12]}), labels match the pins")
        if smoke:
            # a verified image has its arch label (verify compares it); passed on as before
            typer.echo(verify_mod.smoke(image, lock, name, _root(), cast(str, verdict.arch)))
    except client_mod.ClientError as e:
        typer.echo(f"titanenv container verify: error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command()
def shell(
    online: Annotated[bool, typer.Option("--online", help="Keep the network (TITANENV_OFFLINE=0).")] = False,
) -> None:
    """Open an interactive shell in the image, with the venv and the offline environment."""
    _container_run([], online)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    ctx: typer.Context,
    online: Annotated[bool, typer.Option("--online", help="Keep the network (TITANENV_OFFLINE=0).")] = False,
) -> None:
    """Run a command in the image: titanenv container exec [--online] -- COMMAND [ARG...]."""
    if not ctx.args:
        typer.echo("titanenv container exec: give a command, e.g. `titanenv container exec -- python -V`", err=True)
        raise typer.Exit(2)
    _container_run(list(ctx.args), online)


def _container_run(command: list[str], online: bool) -> None:
    """Replace this process with container_run.sh, so arguments, exit status and signals pass through."""
    script = _root() / "container_run.sh"
    env = dict(os.environ)
    env.pop("_TITANENV_INSIDE", None)  # a shell opened from inside must re-enter the image
    if online:
        env["TITANENV_OFFLINE"] = "0"
    sys.stdout.flush()
    os.execve(script, [str(script), *command], env)


def _site_environment() -> None:
    """Export configuration.sh's values, as the shell scripts do, for the standard-library build code."""
    resolved = config.load()
    os.environ.update(resolved.config.job_environment())
