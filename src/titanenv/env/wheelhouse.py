"""A wheelhouse: every wheel a target platform needs, fetched on a node with internet.

``download`` asks pip for wheels only (``--only-binary=:all:``) for the target's Python,
architecture and glibc, hash-checked against the lock, and names each requirement that has no
wheel. ``--build-sdists`` turns such a requirement into a wheel here, from its hash-checked
sdist, when the result is pure Python (``py3-none-any``): a compute node never builds anything.
Each built wheel's sha256 goes into the manifest so hash-checked installs accept it.

Layout: ``WHEELHOUSE/*.whl``, ``requirements.txt`` (the selection for this platform, with
hashes) and ``titanenv-wheelhouse.json`` (platform, extras, lock digest, built wheels),
written last as the completion marker.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from titanenv import atomic
from titanenv.digest import sha256_file
from titanenv.env.lockfile import Lock, Requirement, normalize, write_requirements
from titanenv.env.platforms import Platform

__all__ = ["MANIFEST", "REQUIREMENTS", "DownloadReport", "Wheelhouse", "WheelhouseError", "download"]

MANIFEST = "titanenv-wheelhouse.json"
REQUIREMENTS = "requirements.txt"
_NO_MATCH = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)==([^\s]+)")


class WheelhouseError(RuntimeError):
    """A wheelhouse is missing, incomplete or could not be filled; the message names what and the fix."""


@dataclass
class DownloadReport:
    """What ``download`` did."""

    wheelhouse: Path
    wheels: int = 0
    built: dict[str, str] = field(default_factory=dict)
    """Name -> sha256 of wheels built here from sdists."""
    no_wheel: list[str] = field(default_factory=list)
    """Requirements without a wheel for the target, not built."""
    commands: list[list[str]] = field(default_factory=list)


def wheel_key(filename: str) -> tuple[str, str] | None:
    """``(normalized name, version)`` of a wheel file name, or None if it is not a wheel."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[:-4].split("-")
    if len(parts) < 5:
        return None
    return normalize(parts[0]), parts[1]


