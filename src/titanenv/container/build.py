"""``container/build_container.sh [online|download|offline]``: build the image into staging.

- ``online`` (a node with internet): fill the wheelhouse for the image's platform, then
  ``apptainer build --fakeroot`` from ``docker://`` with ``container/titanenv-ARCH.def``.
- ``download`` (a node with internet, ahead of time): save the base image as a ``.sif``
  (``apptainer pull``) and fill the wheelhouse. Nothing is built.
- ``offline`` (no network needed): build from that ``.sif`` (``Bootstrap: localimage``) with
  ``container/titanenv-ARCH-offline.def``; the wheelhouse comes in through ``%files``.

Every build goes to ``staging/`` beside ``TITANENV_IMAGE``, with a ``.json`` manifest written
last; ``container/move_built_container_to_active.sh`` swaps it in. Apptainer's cache and
temporary files go under ``TITANENV_SCRATCH_DIR`` (``APPTAINER_CACHEDIR``, ``APPTAINER_TMPDIR``;
``SINGULARITY_*`` for singularity), unless already set. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from titanenv import __version__, atomic
from titanenv.container.activate import is_sif
from titanenv.container.client import ClientError, find_runtime
from titanenv.container.spec import BASE_IMAGE, FLASH_ATTN_VERSION, IMAGE_EXTRAS, ImageSpec
from titanenv.container.validate import validate
from titanenv.digest import sha256_file
from titanenv.env import wheelhouse as wh
from titanenv.env.lockfile import Lock, LockError
from titanenv.env.platforms import ARCHES, Platform

__all__ = ["MODES", "BuildConfig", "BuildError", "main", "run"]

MODES = ("online", "download", "offline")
PULL_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class BuildError(RuntimeError):
    """A build step cannot run or failed; the message names what is missing and the fix."""


@dataclass
class BuildConfig:
    """One build: mode, target and where everything goes. :meth:`from_environment` fills it from configuration.sh."""

    root: Path
    mode: str
    arch: str
    runtime: str
    """``apptainer`` or ``singularity``."""
    image: Path
    """``TITANENV_IMAGE``: the active image; builds are staged in ``image.parent/staging``."""
    scratch: Path
    wheelhouse: Path
    base_sif: Path
    """Where ``download`` saves the base image and ``offline`` builds from it."""
    extras: tuple[str, ...] = IMAGE_EXTRAS
    flash_attn: str | None = FLASH_ATTN_VERSION
    dry_run: bool = False
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def from_environment(
        cls,
        mode: str,
        arch: str | None = None,
        runtime: str | None = None,
        wheelhouse: Path | None = None,
        dry_run: bool = False,
    ) -> BuildConfig:
        """Read ``TITANENV_*`` (exported by the script from configuration.sh).

        Raises:
            BuildError: a variable is unset, or no container runtime is available.
        """
        env = dict(os.environ)
        missing = [v for v in ("TITANENV_ROOT", "TITANENV_SCRATCH_DIR", "TITANENV_IMAGE") if not env.get(v)]
        if missing:
            raise BuildError(
                f"{', '.join(missing)} not set: run container/build_container.sh, which reads configuration.sh"
            )
        arch = arch or platform.machine()
        if arch not in ARCHES:
            raise BuildError(f"architecture {arch!r} is not supported; use one of {', '.join(ARCHES)}")
        scratch = Path(env["TITANENV_SCRATCH_DIR"])
        tag = Platform(arch, BASE_IMAGE.python, BASE_IMAGE.glibc).tag
        return cls(
            root=Path(env["TITANENV_ROOT"]),
            mode=mode,
            arch=arch,
            runtime=_runtime(runtime or env.get("TITANENV_CONTAINER_RUNTIME", "auto")),
            image=Path(env["TITANENV_IMAGE"]),
            scratch=scratch,
            wheelhouse=wheelhouse or scratch / "wheelhouse" / tag,
            base_sif=scratch / "container" / "base" / f"pytorch_{BASE_IMAGE.tag}_{arch}.sif",
            dry_run=dry_run,
            env=env,
        )

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.arch, "offline" if self.mode == "offline" else "online")

    @property
    def definition(self) -> Path:
        return self.root / "container" / self.spec.filename

    @property
    def staging(self) -> Path:
        return self.image.parent / "staging"

    @property
    def target(self) -> Platform:
        return Platform(self.arch, BASE_IMAGE.python, BASE_IMAGE.glibc)


def run(cfg: BuildConfig, log=print) -> Path | None:
    """Run one mode; return the staged image (None for ``download`` and dry runs).

    Raises:
        BuildError: a prerequisite is missing or a step failed.
    """
    if cfg.mode not in MODES:
        raise BuildError(f"mode {cfg.mode!r}: use one of {', '.join(MODES)}")
    env = _scratch_env(cfg)
    lock = Lock.read(cfg.root / "env" / "requirements.lock")
    host = platform.machine()
    if cfg.mode != "download" and cfg.arch != host:
        raise BuildError(
            f"cannot build an {cfg.arch} image on this {host} machine: build it on an {cfg.arch} login node "
            "(JUPITER builds its own aarch64 image)"
        )
    if cfg.mode in ("online", "download"):
        _fill_wheelhouse(cfg, lock, log)
    if cfg.mode == "download":
        _pull_base(cfg, env, log)
    _check_wheelhouse(cfg, lock)
    if cfg.mode == "download":
        log(
            f"download complete: base {cfg.base_sif}, wheelhouse {cfg.wheelhouse}; "
            f"on the build node run: container/build_container.sh offline"
        )
        return None
    if cfg.mode == "offline" and not cfg.dry_run and not is_sif(cfg.base_sif):
        raise BuildError(
            f"no base image at {cfg.base_sif}: run `container/build_container.sh download` on a node with internet"
        )
    args = {"WHEELHOUSE": str(cfg.wheelhouse)}
    if cfg.mode == "offline":
        args["BASE_IMAGE"] = str(cfg.base_sif)
    _check_definition(cfg.definition, args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    staged = cfg.staging / f"titanenv-{cfg.arch}-{stamp}.sif"
    cmd = [cfg.runtime, "build", *(["--fakeroot"] if os.geteuid() != 0 else [])]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd += [str(staged), str(cfg.definition)]
    log(("would run: " if cfg.dry_run else "running: ") + " ".join(cmd))
    if cfg.dry_run:
        return None
    cfg.staging.mkdir(parents=True, exist_ok=True)
    if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode != 0 or not is_sif(staged):
        staged.unlink(missing_ok=True)
        raise BuildError(f"{cfg.runtime} build failed (see its output above); nothing was staged")
    manifest = {
        "image": str(staged),
        "mode": cfg.mode,
        "arch": cfg.arch,
        "definition": str(cfg.definition),
        "definition_sha256": sha256_file(cfg.definition),
        "build_args": args,
        "base": cfg.spec.base.ref,
        "lock_sha256": lock.sha256,
        "titanenv": __version__,
        "runtime": cfg.runtime,
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    atomic.write_json(staged.with_suffix(".json"), manifest)  # written last: the build is complete
    log(
        f"staged {staged}; check it with `titanenv container verify {staged}`, "
        "make it active with container/move_built_container_to_active.sh"
    )
    return staged


def _runtime(choice: str) -> str:
    try:
        return find_runtime(choice)
    except ClientError as e:
        raise BuildError(str(e)) from None


def _scratch_env(cfg: BuildConfig) -> dict[str, str]:
    """The runtime's environment, with its cache and temporary folders under scratch (not $HOME, not /tmp)."""
    env = dict(cfg.env)
    prefix = cfg.runtime.upper()
    for var, sub in (("CACHEDIR", "cache"), ("TMPDIR", "tmp")):
        path = env.get(f"{prefix}_{var}") or str(cfg.scratch / sub / cfg.runtime)
        env[f"{prefix}_{var}"] = path
        if not cfg.dry_run:
            Path(path).mkdir(parents=True, exist_ok=True)
    return env


