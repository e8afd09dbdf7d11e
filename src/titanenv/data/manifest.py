"""``PREFIX.manifest.json``: what made a tokenized dataset, and the checks that read it back.

Written last and atomically beside each output prefix, so its presence marks the output
complete. Fields (schema 1):

``titanenv_version``, ``schema``
``output``            this prefix: ``{"prefix", "split", "key", "documents", "tokens", "max_token_id"}``;
                      ``max_token_id`` is the largest id in this output's ``.bin`` (int, -1 when it
                      holds no tokens), for the vocabulary check before training
``outputs``           every prefix the run wrote: ``{split: {key: prefix}}``
``tokenizer``         ``{"path", "sha256", "vocab_size", "eod_id"}`` (sha256 of ``tokenizer.json``)
``backend``           ``{"requested", "used", "reason", "checked_documents", "checked_tokens"}``
``dtype``             ``uint16`` or ``int32`` (Megatron codes 8 and 4); ``append_eod``; ``json_keys``
``special_tokens``    ``parse`` or ``plain`` (``--special-tokens``); ``max_document_chars``
``split``             ``{"val_fraction", "seed", "shuffle"}``
``shard``             ``{"index", "count"}``, or ``{"merged_from": n}`` after ``--merge``
``documents_in`` = ``documents_written`` + ``documents_rejected`` (whole run, all splits)
``documents_written_by_split``, ``tokens`` (whole run), ``rejected_by_reason``,
``rejected_examples`` (first few ``file:line`` per reason), ``bom_stripped``,
``documents_with_special_text`` (written documents holding a special token's text, e.g. ``<|endoftext|>``)
``inputs``            ``[{"path", "size", "sha256"}]``, each file this run read (sha256 is null
                      in an array task for a file whose first piece another task read)
``files_skipped``     ``{"count", "examples"}``: files in folder inputs not read (hidden files,
                      ``.bin``/``.idx``/``.manifest.json`` outputs, ``*.parts/``); ``--dry-run`` lists all
``fingerprint``       hash of the settings and input sizes/mtimes; a rerun with the same one skips
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SUFFIX = ".manifest.json"
SCHEMA = 1


class TokenizerMismatch(ValueError):
    """The data was tokenized with a different tokenizer than the one given for training."""


def path_for(prefix: str | os.PathLike) -> Path:
    """``PREFIX.manifest.json`` for an output prefix (a path ending in ``.manifest.json`` is kept)."""
    text = os.fspath(prefix)
    return Path(text if text.endswith(SUFFIX) else text + SUFFIX)


def read(prefix: str | os.PathLike) -> dict | None:
    """The manifest beside ``prefix``, or None when there is none (data from another tool).

    Raises:
        ValueError: the manifest exists but is not valid JSON.
    """
    path = path_for(prefix)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); rerun `titanenv preprocess`") from None


def write(prefix: str | os.PathLike, manifest: dict) -> Path:
    """Write the manifest beside ``prefix`` atomically (temporary name, then rename)."""
    path = path_for(prefix)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_tokenizer(manifest_path_or_prefix: str | os.PathLike, tokenizer_info) -> dict | None:
    """Refuse data tokenized with a different tokenizer than ``tokenizer_info``.

    Args:
        manifest_path_or_prefix: a dataset prefix (``PREFIX`` of ``PREFIX.bin``) or its
            ``PREFIX.manifest.json``.
        tokenizer_info: a :class:`titanenv.data.tokenizer.TokenizerInfo` (from
            ``titanenv.data.tokenizer.load``), or the sha256 hex digest of a ``tokenizer.json``.

    Returns:
        The manifest when its tokenizer sha256 matches; None when the data has no manifest
        (made by another tool), so there is nothing to compare: the caller may warn.

    Raises:
        TokenizerMismatch: the manifest names another tokenizer; the message gives both.
        ValueError: the manifest is not valid JSON.
    """
    manifest = read(manifest_path_or_prefix)
    if manifest is None:
        return None
    given = tokenizer_info if isinstance(tokenizer_info, str) else tokenizer_info.sha256
    given_path = "" if isinstance(tokenizer_info, str) else f" ({tokenizer_info.path})"
    used = manifest.get("tokenizer", {})
    if used.get("sha256") != given:
        raise TokenizerMismatch(
            f"{path_for(manifest_path_or_prefix)}: the data was tokenized with {used.get('path')} "
            f"(sha256 {used.get('sha256')}), but the tokenizer given is sha256 {given}{given_path}. "
            "Pass the tokenizer the data was made with, or tokenize the data again with this one."
        )
    return manifest


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def fingerprint(settings: dict) -> str:
    """A short stable hash of JSON-able ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]
