"""``env/set_up.sh MODE``: the command line of the environment set-up (standard library only).

``env/set_up.sh`` sources ``configuration.sh`` and runs this module with the plain ``python3``
of the machine (or of the image): titanenv's dependencies are not installed yet, which is why
the whole ``titanenv.env`` package uses the standard library only. ``install`` and ``offline``
lay the venv inside the configured container, so they re-enter through ``container_run.sh``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from titanenv.env import lockfile, repos, venv, wheelhouse
from titanenv.env.platforms import ARCHES, BASE_IMAGE, Platform

__all__ = ["main", "parser"]

PROG = "env/set_up.sh"
MODES = {
    "install": "lay the venv from the package index, hash-checked against the lock (default)",
    "download": "fetch the wheels a target platform needs into a wheelhouse (needs internet)",
    "offline": "lay the venv from a wheelhouse: no index, no source builds, nothing from the network",
    "update": "move the pinned git repositories (env/pinned_repos.txt) to their pinned commits",
    "lock": "regenerate env/requirements.lock from pyproject.toml (needs uv)",
}
_REENTER = {"install": "0", "offline": "1"}  # mode -> TITANENV_OFFLINE inside the runtime


def parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` lists every mode and option."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Set up titanenv's Python environment, online, from a wheelhouse fetched ahead, or offline.",
        epilog="modes:\n" + "\n".join(f"  {m:<9} {h}" for m, h in MODES.items()) + "\n\n"
        "examples:\n"
        "  env/set_up.sh install --dev                      # login node, online\n"
        "  env/set_up.sh download --platform x86_64         # wheels for the JUWELS/JURECA image\n"
        "  env/set_up.sh download --platform host           # wheels for this machine's venv\n"
        "  env/set_up.sh offline                            # no network needed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", nargs="?", default="install", choices=list(MODES), help="what to do (default: install)")
    p.add_argument(
        "--extras",
        default="train,eval",
        help="comma-separated extras of pyproject.toml (default: train,eval; 'none' for titanenv's own dependencies)",
    )
    p.add_argument("--dev", action="store_true", help="also install the test tools (extra 'dev')")
    p.add_argument(
        "--platform",
        default="host",
        choices=["host", *ARCHES],
        help=f"download: the target; x86_64/aarch64 mean the image's Python {BASE_IMAGE.python} "
        f"and glibc {BASE_IMAGE.glibc}",
    )
    p.add_argument("--python", help="download: target Python version MAJOR.MINOR (overrides --platform's)")
    p.add_argument("--glibc", help="download: target glibc version MAJOR.MINOR (overrides --platform's)")
    p.add_argument(
        "--wheelhouse",
        type=Path,
        help="wheel folder (default: $TITANENV_SCRATCH_DIR/wheelhouse/cpXY-ARCH of the target)",
    )
    p.add_argument(
        "--build-sdists",
        action="store_true",
        help="download: build pure-Python wheels here for requirements the index has no wheel for",
    )
    p.add_argument(
        "--installer", default="auto", choices=["auto", "uv", "pip"], help="install/offline: uv is used when found"
    )
    p.add_argument("--lock", type=Path, help="lock file (default: env/requirements.lock)")
    p.add_argument("--repos", type=Path, help="pinned repositories (default: env/pinned_repos.txt)")
    p.add_argument("--external", type=Path, help="folder of the pinned repositories' checkouts (default: external/)")
    p.add_argument("--dry-run", action="store_true", help="print what would be run; download, build and change nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one mode; returns the exit status (0 ok, 1 failed, 2 usage)."""
    args = parser().parse_args(argv)
    root = Path(os.environ.get("TITANENV_ROOT") or Path(__file__).resolve().parents[3])
    if args.mode in _REENTER and os.environ.get("_TITANENV_INSIDE") != "1":
        return _reenter(root, args, list(sys.argv[1:] if argv is None else argv))
    try:
        return _run(root, args)
    except (lockfile.LockError, wheelhouse.WheelhouseError, venv.InstallError, repos.RepoError, ValueError) as e:
        print(f"{PROG} {args.mode}: error: {e}", file=sys.stderr)
        return 1


