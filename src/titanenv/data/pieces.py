"""Cut the inputs into pieces: the unit a worker tokenizes and writes on its own.

A piece is a contiguous run of documents, defined from file sizes and metadata only, so
every process (each array task, each rerun) computes the same plan without reading the data:

- uncompressed JSON lines or text lines: byte ranges of about ``piece_bytes``; a piece owns
  the lines that *start* inside its range;
- compressed files (no random access): one piece per file;
- parquet: runs of whole row groups; Arrow (Hugging Face datasets): row ranges;
- one-document-per-file text: runs of consecutive files.

Concatenating the pieces in plan order gives the documents in input order, so the output
is the same whatever the number of workers or array tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from titanenv.data.sources import InputFile


@dataclass(frozen=True)
class Piece:
    """A contiguous run of documents of one file (or of consecutive small text files)."""

    index: int
    """Position in the plan; names the piece's part files."""
    files: tuple[InputFile, ...]
    start: int = 0
    """Byte offset (line formats), row group (parquet) or row (arrow) where the piece starts."""
    stop: int | None = None
    """Exclusive end in the same unit; None reads to the end of the file."""
    size: int = 0
    """Bytes on disk the piece covers (progress and balancing)."""

    def describe(self) -> str:
        f = self.files[0]
        if len(self.files) > 1:
            return f"{len(self.files)} files {f.path.name}..{self.files[-1].path.name}"
        if self.start == 0 and self.stop is None:
            return str(f.path)
        unit = {"parquet": "row groups ", "arrow": "rows "}.get(f.format, "bytes ")
        return f"{f.path} [{unit}{self.start}:{'' if self.stop is None else self.stop}]"


def plan(files: list[InputFile], piece_bytes: int, text_document: str) -> list[Piece]:
    """Cut ``files`` into pieces of about ``piece_bytes`` each, in input order.

    Args:
        text_document: ``file`` (a plain-text file is one document) or ``line``.
    """
    pieces: list[Piece] = []
    group: list[InputFile] = []

    def add(fs: Iterable[InputFile], start: int = 0, stop: int | None = None, size: int = 0) -> None:
        pieces.append(Piece(len(pieces), tuple(fs), start, stop, size))

    def flush() -> None:
        if group:
            add(group, size=sum(f.size for f in group))
            group.clear()

    for f in files:
        whole_files = f.format == "text" and text_document == "file"
        if not whole_files:
            flush()
        if whole_files:
            group.append(f)
            if sum(g.size for g in group) >= piece_bytes:
                flush()
        elif f.compression or f.size <= piece_bytes:
            add([f], size=f.size)
        elif f.format in ("jsonl", "text"):
            for a in range(0, f.size, piece_bytes):
                b = min(a + piece_bytes, f.size)
                add([f], a, None if b == f.size else b, b - a)
        elif f.format == "parquet":
            for g0, g1, nbytes in _row_group_runs(f, piece_bytes):
                add([f], g0, g1, nbytes)
        else:
            for r0, r1, nbytes in _arrow_row_runs(f, piece_bytes):
                add([f], r0, r1, nbytes)
    flush()
    return pieces


def assign(pieces: list[Piece], index: int, count: int) -> list[Piece]:
    """The contiguous block of ``pieces`` that array task ``index`` of ``count`` owns.

    Blocks are balanced by bytes: a piece goes to the task whose share of the total holds the
    piece's midpoint. Merging the tasks' outputs in task order gives the pieces in plan order.

    Raises:
        ValueError: ``index`` is outside ``0..count-1``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard-index {index} is outside 0..{count - 1}")
    sizes = np.array([max(p.size, 1) for p in pieces], dtype=np.float64)
    middles = np.cumsum(sizes) - sizes / 2
    owner = np.minimum((middles * count / max(sizes.sum(), 1)).astype(int), count - 1)
    return [p for p, o in zip(pieces, owner, strict=False) if o == index]


def shuffled(pieces: list[Piece], seed: int) -> list[Piece]:
    """The plan in a seeded random order (the first level of ``--shuffle``)."""
    order = np.random.default_rng([seed, 0x7069656365]).permutation(len(pieces))
    return [pieces[i] for i in order]


def _row_group_runs(f: InputFile, piece_bytes: int) -> Iterator[tuple[int, int | None, int]]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(f.path).metadata
    start, nbytes = 0, 0
    for g in range(meta.num_row_groups):
        nbytes += meta.row_group(g).total_byte_size
        if nbytes >= piece_bytes:
            yield start, g + 1, nbytes
            start, nbytes = g + 1, 0
    if start < meta.num_row_groups or meta.num_row_groups == 0:
        yield start, None, nbytes


def _arrow_row_runs(f: InputFile, piece_bytes: int) -> Iterator[tuple[int, int | None, int]]:
    rows = sum(b.num_rows for b in _arrow_batches(f.path))
    if rows == 0:
        yield 0, None, f.size
        return
    step = max(1, int(rows * piece_bytes / max(f.size, 1)))
    for r in range(0, rows, step):
        stop = r + step if r + step < rows else None
        yield r, stop, f.size * (min(r + step, rows) - r) // rows


def _arrow_batches(path: str | Path) -> Iterator[Any]:  # pyarrow.RecordBatch (pyarrow is untyped)
    """Record batches of an Arrow IPC stream (Hugging Face datasets) or file, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        yield from pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
