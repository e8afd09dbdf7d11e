"""``titanenv assets fetch|verify|pack|unpack`` (:data:`app`) and ``titanenv doctor`` (:func:`doctor`).

Register them on the root app::

    app.add_typer(assets_cli.app, name="assets")
    app.command("doctor")(assets_cli.doctor)

Errors a user can fix print one ``error:`` line and exit 2; a fetch with failures, a verify with
problems and a doctor with missing assets exit 1.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from titanenv import config as configlib
from titanenv import offline
from titanenv.assets import cache, lockfile, spec
from titanenv.assets import plan as planlib
from titanenv.assets.files import redact
from titanenv.assets.lmeval import TaskCheck

app = typer.Typer(help="Offline assets: fetch on a login node, lock, verify, pack, unpack.", no_args_is_help=True)

AssetsArg = Annotated[
    Path | None, typer.Argument(help="Asset list (TOML), e.g. examples/assets.toml.", show_default=False)
]
LockOpt = Annotated[
    Path | None,
    typer.Option(
        "--lock",
        help="Lockfile. Default: NAME.lock.json beside the asset list, else HF_HOME/titanenv/assets.lock.json.",
    ),
]


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """User mistakes (bad file, missing lock, unsafe archive, offline fetch) as one line and exit 2."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as e:  # our errors subclass these; OfflineError is a RuntimeError
        typer.echo(f"error: {redact(str(e))}", err=True)
        raise typer.Exit(2) from None


def _home() -> Path:
    """``HF_HOME``: from the environment (container_run.sh sets it), else from the site configuration."""
    if not os.environ.get("HF_HOME"):
        with contextlib.suppress(configlib.ConfigError):
            os.environ["HF_HOME"] = str(configlib.load().config.hf_home)
    return cache.hf_home()


def _size(text: str | None) -> int | None:
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise typer.BadParameter(f"{text!r}: give bytes or a size like 500M, 4G, 4GiB", param_hint="--part-size")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def _plan(assets: Path | None, add: list[str], task_path: list[Path]) -> tuple[spec.AssetList | None, planlib.Plan]:
    asset_list = spec.load(assets) if assets else None
    if asset_list is None and not add:
        raise spec.AssetListError("nothing to do: give an asset list file, or --add KEY")
    return asset_list, planlib.build(asset_list, add, task_path)


@app.command()
def fetch(
    assets: AssetsArg = None,
    add: Annotated[
        list[str],
        typer.Option(
            "--add",
            help="Also fetch this asset key: model:ORG/NAME[@REV], tokenizer:..., "
            "dataset:ORG/NAME[?name=CFG&split=S&revision=R], metric:NAME, nltk:NAME, task:NAME.",
        ),
    ] = [],  # noqa: B006
    only: Annotated[
        list[str], typer.Option("--only", help="Fetch only this key (or every asset of task:NAME); repeatable.")
    ] = [],  # noqa: B006
    lock: LockOpt = None,
    summary: Annotated[
        Path | None, typer.Option("--summary", help="Summary file. Default: NAME.summary.json beside the lockfile.")
    ] = None,
    task_path: Annotated[
        list[Path], typer.Option("--task-path", help="Folder of custom lm-eval task YAML files.")
    ] = [],  # noqa: B006
    jobs: Annotated[int, typer.Option(help="Assets downloaded at once.")] = 4,
    retries: Annotated[int, typer.Option(help="Attempts per asset on network or server errors.")] = 3,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Re-resolve revisions instead of the locked commits.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be fetched (lm-eval tasks expanded) and exit.")
    ] = False,
) -> None:
    """Download every asset into HF_HOME (login node), then write the lockfile and a summary.

    Models and tokenizers come with snapshot_download; datasets are loaded once with the same
    arguments a job uses, so the Arrow cache for an offline load_dataset exists; lm-eval tasks
    are expanded into their datasets, metrics and nltk data. A rerun resumes. Exit 1 if any
    asset failed or is unsupported.
    """
    from titanenv.assets import fetch as fetchlib

    with _user_errors():
        home = _home()
        _, plan = _plan(assets, add, task_path)
        plan = plan.select(only)
        if dry_run:
            for key, p in plan.items.items():
                typer.echo(f"{key}    <- {', '.join(p.origins)}")
            for key, why in plan.unsupported.items():
                typer.echo(f"{key}    UNSUPPORTED: {why}")
            for name, leaves in plan.tasks.items():
                typer.echo(f"task:{name}    = {len(leaves)} lm-eval tasks: {' '.join(leaves)}")
            typer.echo(f"{len(plan.items)} assets into HF_HOME={home}; {len(plan.unsupported)} unsupported")
            return
        lock_path = lock or lockfile.default_path(assets, home)
        summary_path = summary or fetchlib.summary_path_for(lock_path)
        outcomes = fetchlib.run(
            plan, home, lock_path, summary_path, fetchlib.Options(jobs=jobs, retries=retries, refresh=refresh)
        )
    bad = [o for o in outcomes if o.status in ("failed", "unsupported")]
    for o in bad:
        typer.echo(f"{o.status.upper()} {o.key}: {o.error}", err=True)
    typer.echo(
        f"{len(outcomes) - len(bad)} of {len(outcomes)} assets in HF_HOME={home}; "
        f"lockfile {lock_path}; summary {summary_path}"
    )
    if bad:
        raise typer.Exit(1)


