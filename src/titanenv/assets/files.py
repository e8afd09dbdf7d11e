"""What the asset modules share: the file hash and the redaction rule.

The implementations are :func:`titanenv.digest.sha256_file` and :func:`titanenv.redaction.redact`
(one rule and one marker for every stage); files are written with :mod:`titanenv.atomic`.
"""

from __future__ import annotations

from typing import Any

from titanenv import redaction
from titanenv.digest import sha256_file

__all__ = ["CHUNK", "MARKER", "redact", "redacted", "sha256_file"]

CHUNK = 1 << 20
MARKER = redaction.MARKER


def redact(text: str) -> str:
    """:func:`titanenv.redaction.redact`: lockfiles, summaries and logged errors go through it."""
    return redaction.redact(text, marker=MARKER)


def redacted(obj: Any) -> Any:
    """:func:`titanenv.redaction.redacted`, for JSON written with :func:`titanenv.atomic.write_json`."""
    return redaction.redacted(obj, marker=MARKER)
