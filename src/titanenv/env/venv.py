"""Lay titanenv's venv: online from the package index, or offline from a wheelhouse.

Steps, the same in both modes: create the venv (seeing the system site packages when the base
Python has torch, as in the NGC image); install the lock's selection hash-checked; install the
base layer (torch, triton) where the base Python lacks torch; install titanenv itself editable
and any pinned repository marked ``editable``. Offline adds ``--no-index`` and forbids source
builds, and first checks that the wheelhouse holds every requirement, naming each one missing.

uv installs when it is found (on PATH or in the base Python), because it is several times
faster; pip otherwise. The base layer always goes through pip, which honours the site's pip
configuration (for example an extra index with PyTorch's CPU wheels).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from titanenv.env.lockfile import Lock, Requirement, write_requirements
from titanenv.env.platforms import Platform
from titanenv.env.repos import PinnedRepo
from titanenv.env.wheelhouse import Wheelhouse, WheelhouseError

__all__ = ["LOCK_INSTALL", "InstallError", "SetUp", "base_python", "find_uv", "install", "install_command"]


LOCK_INSTALL = ["--no-deps", "--require-hashes", "-r"]
"""Arguments installing a requirements file written from the lock (followed by its path)."""


class InstallError(RuntimeError):
    """The venv could not be laid; the message names the step and the fix."""


def find_uv() -> list[str] | None:
    """The command that runs uv: ``uv`` on PATH, else ``python -m uv`` when this Python has it; None if neither."""
    if exe := shutil.which("uv"):
        return [exe]
    if importlib.util.find_spec("uv") is not None:
        return [sys.executable, "-m", "uv"]
    return None


def base_python() -> str:
    """The interpreter a venv is made from: this one, or its base interpreter when this one runs in a venv."""
    if sys.prefix == sys.base_prefix:
        return sys.executable
    for name in (f"python{sys.version_info[0]}.{sys.version_info[1]}", "python3"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.exists():
            return str(candidate)
    raise InstallError(
        f"this Python runs in a venv and its base interpreter is not in {sys.base_prefix}/bin; "
        "set TITANENV_PYTHON to a plain python3"
    )


@dataclass
class SetUp:
    """What to install, where, and from where."""

    root: Path
    """The titanenv repository (installed editable)."""
    venv: Path
    lock: Lock
    extras: list[str] = field(default_factory=lambda: ["train"])
    wheelhouse: Path | None = None
    """Offline source; None installs from the package index."""
    installer: str = "auto"
    """``auto`` (uv when found, else pip), ``uv`` or ``pip``."""
    python: str = field(default_factory=base_python)
    """The base Python the venv is made from."""
    repos: list[PinnedRepo] = field(default_factory=list)
    dry_run: bool = False


def install(s: SetUp, log: Callable[[str], None] = print) -> list[list[str]]:
    """Lay the venv described by ``s`` and return the commands run (or, with ``dry_run``, to run).

    Raises:
        InstallError: a step failed; WheelhouseError: offline and the wheelhouse lacks a requirement.
    """
    has_torch = _base_has_torch(s.python)
    extras = list(s.extras)
    if not has_torch and "train" in extras and "cpu" not in extras:
        extras.append("cpu")
        log("the base Python has no torch: adding the base layer " + " ".join(s.lock.base_pins()))
    reqs = s.lock.select(extras, Platform.host().marker_environment())
    if s.wheelhouse is not None:
        _check_wheelhouse(Wheelhouse(s.wheelhouse), reqs, s.lock, extras)
    uv = _installer(s)
    log(
        f"{'offline from ' + str(s.wheelhouse) if s.wheelhouse else 'online'}: venv {s.venv}, extras "
        f"{','.join(extras) or '(none)'}, {len(reqs)} locked packages, installer {'uv' if uv else 'pip'}"
    )
    commands: list[list[str]] = []
    venv_python = s.venv / "bin" / "python"
    if not venv_python.exists():
        commands.append([s.python, "-m", "venv", *(["--system-site-packages"] if has_torch else []), str(s.venv)])
    else:
        _check_existing_venv(s.venv, has_torch)
    reqfile = s.venv / "titanenv-requirements.txt"
    lock_step = len(commands)
    # The lock is the whole closure, so no resolving (--no-deps): torch, which torchtitan's dependencies
    # require, comes from the image or from the base-layer step that follows.
    commands.append(install_command(uv, venv_python, s.wheelhouse, LOCK_INSTALL + [str(reqfile)]))
    if "cpu" in extras and s.lock.base:
        commands.append(install_command(None, venv_python, s.wheelhouse, s.lock.base_pins()))
    for path in [s.root, *(r.path for r in s.repos if r.editable)]:
        args = ["--no-deps", "--no-build-isolation", "-e", str(path)]
        commands.append(install_command(uv, venv_python, s.wheelhouse, args, binary_only=False))
    commands.append([str(venv_python), "-c", "import titanenv"])
    if s.dry_run:
        return commands
    extra_hashes = Wheelhouse(s.wheelhouse).built_hashes() if s.wheelhouse else {}
    for i, cmd in enumerate(commands):
        if i == lock_step:  # the venv exists now; keep the exact selection in it for the record
            write_requirements(reqs, reqfile, extra_hashes)
        _run(cmd)
    return commands


def _installer(s: SetUp) -> list[str] | None:
    if s.installer == "pip":
        return None
    uv = find_uv()
    if s.installer == "uv" and uv is None:
        raise InstallError("--installer uv: uv is neither on PATH nor installed in " + sys.executable)
    return uv


def install_command(
    uv: list[str] | None, venv_python: Path, wheelhouse: Path | None, args: list[str], binary_only: bool = True
) -> list[str]:
    """The uv (``uv`` given) or pip command installing ``args`` into ``venv_python``'s venv.

    With a ``wheelhouse`` nothing comes from an index and, unless ``binary_only`` is False (for
    titanenv's own editable install), nothing is built from source.
    """
    if uv:
        cmd = [*uv, "pip", "install", "--python", str(venv_python)]
        if wheelhouse:
            cmd += ["--offline", "--no-index", "--find-links", str(wheelhouse)] + (
                ["--no-build"] if binary_only else []
            )
    else:
        cmd = [str(venv_python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"]
        if wheelhouse:
            cmd += ["--no-index", "--find-links", str(wheelhouse)] + (["--only-binary=:all:"] if binary_only else [])
    return cmd + args


def _check_wheelhouse(wh: Wheelhouse, reqs: list[Requirement], lock: Lock, extras: list[str]) -> None:
    if not wh.path.is_dir():
        raise WheelhouseError(
            f"no wheelhouse at {wh.path}; make it on a node with internet with "
            f"`env/set_up.sh download --platform host{''.join(' --extra ' + e for e in extras)}`"
        )
    missing = [r.pin for r in wh.missing(reqs)]
    have = {name for name, _ in wh.index()}
    missing += [pin for pin in (lock.base_pins() if "cpu" in extras else []) if pin.split("==")[0] not in have]
    if missing:
        stale = wh.manifest().get("lock_sha256") not in (None, lock.sha256)
        raise WheelhouseError(
            f"wheelhouse {wh.path} lacks {len(missing)} requirement(s): {', '.join(missing)}"
            + ("\n  it was made from an older lock;" if stale else "\n ")
            + f" refill it with `env/set_up.sh download --platform host{''.join(' --extra ' + e for e in extras)}`"
        )


def _check_existing_venv(venv: Path, has_torch: bool) -> None:
    cfg = venv / "pyvenv.cfg"
    text = cfg.read_text() if cfg.is_file() else ""
    sees_system = "include-system-site-packages = true" in text
    if has_torch and not sees_system:
        raise InstallError(
            f"{venv} does not see the system site packages, so it would not use the container's torch; "
            f"remove it (rm -rf {venv}) and run set-up again"
        )


def _base_has_torch(python: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec("torch") is not None
    return (
        subprocess.run(
            [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"]
        ).returncode
        == 0
    )


def _run(cmd: list[str]) -> None:
    env = dict(os.environ)
    # NGC images set PIP_CONSTRAINT to pin their own stack; the lock decides for the packages it names.
    env.pop("PIP_CONSTRAINT", None)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    if env.get("TITANENV_SCRATCH_DIR"):  # uv's cache defaults to $HOME, which is small on HPC systems
        env.setdefault("UV_CACHE_DIR", str(Path(env["TITANENV_SCRATCH_DIR"]) / "cache" / "uv"))
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise InstallError(f"step failed (exit {proc.returncode}): {' '.join(cmd)}")
