"""The lockfile: for every fetched asset, the commit it resolved to and each file's size and sha256.

JSON, paths relative to ``HF_HOME`` (so the cache can move), no timestamps (so an unchanged
fetch writes an identical file). Default place: beside the asset list, ``NAME.lock.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from titanenv import __version__, atomic
from titanenv.assets.files import redacted
from titanenv.digest import sha256_file

LOCK_SUFFIX = ".lock.json"


class LockError(ValueError):
    """The lockfile is missing or invalid; the message names the file."""


class FileEntry(BaseModel):
    """One file of an asset."""

    model_config = ConfigDict(frozen=True)
    path: str
    """Relative to ``HF_HOME``, POSIX separators; symlinks (snapshot entries) are followed for size and hash."""
    size: int
    """Bytes."""
    sha256: str


class LockedAsset(BaseModel):
    """One asset as fetched."""

    key: str
    """The asset key (``model:org/name``), as in ``--only``."""
    kind: str
    spec: dict[str, Any]
    """The asset's fields as requested (repo, revision, config, ...)."""
    commit: str | None
    """Resolved Hub commit sha; None for nltk data and URL files, which have none."""
    files: list[FileEntry]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Lock(BaseModel):
    """The whole lockfile."""

    version: Literal[1] = 1
    generated_by: str = f"titanenv {__version__}"
    assets: list[LockedAsset] = []

    def merged(self, assets: Iterable[LockedAsset]) -> Lock:
        """This lock with ``assets`` added, replacing entries with the same key (order kept)."""
        by_key = {a.key: a for a in self.assets}
        for a in assets:
            by_key[a.key] = a
        return Lock(assets=list(by_key.values()))


def default_path(asset_list: Path | None, home: Path) -> Path:
    """``NAME.lock.json`` beside the asset list ``NAME.toml``; ``HF_HOME/titanenv/assets.lock.json`` without one."""
    if asset_list is None:
        return home / "titanenv" / f"assets{LOCK_SUFFIX}"
    return asset_list.with_name(asset_list.stem + LOCK_SUFFIX)


def hash_files(home: Path, paths: list[str], jobs: int = 2) -> list[FileEntry]:
    """Size and sha256 of each path under ``home``, hashed by ``jobs`` threads (hashlib releases the GIL)."""

    def entry(rel: str) -> FileEntry:
        full = home / rel
        return FileEntry(path=rel, size=full.stat().st_size, sha256=sha256_file(full))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(entry, paths))


def read(path: str | os.PathLike) -> Lock:
    """Read a lockfile.

    Raises:
        LockError: missing, not JSON, or not a titanenv lockfile.
    """
    path = Path(path)
    try:
        return Lock.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise LockError(f"{path}: no such lockfile; create it with `titanenv assets fetch` (or pass --lock)") from None
    except (json.JSONDecodeError, ValidationError) as e:
        raise LockError(f"{path}: not a titanenv lockfile ({str(e).splitlines()[0]})") from None


def read_or_empty(path: Path) -> Lock:
    """:func:`read`, or an empty lock when the file does not exist yet."""
    return read(path) if path.exists() else Lock()


def write(path: str | os.PathLike, lock: Lock) -> None:
    """Write the lockfile atomically."""
    atomic.write_json(path, redacted(lock.model_dump(mode="json")))