def _fill_wheelhouse(cfg: BuildConfig, lock: Lock, log) -> None:
    log(f"wheelhouse for {cfg.target.tag}: {cfg.wheelhouse}")
    report = wh.download(
        lock, list(cfg.extras), cfg.target, cfg.wheelhouse, build_sdists=True, dry_run=cfg.dry_run, log=log
    )
    for cmd in report.commands if cfg.dry_run else []:
        log("would run: " + " ".join(cmd))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--disable-pip-version-check",
        "--no-deps",
        "--wheel-dir",
        str(cfg.wheelhouse),
        str(cfg.root),
    ]
    if cfg.dry_run:
        log("would run: " + " ".join(cmd))
        return
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"building titanenv's own wheel failed:\n{proc.stderr.strip()[-2000:]}")


def _pull_base(cfg: BuildConfig, env: dict[str, str], log) -> None:
    if is_sif(cfg.base_sif):
        log(f"base image already saved: {cfg.base_sif}")
        return
    part = cfg.base_sif.with_name(cfg.base_sif.name + ".part")
    cmd = [cfg.runtime, "pull", "--arch", PULL_ARCH[cfg.arch], str(part), f"docker://{cfg.spec.base.ref}"]
    log(("would run: " if cfg.dry_run else "running: ") + " ".join(cmd))
    if cfg.dry_run:
        return
    cfg.base_sif.parent.mkdir(parents=True, exist_ok=True)
    part.unlink(missing_ok=True)
    if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode != 0 or not is_sif(part):
        raise BuildError(f"{cfg.runtime} pull of {cfg.spec.base.ref} failed (see its output above)")
    os.replace(part, cfg.base_sif)


