"""Tokenize one piece into its own part files, then mark it done.

A worker process reads its piece itself, tokenizes it and writes
``PARTS/NNNNNN.<split>.k<j>.bin/.idx`` (one part per split and json key) under temporary
names, renamed when complete; ``PARTS/NNNNNN.done.json`` is written last and holds the
piece's counts. Nothing flows through a central collector: the parent only learns counts.
A piece with a matching done marker is skipped on a rerun; one without is redone from scratch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from titanenv import atomic
from titanenv.data import backends, indexed, readers
from titanenv.data.manifest import MAX_EXAMPLES
from titanenv.data.pieces import Piece
from titanenv.data.settings import PreprocessConfig

_BATCH_DOCS = 1024
_BATCH_CHARS = 1 << 18  # ~256 kB of text per encode call: amortizes the call, bounds memory
SPLITS = ("train", "val")


class BadDocument(ValueError):
    """A document was rejected with ``--on-error fail``; the message names ``file:line`` and the reason."""


@dataclass(frozen=True)
class PieceJob:
    """What every piece of a run shares (sent once to each worker process): the run's settings as
    given (``cfg``: keys, ``--on-error``, ``--text-document``, split, seed, shuffle, special tokens,
    maximum document length) plus what the run resolved from them."""

    cfg: PreprocessConfig
    tokenizer_json: str
    """The resolved ``tokenizer.json``."""
    backend: str
    """``hf`` or ``gigatoken`` (already chosen and checked)."""
    eod: int | None
    """Appended after each document; None when ``--append-eod`` is off."""
    dtype: str
    """numpy dtype string of the token ids (``<u2``, ``<i4``)."""
    parts_dir: str
    fingerprint: str
    """Identifies the settings and inputs; a done marker from other settings is ignored."""
    special_texts: tuple[str, ...] = ()
    """The tokenizer's special tokens; documents holding one are counted (``documents_with_special_text``)."""

    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.cfg.val_fraction > 0 else SPLITS[:1]


def part_prefix(job: PieceJob, index: int, split: str, key_index: int) -> Path:
    return Path(job.parts_dir) / f"{index:06d}.{split}.k{key_index}"


def done_path(job: PieceJob, index: int) -> Path:
    return Path(job.parts_dir) / f"{index:06d}.done.json"


def finished(job: PieceJob, index: int) -> dict[str, Any] | None:
    """The counts of a piece finished with these settings, or None if it must be (re)done."""
    path = done_path(job, index)
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if marker.get("fingerprint") != job.fingerprint:
        return None
    for split in job.splits():
        for j in range(len(job.cfg.json_keys)):
            try:  # parts are not fsynced: after a node crash, check they are whole
                ds = indexed.IndexedDataset(part_prefix(job, index, split, j))
            except (OSError, ValueError):
                return None
            if len(ds) != marker["stats"]["written"][split]:
                return None
    stats: dict[str, Any] = marker["stats"]
    return stats


def process(
    piece: Piece, job: PieceJob, encoder: backends.Encoder, report: Callable[[int, int, int], None]
) -> dict[str, Any]:
    """Tokenize ``piece`` into its part files and write its done marker.

    Args:
        encoder: a :mod:`titanenv.data.backends` encoder.
        report: called after each batch with (documents, tokens, bytes read) since the last call.

    Returns:
        The piece's counts: ``documents_in``, ``written`` and ``tokens`` per split,
        ``rejected`` and ``examples`` per reason, ``bom_stripped``, ``documents_with_special_text``,
        per split a list over keys of ``tokens_by_key`` and ``max_token_id`` (-1: no tokens),
        and the ``backend`` used.

    Raises:
        BadDocument: a rejected document with ``on_error == "fail"``.
        documents.MissingKey: a ``--json-keys`` field is in none of the piece's first documents.
        OSError: an input cannot be read (named).
    """
    for stale in Path(job.parts_dir).glob(f"{piece.index:06d}.*"):
        stale.unlink()  # leftovers of a killed attempt: the piece is redone from scratch
    cfg = job.cfg
    reader = readers.read(piece, cfg.json_keys, cfg.text_document, cfg.max_document_chars)
    census = reader.census
    special = _special_pattern(job.special_texts)
    splits = job.splits()
    writers = {
        (s, j): indexed.IndexedDatasetWriter(part_prefix(job, piece.index, s, j), np.dtype(job.dtype), durable=False)
        for s in splits
        for j in range(len(cfg.json_keys))
    }
    stats: dict[str, Any] = {"documents_in": 0, "rejected": Counter(), "examples": {}, "bom_stripped": 0}
    maxima = {k: -1 for k in writers}
    with_special = 0
    batch: list[dict[str, str]] = []
    chars = 0
    reported = [0, 0]  # documents and bytes already reported

    def flush() -> None:
        nonlocal chars
        tokens = _write_batch(batch, job, encoder, writers, maxima)
        docs = stats["documents_in"]
        read = reader.consumed()
        report(docs - reported[0], tokens, read - reported[1])
        reported[0], reported[1] = docs, read
        batch.clear()
        chars = 0

    try:
        for path, n, result in reader:
            stats["documents_in"] += 1
            if census.due():
                census.check(_up_to_line(reader, path, n))
            if isinstance(result, str):
                if cfg.on_error == "fail":
                    raise BadDocument(f"{reader.where(path, n)}: {result}")
                stats["rejected"][result] += 1
                examples = stats["examples"].setdefault(result, [])
                if len(examples) < MAX_EXAMPLES:
                    examples.append(reader.where(path, n))
                continue
            batch.append(result)
            chars += sum(map(len, result.values()))
            if special is not None and any(special.search(t) for t in result.values()):
                with_special += 1
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                flush()
        if not census.checked:
            census.check(lambda: str(piece.files[0].path) + (f" from byte {piece.start}" if piece.start else ""))
        flush()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    stats["bom_stripped"] = reader.bom_stripped
    stats["backend"] = encoder.name
    stats["written"] = {s: writers[(s, 0)].num_documents for s in splits}
    n_keys = len(cfg.json_keys)
    stats["tokens"] = {s: sum(writers[(s, j)].num_tokens for j in range(n_keys)) for s in splits}
    stats["tokens_by_key"] = {s: [writers[(s, j)].num_tokens for j in range(n_keys)] for s in splits}
    stats["max_token_id"] = {s: [maxima[(s, j)] for j in range(n_keys)] for s in splits}
    stats["documents_with_special_text"] = with_special
    stats["rejected"] = dict(stats["rejected"])
    if cfg.shuffle:
        _shuffle(piece, job, stats["written"])
    marker = {"fingerprint": job.fingerprint, "piece": piece.describe(), "stats": stats}
    atomic.write_json(done_path(job, piece.index), marker, indent=1)
    return stats