@app.command()
def verify(
    assets: AssetsArg = None,
    lock: LockOpt = None,
    jobs: Annotated[int, typer.Option(help="Files hashed at once.")] = 2,
) -> None:
    """Re-hash every locked file in HF_HOME (offline) and name each missing or changed one. Exit 1 on any."""
    from titanenv.assets.verify import verify as verify_lock

    with _user_errors():
        home = _home()
        lock_path = lock or lockfile.default_path(assets, home)
        locked = lockfile.read(lock_path)
        problems = verify_lock(locked, home, jobs)
    for p in problems:
        typer.echo(f"BAD {p}", err=True)
    files = sum(len(a.files) for a in locked.assets)
    typer.echo(
        f"{files - len(problems)} of {files} files intact ({len(locked.assets)} assets, {lock_path}, HF_HOME={home})"
    )
    if problems:
        raise typer.Exit(1)


@app.command()
def pack(
    out: Annotated[Path, typer.Option("--out", help="Folder for the archive parts, lockfile, summary and manifest.")],
    assets: AssetsArg = None,
    lock: LockOpt = None,
    name: Annotated[str, typer.Option(help="Archive name (file name stem).")] = "assets",
    part_size: Annotated[
        str | None, typer.Option("--part-size", help="Split into parts of this size, e.g. 4G. Default: one part.")
    ] = None,
    level: Annotated[int, typer.Option(help="zstd compression level.")] = 3,
) -> None:
    """Pack the locked files of HF_HOME into tar+zstd parts with checksums, lockfile and summary."""
    from titanenv.assets import fetch as fetchlib
    from titanenv.assets import pack as packlib

    with _user_errors():
        home = _home()
        lock_path = lock or lockfile.default_path(assets, home)
        manifest = packlib.pack(
            lock_path, home, out, name, _size(part_size), level, fetchlib.summary_path_for(lock_path)
        )
    size = sum(p.size for p in manifest.parts)
    typer.echo(
        f"{manifest.files} files ({manifest.bytes / 1e6:.1f} MB) packed into {len(manifest.parts)} part(s), "
        f"{size / 1e6:.1f} MB, in {out}"
    )


@app.command()
def unpack(
    src: Annotated[Path, typer.Argument(help="Folder written by `titanenv assets pack`.")],
    name: Annotated[str | None, typer.Option(help="Archive name, when the folder holds several.")] = None,
) -> None:
    """Verify the parts, unpack them safely into HF_HOME, then verify every file. Idempotent; a rerun
    completes an interrupted one."""
    from titanenv.assets import unpack as unpacklib

    with _user_errors():
        home = _home()
        manifest, problems, already = unpacklib.unpack(src, home, name)
    for p in problems:
        typer.echo(f"BAD {p}", err=True)
    state = "was already unpacked" if already else "unpacked"
    intact = "all files intact" if not problems else f"{len(problems)} bad files"
    typer.echo(f"{manifest.name}: {state} into HF_HOME={home}; {intact}")
    if problems:
        raise typer.Exit(1)