def _run(root: Path, args: argparse.Namespace) -> int:
    lock_path = args.lock or root / "env" / "requirements.lock"
    repos_file = args.repos or root / "env" / "pinned_repos.txt"
    external = args.external or root / "external"
    if args.mode == "lock":
        uv = venv.find_uv()
        if uv is None:
            raise venv.InstallError("uv is not installed: `pip install uv` (the pin is in pyproject.toml's dev extra)")
        cmd = lockfile.generate(root, lock_path, uv, dry_run=args.dry_run)
        _say(("would run: " if args.dry_run else "ran: ") + " ".join(cmd))
        if not args.dry_run:
            _say(f"wrote {lock_path}")
        return 0
    if args.mode == "update":
        pinned = repos.read_pinned(repos_file, external)
        if not pinned:
            _say(f"no pinned repositories in {repos_file}")
        for repo in pinned:
            _say(repos.update(repo, dry_run=args.dry_run, log=_say))
        return 0
    lock = lockfile.Lock.read(lock_path)
    extras = _extras(args)
    if args.mode == "download":
        target = _target(args)
        dest = args.wheelhouse or _default_wheelhouse(target)
        _say(f"download: {target.tag} (glibc <= {target.glibc}), extras {','.join(extras) or '(none)'} -> {dest}")
        report = wheelhouse.download(
            lock, extras, target, dest, build_sdists=args.build_sdists, dry_run=args.dry_run, log=_say
        )
        for cmd in report.commands if args.dry_run else []:
            _say("would run: " + " ".join(cmd))
        if not args.dry_run:
            built = f"; built from sdists: {', '.join(report.built)}" if report.built else ""
            _say(f"{report.wheels} wheels in {dest}{built}")
        return 0
    offline = args.mode == "offline"
    setup = venv.SetUp(
        root=root,
        venv=Path(_env("TITANENV_VENV")),
        lock=lock,
        extras=extras,
        wheelhouse=(args.wheelhouse or _default_wheelhouse(Platform.host())) if offline else None,
        installer=args.installer,
        repos=repos.read_pinned(repos_file, external),
        dry_run=args.dry_run,
    )
    commands = venv.install(setup, log=_say)
    if args.dry_run:
        for cmd in commands:
            _say("would run: " + " ".join(cmd))
    else:
        _say("done; run commands with ./container_run.sh COMMAND")
    return 0


def _reenter(root: Path, args: argparse.Namespace, argv: list[str]) -> int:
    """Run this mode again inside the configured runtime, through container_run.sh."""
    env = dict(os.environ, TITANENV_NO_VENV="1", TITANENV_OFFLINE=_REENTER[args.mode])
    if args.wheelhouse:
        env["TITANENV_BIND"] = ",".join(filter(None, [env.get("TITANENV_BIND"), str(args.wheelhouse.resolve())]))
    cmd = [str(root / "container_run.sh"), "bash", str(root / "env" / "set_up.sh"), *argv]
    os.execve(cmd[0], cmd, env)
    return 1  # not reached


def _extras(args: argparse.Namespace) -> list[str]:
    extras = [e.strip() for e in args.extras.split(",") if e.strip() and e.strip() != "none"]
    if args.dev and "dev" not in extras:
        extras.append("dev")
    return extras


def _target(args: argparse.Namespace) -> Platform:
    if args.platform == "host":
        host = Platform.host()
        return Platform(host.arch, args.python or host.python, args.glibc or host.glibc)
    return Platform(args.platform, args.python or BASE_IMAGE.python, args.glibc or BASE_IMAGE.glibc)


def _default_wheelhouse(target: Platform) -> Path:
    return Path(_env("TITANENV_SCRATCH_DIR")) / "wheelhouse" / target.tag


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{name} is not set: run through env/set_up.sh, which reads configuration.sh")
    return value


def _say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)