def _up_to_line(reader: readers.PieceReader, path: str, n: int) -> Callable[[], str]:
    """``path up to line N`` for a census message, counted only when asked (it may read far)."""
    return lambda: f"{path} up to line {reader.where(path, n).rsplit(':', 1)[-1]}"


def _shuffle(piece: Piece, job: PieceJob, written: dict[str, int]) -> None:
    """Permute the documents of each part, seeded by (seed, piece, split): the second level of ``--shuffle``.

    Every key of a split gets the same order, so ``PREFIX_title[i]`` and ``PREFIX_text[i]`` stay one document.
    """
    for i, split in enumerate(job.splits()):
        order = np.random.default_rng([job.cfg.seed, piece.index, i]).permutation(written[split])
        for j in range(len(job.cfg.json_keys)):
            indexed.reorder(part_prefix(job, piece.index, split, j), order)


def _write_batch(
    batch: list[dict[str, str]],
    job: PieceJob,
    encoder: backends.Encoder,
    writers: dict[tuple[str, int], indexed.IndexedDatasetWriter],
    maxima: dict[tuple[str, int], int],
) -> int:
    """Encode ``batch`` per split and key, append EOD, write; returns the tokens written.

    ``maxima[(split, key index)]`` is raised to the largest id written there."""
    if not batch:
        return 0
    cfg = job.cfg
    if cfg.val_fraction > 0:
        is_val = np.array([_in_val(d[cfg.json_keys[0]], job) for d in batch])
        groups = {
            "train": [d for d, v in zip(batch, is_val, strict=False) if not v],
            "val": [d for d, v in zip(batch, is_val, strict=False) if v],
        }
    else:
        groups = {"train": batch}
    total = 0
    for split, docs in groups.items():
        if not docs:
            continue
        for j, key in enumerate(cfg.json_keys):
            flat, sizes = encoder.encode([d[key] for d in docs], plain=cfg.special_tokens == "plain")
            if job.eod is not None:
                flat = np.insert(flat, np.cumsum(sizes), job.eod)
                sizes = sizes + 1
            dtype = np.dtype(job.dtype)
            top = int(flat.max()) if flat.size else -1
            if top > np.iinfo(dtype).max:
                raise ValueError(f"token id {top} does not fit {dtype}; the tokenizer's vocabulary size is wrong")
            maxima[(split, j)] = max(maxima[(split, j)], top)
            writers[(split, j)].add_raw(flat.astype(dtype).tobytes(), sizes.astype(np.int32))
            total += int(sizes.sum())
    return total


class _SpecialFinder:
    """Does a text hold any special-token string? One regex per distinct 3-character prefix,
    ``<\\|r(?:eserved_0\\|>|...)``: ``re`` scans for a literal prefix in C and tries the rest only
    where it occurs. A plain alternation of Llama-3's 260 special tokens searches at ~30 MB/s,
    slower than gigatoken tokenizes; this at 0.2-1 GB/s."""

    def __init__(self, texts: tuple[str, ...]) -> None:
        self.patterns = []
        for prefix in sorted({t[:3] for t in texts}):
            rest = sorted((t[len(prefix) :] for t in texts if t.startswith(prefix)), key=len, reverse=True)
            self.patterns.append(re.compile(re.escape(prefix) + "(?:" + "|".join(map(re.escape, rest)) + ")"))

    def search(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


@functools.lru_cache(maxsize=4)
def _special_pattern(texts: tuple[str, ...]) -> _SpecialFinder | None:
    """A finder for ``texts`` (the special-token strings), or None when there are none."""
    return _SpecialFinder(texts) if texts else None


def _in_val(text: str, job: PieceJob) -> bool:
    """Deterministic split on a keyed hash of the text: exact duplicates land in the same split."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=job.cfg.seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < job.cfg.val_fraction * 2**64


# Per-process state of a pool worker: the shared progress counters.
_state: dict[str, Any] = {}


def init(counters: Any, tokenizer_json: str, backend: str) -> None:
    """Pool initializer: keep the progress counters; build the encoder (a forked worker has it already)."""
    _state.update(counters=counters)
    backends.build(backend, Path(tokenizer_json))


def run(piece: Piece, job: PieceJob) -> tuple[int, dict[str, Any]]:
    """Pool task: process one piece; returns (piece index, counts)."""
    encoder = backends.build(job.backend, Path(job.tokenizer_json))
    return piece.index, process(piece, job, encoder, _add_to(_state["counters"]))


def _add_to(counters: Any) -> Callable[[int, int, int], None]:  # a multiprocessing Array('q', 3)
    def add(docs: int, tokens: int, nbytes: int) -> None:
        with counters.get_lock():
            counters[0] += docs
            counters[1] += tokens
            counters[2] += nbytes

    return add