def doctor(
    assets: AssetsArg = None,
    offline_check: Annotated[
        bool,
        typer.Option("--offline", help="Resolve with the network cut; always on, the flag says so at the call site."),
    ] = True,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer the job uses (Hub id, tokenizer.json or folder).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model the job loads (Hub id or folder).")] = None,
    data: Annotated[list[str], typer.Option("--data", help="Tokenized data prefix the job reads; repeatable.")] = [],  # noqa: B006
    task: Annotated[
        list[str], typer.Option("--task", help="lm-eval task, group or tag the job runs; repeatable.")
    ] = [],  # noqa: B006
    task_path: Annotated[
        list[Path], typer.Option("--task-path", help="Folder of custom lm-eval task YAML files.")
    ] = [],  # noqa: B006
    isolation: Annotated[
        str, typer.Option(help="auto (unshare -n where permitted, else socket guard), unshare, or guard.")
    ] = "auto",
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also list every offline variable the check runs with.")
    ] = False,
    check_tasks: Annotated[
        bool,
        typer.Option(
            "--check-tasks",
            help="Also build every lm-eval task offline (its dataset, first example, metrics and nltk data) "
            "and list each task that fails, with the command that fetches it.",
        ),
    ] = False,
) -> None:
    """Prove a job's assets resolve offline: tokenizer, training data, model, eval tasks and the asset list.

    Each is loaded as the job loads it, in a process with the offline environment and the network
    cut (unshare -n, else a socket guard). Every missing asset is printed with the command that
    fetches it. With --check-tasks, every lm-eval task is also built by lm-eval itself, offline,
    and a table lists each one that fails. Exit 1 if any asset is missing or any task fails.
    """
    from titanenv.assets import doctor as doctorlib

    if isolation not in ("auto", "unshare", "guard"):
        raise typer.BadParameter("use auto, unshare or guard", param_hint="--isolation")
    with _user_errors():
        home = _home()
        asset_list = spec.load(assets) if assets else None
        exp = asset_list.experiment if asset_list else spec.Experiment()
        exp = spec.Experiment(
            tokenizer=tokenizer or exp.tokenizer,
            model=model or exp.model,
            data=[*exp.data, *data],
            eval_tasks=[*exp.eval_tasks, *task],
        )
        add = [f"tokenizer:{v}" for v in (tokenizer,) if v and planlib.is_hub_id(v)]
        add += [f"model:{v}" for v in (model,) if v and planlib.is_hub_id(v)] + [f"task:{t}" for t in task]
        plan = planlib.build(asset_list, add, task_path)
        if not (exp.tokenizer or exp.model or exp.data or plan.items or plan.unsupported):
            raise spec.AssetListError("nothing to check: give an asset list, or --tokenizer, --data, --model or --task")
        findings, how = doctorlib.diagnose(exp, plan, assets, home, isolation)  # type: ignore[arg-type]
        task_checks = _check_tasks(asset_list, exp, task_path, isolation) if check_tasks else []
    typer.echo(f"Offline mode: {how}; HF_HOME={home}")
    if verbose:
        env = dict(os.environ)
        offline.apply(env)
        for line in offline.describe(env):
            typer.echo(line)
    for f in findings:
        typer.echo(f"{'ok     ' if f.ok else 'MISSING'} {f.label}: {f.detail}")
        if f.fix:
            typer.echo(f"        fetch: {f.fix}" if f.fix.startswith(doctorlib.FETCH) else f"        fix: {f.fix}")
    missing = [f for f in findings if not f.ok]
    typer.echo(
        f"{len(findings) - len(missing)} of {len(findings)} assets resolve offline"
        + (f"; {len(missing)} missing" if missing else "")
    )
    failed = [c for c in task_checks if not c.ok]
    if check_tasks:
        _print_failed_tasks(failed)
        typer.echo(
            f"{len(task_checks) - len(failed)} of {len(task_checks)} lm-eval tasks build offline"
            + (f"; {len(failed)} fail" if failed else "")
        )
    if missing or failed:
        raise typer.Exit(1)


def _check_tasks(
    asset_list: spec.AssetList | None, exp: spec.Experiment, task_path: list[Path], isolation: str
) -> list[TaskCheck]:
    """``--check-tasks``: every lm-eval task of the asset list and ``--task``, built offline."""
    from titanenv.assets import doctor as doctorlib

    names = [*(asset_list.lm_eval.all_tasks() if asset_list else []), *exp.eval_tasks]
    if not names:
        raise spec.AssetListError("--check-tasks: no lm-eval tasks; name them in [lm_eval] tasks or with --task")
    paths = [*(asset_list.lm_eval.include_path if asset_list else []), *task_path]
    prefix, _ = doctorlib.isolation(isolation)  # type: ignore[arg-type]
    return doctorlib.check_tasks_offline(list(dict.fromkeys(names)), list(dict.fromkeys(paths)), prefix)


def _print_failed_tasks(failed: list[TaskCheck]) -> None:
    if not failed:
        return
    table = Table("task", "reason", "fix", title="lm-eval tasks that do not build offline", title_justify="left")
    for c in failed:
        table.add_row(escape(c.name), escape(c.reason), escape(c.fix))
    console = Console()
    if not console.is_terminal:  # a log or a pipe: whole lines, so each fix stays one command
        console = Console(width=10_000)
    console.print(table)
