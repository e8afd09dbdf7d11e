"""Check one raw document and pull out its texts, or name why it is rejected.

Rejection reasons (counted in the manifest under ``rejected_by_reason``):

``malformed_json``  the line is not valid JSON
``not_an_object``   the line is JSON but not an object
``missing_key``     a ``--json-keys`` field is absent
``not_a_string``    a field is not a string (null, number, list of sentences...)
``empty_text``      a field is empty or only whitespace
``invalid_utf8``    the bytes are not UTF-8, or the text holds lone surrogates
``too_long``        a field holds more than ``--max-document-chars`` characters (memory bound)

A UTF-8 byte-order mark at the start of a line or file is not a rejection: it is removed and
counted as ``bom_stripped``.

With several keys a document is written to every key's output or to none, so that index ``i``
of ``PREFIX_a`` and ``PREFIX_b`` is the same document: a document missing one key is rejected as
``missing_key``. A key that is in *none* of the first :data:`KEY_CHECK_DOCUMENTS` objects of a
piece is a typo, not data: :class:`KeyCensus` raises :class:`MissingKey` naming the fields there.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

BOM = "\ufeff"
Texts = dict[str, str]
DEFAULT_MAX_DOCUMENT_CHARS = 10_000_000
"""Longest text accepted by default (characters, ``--max-document-chars``): tokenizing one takes
about 110 bytes of memory per character with ``tokenizers`` (8 with gigatoken; BENCHMARKS.md),
so ~1.3 GB per worker at this limit."""
KEY_CHECK_DOCUMENTS = 1000  # JSON objects read before a key absent from all of them stops the run
_FIELDS_SHOWN = 12


class MissingKey(ValueError):
    """A ``--json-keys`` field is in none of the first documents of an input; the message names the fields there."""


class KeyCensus:
    """Counts which ``keys`` the first :data:`KEY_CHECK_DOCUMENTS` JSON objects of a piece hold."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.objects = 0
        self.present: Counter[str] = Counter()
        self.fields: Counter[str] = Counter()
        self.checked = False

    def add(self, obj: Mapping[str, Any]) -> None:
        if self.objects >= KEY_CHECK_DOCUMENTS:
            return
        self.objects += 1
        self.present.update(k for k in self.keys if k in obj)
        self.fields.update(obj.keys())

    def due(self) -> bool:
        """True right when the last object of the check window was added."""
        return self.objects == KEY_CHECK_DOCUMENTS and not self.checked

    def check(self, where: Callable[[], str]) -> None:
        """Raise :class:`MissingKey` if a key is in none of the objects counted so far.

        Args:
            where: gives the input (``file``, or ``file up to line N``) for the message; called
                only on failure (finding a line number deep in a piece means counting lines).
        """
        self.checked = True
        absent = [k for k in self.keys if self.objects and not self.present[k]]
        if not absent:
            return
        fields = ", ".join(f for f, _ in self.fields.most_common(_FIELDS_SHOWN)) or "none"
        raise MissingKey(
            f"--json-keys {absent[0]!r} is in none of the {self.objects} documents read from {where()} "
            f"(fields: {fields}); pass --json-keys with one of those fields"
        )


def from_json_line(
    line: bytes, keys: tuple[str, ...], max_chars: int | None = None, census: KeyCensus | None = None
) -> tuple[Texts | str, bool]:
    """Decode one JSON line. Returns (texts per key, or a reason) and whether a BOM was removed.

    Args:
        max_chars: longest text accepted per key (characters); longer is ``too_long``.
        census: counts which keys each JSON object holds (see :class:`KeyCensus`).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", False
    bom = text.startswith(BOM)
    try:
        obj = json.loads(text[1:] if bom else text)
    except json.JSONDecodeError:
        return "malformed_json", bom
    if not isinstance(obj, dict):
        return "not_an_object", bom
    if census is not None:
        census.add(obj)
    return from_mapping(obj, keys, max_chars), bom


def from_mapping(row: dict[str, Any], keys: tuple[str, ...], max_chars: int | None = None) -> Texts | str:
    """Pick ``keys`` from a JSON object or a table row; returns the texts or a reason."""
    texts = {}
    for k in keys:
        if k not in row:
            return "missing_key"
        v = row[k]
        if isinstance(v, bytes):  # binary parquet/arrow column
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                return "invalid_utf8"
        reason = check_text(v, max_chars)
        if reason:
            return reason
        texts[k] = v
    return texts


def from_text_bytes(data: bytes, key: str, max_chars: int | None = None) -> tuple[Texts | str, bool]:
    """Decode a plain-text document (a line without its newline, or a whole file)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", False
    bom = text.startswith(BOM)
    text = text[1:] if bom else text
    reason = check_text(text, max_chars)
    return (reason or {key: text}), bom


def check_text(v: object, max_chars: int | None = None) -> str | None:
    """The reason a value cannot be tokenized as a document, or None.

    ``max_chars`` bounds the characters of one text: the tokenizer's memory grows with it
    (about 110 bytes per character with ``tokenizers``), so a huge one could kill the worker.
    """
    if not isinstance(v, str):
        return "not_a_string"
    if max_chars is not None and len(v) > max_chars:
        return "too_long"
    if not v.strip():
        return "empty_text"
    if not v.isascii():
        try:
            v.encode("utf-8")  # lone surrogates (from "\ud800" escapes) cannot reach the tokenizer
        except UnicodeEncodeError:
            return "invalid_utf8"
    return None
