"""Re-hash the files a lockfile lists, offline, and name every one that is missing or changed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from titanenv.assets.lockfile import FileEntry, Lock
from titanenv.digest import sha256_file


@dataclass(frozen=True)
class Problem:
    """A file of the lock that is not as recorded."""

    asset: str
    """The asset key."""
    path: str
    """Relative to ``HF_HOME``."""
    reason: str
    """``missing``, ``size N, expected M`` or ``sha256 X, expected Y``."""

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} (asset {self.asset})"


def verify(lock: Lock, home: Path, jobs: int = 2) -> list[Problem]:
    """Check every file of every asset in ``lock`` under ``home``: present, same size, same sha256.

    Reads only local files. Returns the problems, in lock order; empty when all is intact.
    """
    work = [(a.key, f) for a in lock.assets for f in a.files]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        found = pool.map(lambda item: _check(home, *item), work)
        return [p for p in found if p is not None]


def _check(home: Path, asset: str, entry: FileEntry) -> Problem | None:
    full = home / entry.path
    if not full.is_file():  # a dangling snapshot symlink is missing too
        return Problem(asset, entry.path, "missing")
    size = full.stat().st_size
    if size != entry.size:
        return Problem(asset, entry.path, f"size {size}, expected {entry.size}")
    digest = sha256_file(full)
    if digest != entry.sha256:
        return Problem(asset, entry.path, f"sha256 {digest[:12]}…, expected {entry.sha256[:12]}…")
    return None