def _check_wheelhouse(cfg: BuildConfig, lock: Lock) -> None:
    """The wheelhouse holds every locked requirement, titanenv's wheel and the flash-attn wheel."""
    if cfg.dry_run:
        return
    house = wh.Wheelhouse(cfg.wheelhouse)
    how = "run `container/build_container.sh download` (or online) on a node with internet"
    if not (cfg.wheelhouse / wh.MANIFEST).is_file():
        raise BuildError(f"no finished wheelhouse at {cfg.wheelhouse}: {how}")
    missing = [r.pin for r in house.missing(lock.select(list(cfg.extras), cfg.target.marker_environment()))]
    missing += (
        [] if list(cfg.wheelhouse.glob(f"titanenv-{__version__}-py3-none-any.whl")) else [f"titanenv=={__version__}"]
    )
    if missing:
        raise BuildError(f"wheelhouse {cfg.wheelhouse} lacks {', '.join(missing)}: {how}")
    if cfg.flash_attn and not list(
        cfg.wheelhouse.glob(f"flash_attn-{cfg.flash_attn}*-{cfg.target.cp}-*{cfg.arch}.whl")
    ):
        raise BuildError(
            f"no flash-attn {cfg.flash_attn} wheel for {cfg.target.tag} in {cfg.wheelhouse}. "
            "PyPI has none: build it once against the base image on a login node "
            "(docs/container.md, 'flash-attn'), e.g.\n"
            f"  {cfg.runtime} exec {shlex.quote(str(cfg.base_sif))} pip wheel --no-deps --no-build-isolation "
            f"--wheel-dir {shlex.quote(str(cfg.wheelhouse))} flash-attn=={cfg.flash_attn}"
        )


def _check_definition(path: Path, args: dict[str, str]) -> None:
    errors = [p for p in validate(path.read_text(), args) if p.severity == "error"]
    if errors:
        raise BuildError(
            "the definition does not pass `titanenv container check`:\n" + "\n".join(p.format(path) for p in errors)
        )


def main(argv: list[str] | None = None) -> int:
    """Command line of ``container/build_container.sh``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="container/build_container.sh",
        description="Build titanenv's Apptainer image into staging/ beside TITANENV_IMAGE (configuration.sh).",
        epilog="modes:\n"
        "  online    fill the wheelhouse, then build from docker:// (a node with internet)\n"
        "  download  save the base image (.sif) and fill the wheelhouse; build nothing (a node with internet)\n"
        "  offline   build from the saved .sif and the wheelhouse (no network needed)\n"
        "then: container/move_built_container_to_active.sh (docs/container.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", nargs="?", default="online", choices=MODES, help="default: online")
    p.add_argument("--arch", choices=ARCHES, help="target architecture (default: this machine's; download may differ)")
    p.add_argument(
        "--runtime", choices=["auto", "apptainer", "singularity"], help="default: TITANENV_CONTAINER_RUNTIME"
    )
    p.add_argument("--wheelhouse", type=Path, help="default: $TITANENV_SCRATCH_DIR/wheelhouse/cp312-ARCH")
    p.add_argument("--dry-run", action="store_true", help="print the steps; download, build and change nothing")
    args = p.parse_args(argv)
    try:
        cfg = BuildConfig.from_environment(args.mode, args.arch, args.runtime, args.wheelhouse, args.dry_run)
        run(cfg, log=lambda m: print(f"build_container.sh: {m}", flush=True))
    except (BuildError, LockError, wh.WheelhouseError, ValueError) as e:
        print(f"build_container.sh {args.mode}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