class Wheelhouse:
    """A folder of wheels for one platform."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def index(self) -> dict[tuple[str, str], list[Path]]:
        """Wheels by ``(name, version)``."""
        found: dict[tuple[str, str], list[Path]] = {}
        for f in sorted(self.path.glob("*.whl")):
            if key := wheel_key(f.name):
                found.setdefault(key, []).append(f)
        return found

    def missing(self, reqs: list[Requirement]) -> list[Requirement]:
        """Requirements with no wheel of that name and version here."""
        have = self.index()
        return [r for r in reqs if (r.name, r.version) not in have]

    def manifest(self) -> dict:
        """The manifest, or an empty dict when ``download`` did not finish here."""
        p = self.path / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else {}

    def built_hashes(self) -> dict[str, list[str]]:
        """Extra accepted hashes for wheels built here from their locked sdists."""
        return {name: [f"sha256:{digest}"] for name, digest in self.manifest().get("built", {}).items()}


def download(
    lock: Lock,
    extras: list[str],
    target: Platform,
    dest: Path,
    *,
    python: str = sys.executable,
    build_sdists: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> DownloadReport:
    """Fill ``dest`` with wheels for ``extras`` (and the base layer if ``cpu`` is among them) on ``target``.

    Raises:
        WheelhouseError: a requirement has no wheel for ``target`` (all are named) and was not
            built, or pip failed for another reason (its message is included).
    """
    reqs = lock.select(extras, target.marker_environment())
    report = DownloadReport(dest)
    pip = [
        python,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        *target.pip_download_flags(),
    ]
    # The base layer (torch, triton) comes with its own dependencies, which the lock does not pin.
    base = [*pip, *lock.base_pins()] if "cpu" in extras and lock.base else None
    if dry_run:
        report.commands.append([*pip, "--no-deps", "-r", f"<{len(reqs)} locked requirements>"])
        report.commands += [base] if base else []
        return report
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)  # the manifest marks a finished download
    remaining = list(reqs)
    with tempfile.TemporaryDirectory() as tmp:
        reqfile = Path(tmp, "requirements.txt")
        while remaining:  # pip stops at the first requirement without a wheel: note it, retry without it
            write_requirements(remaining, reqfile)
            cmd = [*pip, "--no-deps", "-r", str(reqfile)]
            report.commands.append(cmd)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                break
            m = _NO_MATCH.search(proc.stderr)
            name = normalize(m.group(1)) if m else None
            if m is None or name not in {r.name for r in remaining}:
                raise WheelhouseError(f"pip download failed:\n{_tail(proc.stderr)}")
            report.no_wheel.append(f"{name}=={m.group(2)}")
            remaining = [r for r in remaining if r.name != name]
        if build_sdists and report.no_wheel:
            missing = [r for r in reqs if r.pin in report.no_wheel]
            report.built = _build_pure_wheels(missing, dest, Path(tmp), python, log)
            report.no_wheel = []
    if base:
        report.commands.append(base)
        proc = subprocess.run(base, capture_output=True, text=True)
        if proc.returncode != 0:
            raise WheelhouseError(
                f"pip could not fetch the base layer {' '.join(lock.base_pins())} for {target.tag} "
                f"(set PIP_EXTRA_INDEX_URL to the PyTorch CPU index?):\n{_tail(proc.stderr)}"
            )
    report.wheels = len(list(dest.glob("*.whl")))
    if report.no_wheel:
        raise WheelhouseError(
            f"no wheel for {target.tag} ({target.arch}, Python {target.python}, glibc <= {target.glibc}): "
            + ", ".join(report.no_wheel)
            + "\n  rerun with --build-sdists to build pure-Python wheels here from their hash-checked sdists,"
            " or put the wheels into " + str(dest)
        )
    write_requirements(reqs, dest / REQUIREMENTS, {n: [f"sha256:{d}"] for n, d in report.built.items()})
    manifest = {
        "platform": {"arch": target.arch, "python": target.python, "glibc": target.glibc, "tag": target.tag},
        "extras": list(extras),
        "lock": str(lock.path),
        "lock_sha256": lock.sha256,
        "requirements": [r.pin for r in reqs],
        "base": lock.base_pins() if "cpu" in extras else [],
        "built": report.built,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic.write_json(dest / MANIFEST, manifest)
    return report


def _build_pure_wheels(
    reqs: list[Requirement], dest: Path, tmp: Path, python: str, log: Callable[[str], None]
) -> dict[str, str]:
    """Fetch the locked sdists of ``reqs`` (hash-checked), build their wheels, accept only pure-Python ones.

    Returns:
        Normalized name -> sha256 of each wheel copied into ``dest``.
    """
    src, out = tmp / "sdists", tmp / "built"
    reqfile = write_requirements(reqs, tmp / "sdists.txt")
    log(f"building wheels from sdists (the index has no wheel): {', '.join(r.pin for r in reqs)}")
    _run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary=:all:",
            "--dest",
            str(src),
            "-r",
            str(reqfile),
        ],
        "fetching the sdists",
    )
    _run(
        [
            python,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "--no-deps",
            "--wheel-dir",
            str(out),
            *map(str, sorted(src.iterdir())),
        ],
        "building wheels from the sdists",
    )
    built = {}
    for wheel in sorted(out.glob("*.whl")):
        key = wheel_key(wheel.name)
        assert key is not None, wheel.name  # pip wheel writes well-formed wheel names
        if not wheel.name.endswith("-none-any.whl"):
            raise WheelhouseError(
                f"{wheel.name} has no wheel on the index and builds a platform-specific one; "
                f"build it on the target platform and put it into {dest}"
            )
        shutil.copy2(wheel, dest / wheel.name)
        built[key[0]] = sha256_file(wheel)
    absent = [r.pin for r in reqs if r.name not in built]
    if absent:
        raise WheelhouseError(f"building from sdists gave no wheel for {', '.join(absent)}")
    return built


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise WheelhouseError(f"{what} failed:\n{_tail(proc.stderr)}")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
