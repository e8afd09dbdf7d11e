"""The one file hash: ``sha256_file``. Standard library only (the set-up code uses it on a fresh login node)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (symlinks followed), streamed by :func:`hashlib.file_digest`.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()  # Python < 3.11: a login node's python3 running env/set_up.sh
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest()
