"""``container/move_built_container_to_active.sh``: swap a staged image in, keep the previous one.

At every moment ``TITANENV_IMAGE`` names a complete image: the staged file is first moved next
to it (copied when staging is on another file system), the current image is hard-linked to
``NAME.previous.sif``, and a single ``rename`` replaces the active one. Jobs already running
keep the old inode open and are unaffected. ``--rollback`` swaps previous and active the same
way. Nothing asks a question. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ActivateError", "Slots", "activate", "is_sif", "main", "newest_staged", "rollback"]

SIF_MAGIC = b"SIF_MAGIC"
"""SIF files start with a 32-byte launch line, then this magic (github.com/apptainer/sif)."""


class ActivateError(RuntimeError):
    """Nothing to activate, or the file is not an image; the message says what to do."""


def is_sif(path: Path) -> bool:
    """Whether ``path`` is a SIF image (checked by its magic, not its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(41)[32:41] == SIF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Slots:
    """The active image and its rollback slot, each with its ``.json`` manifest."""

    active: Path

    @property
    def previous(self) -> Path:
        return self.active.with_name(self.active.stem + ".previous" + self.active.suffix)

    @property
    def staging(self) -> Path:
        return self.active.parent / "staging"

    @staticmethod
    def manifest(image: Path) -> Path:
        return image.with_suffix(".json")


def newest_staged(slots: Slots) -> Path:
    """The newest staged image whose manifest exists (the build finished).

    Raises:
        ActivateError: nothing is staged.
    """
    done = [p for p in slots.staging.glob("*.sif") if Slots.manifest(p).is_file()]
    if not done:
        raise ActivateError(f"no finished build in {slots.staging}: run container/build_container.sh first")
    return max(done, key=lambda p: (p.stat().st_mtime, p.name))


def activate(slots: Slots, staged: Path, log=print) -> None:
    """Make ``staged`` the active image; the active one becomes the previous one.

    Raises:
        ActivateError: ``staged`` is missing or not a SIF image.
    """
    if not is_sif(staged):
        raise ActivateError(f"{staged} is not a SIF image (no {SIF_MAGIC.decode()} header)")
    slots.active.parent.mkdir(parents=True, exist_ok=True)
    incoming = slots.active.with_name(f".{slots.active.name}.incoming-{os.getpid()}")
    _move(staged, incoming)
    if slots.active.exists():
        _swap_in(slots.active, slots.previous)
        if Slots.manifest(slots.active).exists():
            _swap_in(Slots.manifest(slots.active), Slots.manifest(slots.previous))
        else:  # a manifest must never describe another image
            Slots.manifest(slots.previous).unlink(missing_ok=True)
    os.replace(incoming, slots.active)
    manifest = Slots.manifest(staged)
    if manifest.is_file():
        _move(manifest, Slots.manifest(slots.active))
    log(f"active: {slots.active} (was {staged.name}); previous kept at {slots.previous}")


def rollback(slots: Slots, log=print) -> None:
    """Swap the previous and the active image.

    Raises:
        ActivateError: there is no previous image.
    """
    if not is_sif(slots.previous):
        raise ActivateError(f"no previous image at {slots.previous} to roll back to")
    for a, b in ((slots.active, slots.previous), (Slots.manifest(slots.active), Slots.manifest(slots.previous))):
        if not b.exists():
            continue
        held = a.with_name(f".{a.name}.rollback-{os.getpid()}")
        if a.exists():
            os.link(a, held)
        os.replace(b, a)  # the active path never disappears
        if held.exists():
            os.replace(held, b)
    log(f"rolled back: {slots.active} is the previous image again; the replaced one is now {slots.previous}")


def _swap_in(current: Path, keep_as: Path) -> None:
    """Keep ``current`` as ``keep_as`` without ever removing ``current`` (hard link, then rename)."""
    if not current.exists():
        return
    tmp = keep_as.with_name(f".{keep_as.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(current, tmp)
    os.replace(tmp, keep_as)


def _move(src: Path, dst: Path) -> None:
    """Rename, or copy then rename across file systems; ``dst`` appears complete or not at all."""
    try:
        os.replace(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + ".copying")
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        src.unlink()


def main(argv: list[str] | None = None) -> int:
    """Command line of ``container/move_built_container_to_active.sh``."""
    p = argparse.ArgumentParser(
        prog="container/move_built_container_to_active.sh",
        description="Make a staged image the active TITANENV_IMAGE, atomically; keep the previous one.",
    )
    p.add_argument(
        "staged", nargs="?", type=Path, help="image to activate (default: the newest finished build in staging/)"
    )
    p.add_argument("--rollback", action="store_true", help="swap the previous image back in")
    p.add_argument("--dry-run", action="store_true", help="say what would happen; change nothing")
    args = p.parse_args(argv)
    image = os.environ.get("TITANENV_IMAGE")
    if not image:
        print(
            "move_built_container_to_active.sh: error: TITANENV_IMAGE is not set "
            "(run the script, which reads configuration.sh)",
            file=sys.stderr,
        )
        return 1
    slots = Slots(Path(image))
    say = lambda m: print(f"move_built_container_to_active.sh: {m}", flush=True)  # noqa: E731
    try:
        if args.rollback:
            if args.dry_run:
                say(f"would swap {slots.previous} and {slots.active}")
            else:
                rollback(slots, say)
            return 0
        staged = args.staged or newest_staged(slots)
        if args.dry_run:
            say(f"would activate {staged} as {slots.active}, keeping the current one as {slots.previous}")
        else:
            activate(slots, staged, say)
    except (ActivateError, OSError) as e:
        print(f"move_built_container_to_active.sh: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
