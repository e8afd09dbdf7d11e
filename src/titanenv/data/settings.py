"""``PreprocessConfig``: the settings of one ``titanenv preprocess`` run, and which of them change the bytes.

Each field that decides the output bytes is marked in its metadata: ``bytes: "as is"`` when its
value goes into the fingerprint unchanged (:data:`BYTE_FIELDS`), ``bytes: "derived"`` when the
run derives what goes in (the expanded inputs' sizes and mtimes, the tokenizer's sha256, the EOD
id, the piece size). The other fields (where to write, workers, array task, error policy,
backend) never change the bytes. The fingerprint (:func:`titanenv.data.preprocess.run`) and the
workers' :class:`titanenv.data.worker.PieceJob` are derived from this class, not re-listed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titanenv.data import backends
from titanenv.data.documents import DEFAULT_MAX_DOCUMENT_CHARS

_BYTES = {"bytes": "as is"}
_DERIVED = {"bytes": "derived"}


@dataclass(frozen=True)
class PreprocessConfig:
    """What to tokenize, how, and where to write it. Field docs are the CLI's help."""

    inputs: list[str | Path] = field(metadata=_DERIVED)
    """Files, globs, folders, ``@LIST`` files or ``hf:NAME`` specs (see :mod:`titanenv.data.sources`)."""
    output_prefix: Path
    """Output path without extension; ``.bin``, ``.idx`` and ``.manifest.json`` are added."""
    tokenizer_model: str = field(metadata=_DERIVED)
    """A ``tokenizer.json``, a folder holding one, or a Hub repo id in the local cache."""
    json_keys: tuple[str, ...] = field(default=("text",), metadata=_BYTES)
    """Fields (or table columns) to tokenize; with several keys each goes to ``PREFIX_<key>``."""
    append_eod: bool = field(default=False, metadata=_DERIVED)
    eod_token: str | None = field(default=None, metadata=_DERIVED)
    workers: int = 1
    shard_index: int = 0
    num_shards: int = 1
    on_error: str = "skip"
    """``skip`` counts and drops bad documents; ``fail`` stops at the first."""
    tokenizer_backend: str = "auto"
    """``hf`` (reference), ``gigatoken`` (fast, checked against hf), ``auto`` (gigatoken if it matches)."""
    text_document: str = field(default="file", metadata=_BYTES)
    """Plain-text inputs: one document per ``file`` or per ``line``."""
    piece_mb: float | None = field(default=None, metadata=_DERIVED)
    """Size of the unit a worker tokenizes (MB of input); also the shuffle block. Default: the
    input size / 64, between 4 and 256 MB (the same for every array task: it depends on the inputs only)."""
    shuffle: bool = field(default=False, metadata=_BYTES)
    """Shuffle documents: pieces in seeded order, documents within each piece permuted."""
    seed: int = field(default=1234, metadata=_BYTES)
    val_fraction: float = field(default=0.0, metadata=_BYTES)
    """Send this fraction of documents (by a seeded hash of the text) to a validation output."""
    val_output_prefix: Path | None = None
    """Where the validation split goes (default ``<output-prefix>_val``)."""
    special_tokens: str = field(default="parse", metadata=_BYTES)
    """``parse``: special-token text in a document (``<|endoftext|>``) becomes that token's id, as in
    Megatron-LM and ``Tokenizer.encode``; ``plain``: it is tokenized as ordinary text."""
    max_document_chars: int = field(default=DEFAULT_MAX_DOCUMENT_CHARS, metadata=_BYTES)
    """Longer texts are rejected as ``too_long``: the tokenizer's memory grows with the document."""
    allow_empty: bool = False
    """Write outputs with no tokens instead of failing (:class:`EmptyOutput`)."""

    def __post_init__(self) -> None:
        checks = [
            (self.on_error in ("skip", "fail"), "--on-error must be skip or fail"),
            (
                self.tokenizer_backend in backends.BACKENDS,
                f"--tokenizer-backend must be one of {', '.join(backends.BACKENDS)}",
            ),
            (self.text_document in ("file", "line"), "--text-document must be file or line"),
            (self.special_tokens in ("parse", "plain"), "--special-tokens must be parse or plain"),
            (self.max_document_chars >= 1, "--max-document-chars must be positive"),
            (self.workers >= 1, "--workers must be at least 1"),
            (
                self.num_shards >= 1 and 0 <= self.shard_index < self.num_shards,
                f"--shard-index {self.shard_index} must be in 0..{self.num_shards - 1} "
                f"(--num-shards {self.num_shards})",
            ),
            (self.piece_mb is None or self.piece_mb > 0, "--piece-mb must be positive"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (-(2**63) <= self.seed < 2**63, "--seed must fit in 64 bits"),
            (
                len(self.json_keys) >= 1 and len(set(self.json_keys)) == len(self.json_keys),
                "--json-keys must name distinct fields",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def bases(self) -> dict[str, Path]:
        """Output base per split (before shard and key suffixes)."""
        out = {"train": Path(self.output_prefix)}
        if self.val_fraction > 0:
            out["val"] = Path(self.val_output_prefix or f"{self.output_prefix}_val")
        return out

    def byte_settings(self) -> dict[str, Any]:
        """The fields that change the output bytes as they are (:data:`BYTE_FIELDS`), by name."""
        return {name: getattr(self, name) for name in BYTE_FIELDS}


BYTE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(PreprocessConfig) if f.metadata.get("bytes") == "as is"
)
"""Fields whose values go into the fingerprint as they are."""
DERIVED_BYTE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(PreprocessConfig) if f.metadata.get("bytes") == "derived"
)
"""Fields that change the bytes through what the run derives from them."""
