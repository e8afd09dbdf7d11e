"""Stream the documents of one piece, whatever the input format.

``read(piece, keys, text_document, max_chars)`` returns a :class:`PieceReader`; iterating it yields
``(file, number, texts_or_reason)`` with :mod:`titanenv.data.documents` deciding each
document. Nothing holds more than one line, one table batch, or (one document per file)
one file in memory. ``number`` is the piece-local line or row; :meth:`PieceReader.where`
turns it into the ``file:N`` users see (N is the 1-based line of a text or JSON-lines file,
or the 1-based row of a parquet/Arrow file).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from titanenv.data import documents
from titanenv.data.pieces import Piece, _arrow_batches
from titanenv.data.sources import InputFile

_TABLE_BATCH = 1024  # rows per Arrow batch: bounded memory for any document size
# Corrupt or truncated archives, I/O errors.
_READ_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError)
try:
    from zstandard import ZstdError

    _READ_ERRORS += (ZstdError,)
except ImportError:  # zstandard is a pinned dependency; this only keeps the module importable
    pass


class UnreadableInput(OSError):
    """An input file cannot be read or decompressed; the message names it."""


class PieceReader:
    """Iterator over one piece's documents; counts BOMs and the bytes consumed."""

    def __init__(self, piece: Piece, keys: tuple[str, ...], text_document: str, max_chars: int | None = None) -> None:
        self.piece = piece
        self.keys = keys
        self.text_document = text_document
        self.max_chars = max_chars
        self.census = documents.KeyCensus(keys)
        """Which keys the JSON objects read so far hold (JSON lines only: tables check their columns)."""
        self.bom_stripped = 0
        self._raw: io.BufferedReader | None = None  # the on-disk file, for progress
        self._done_bytes = 0
        self._first_line: int | None = 1  # global number of the piece's first line or row

    def consumed(self) -> int:
        """Bytes of the on-disk input read so far (compressed bytes for compressed files)."""
        if self._raw is not None and not self._raw.closed:
            read = self._raw.tell() - self.piece.start * (len(self.piece.files) == 1)
            return min(self._done_bytes + read, self.piece.size)  # the last line may run past the piece
        return self._done_bytes

    def where(self, path: str, number: int) -> str:
        """``file:N`` for a piece-local line or row number (``file`` alone for a whole-file document)."""
        if self.piece.files[0].format == "text" and self.text_document == "file":
            return path
        if self._first_line is None:
            self._first_line = _count_lines_before(Path(path), self.piece.start) + 1
        return f"{path}:{self._first_line + number - 1}"

    def __iter__(self) -> Iterator[tuple[str, int, documents.Texts | str]]:
        f = self.piece.files[0]
        try:
            if f.format == "text" and self.text_document == "file":
                yield from self._text_files()
            elif f.format in ("jsonl", "text"):
                yield from self._lines(f)
            elif f.format == "parquet":
                yield from self._parquet(f)
            else:
                yield from self._arrow(f)
        except UnreadableInput:
            raise
        except _READ_ERRORS as e:
            names = ", ".join(str(g.path) for g in self.piece.files[:3])
            raise UnreadableInput(f"{names}: cannot read ({type(e).__name__}: {e})") from None

    def _lines(self, f: InputFile) -> Iterator[tuple[str, int, documents.Texts | str]]:
        path = str(f.path)
        with _open_raw(f.path) as raw:
            self._raw = raw
            stream = _decompress(raw, f)
            if self.piece.start:
                self._first_line = None  # known only by counting; done lazily for error reports
                stream.seek(_line_start(stream, self.piece.start))
            pos = stream.tell() if not f.compression else 0
            stop = self.piece.stop
            for n, line in enumerate(stream, 1):
                if stop is not None and pos >= stop:
                    break
                pos += len(line)
                if not line.strip():
                    continue  # blank lines are not documents
                if f.format == "jsonl":
                    result, bom = documents.from_json_line(line, self.keys, self.max_chars, self.census)
                else:
                    result, bom = documents.from_text_bytes(line.rstrip(b"\r\n"), self.keys[0], self.max_chars)
                self.bom_stripped += bom
                yield path, n, result
        self._raw = None
        self._done_bytes = self.piece.size

    def _text_files(self) -> Iterator[tuple[str, int, documents.Texts | str]]:
        # UTF-8 has at most 4 bytes per character: more bytes than that is too long without reading it all
        limit = -1 if self.max_chars is None else 4 * self.max_chars + 4
        for f in self.piece.files:
            with _open_raw(f.path) as raw:
                stream = _decompress(raw, f)
                data = stream.read(limit)
                huge = limit >= 0 and len(data) == limit and stream.read(1) != b""
            if huge:
                result: dict[str, str] | str
                result, bom = "too_long", False
            else:
                result, bom = documents.from_text_bytes(data, self.keys[0], self.max_chars)
            self.bom_stripped += bom
            self._done_bytes += f.size
            yield str(f.path), 1, result

    def _parquet(self, f: InputFile) -> Iterator[tuple[str, int, documents.Texts | str]]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        _require_columns(f, pf.schema_arrow.names, self.keys)
        groups = list(range(self.piece.start, self.piece.stop or pf.metadata.num_row_groups))
        self._first_line = 1 + sum(pf.metadata.row_group(g).num_rows for g in range(self.piece.start))
        rows = sum(pf.metadata.row_group(g).num_rows for g in groups) or 1
        n = 0
        for batch in pf.iter_batches(batch_size=_TABLE_BATCH, row_groups=groups, columns=list(self.keys)):
            for row in batch.to_pylist():
                n += 1
                yield str(f.path), n, documents.from_mapping(row, self.keys, self.max_chars)
            self._done_bytes = self.piece.size * n // rows

    def _arrow(self, f: InputFile) -> Iterator[tuple[str, int, documents.Texts | str]]:
        start, stop = self.piece.start, self.piece.stop
        self._first_line = start + 1
        total = (stop - start) if stop is not None else None
        seen = n = 0
        for batch in _arrow_batches(f.path):
            _require_columns(f, batch.schema.names, self.keys)
            lo, hi = max(start - seen, 0), batch.num_rows if stop is None else min(stop - seen, batch.num_rows)
            seen += batch.num_rows
            if hi <= lo:
                if stop is not None and seen >= stop:
                    break
                continue
            for off in range(lo, hi, _TABLE_BATCH):
                part = batch.slice(off, min(_TABLE_BATCH, hi - off)).select(list(self.keys))
                for row in part.to_pylist():
                    n += 1
                    yield str(f.path), n, documents.from_mapping(row, self.keys, self.max_chars)
                if total:
                    self._done_bytes = self.piece.size * n // total
        self._done_bytes = self.piece.size


def read(piece: Piece, keys: tuple[str, ...], text_document: str = "file", max_chars: int | None = None) -> PieceReader:
    """A reader over ``piece``; iterate it for ``(file, number, texts_or_reason)``.

    Args:
        max_chars: texts longer than this (characters) are rejected as ``too_long``; None: no limit.
    """
    return PieceReader(piece, keys, text_document, max_chars)


def _open_raw(path: Path) -> io.BufferedReader:
    try:
        # typeshed types open() with a non-literal buffering as BinaryIO; "rb" with buffering > 1 is a BufferedReader
        return cast(io.BufferedReader, open(path, "rb", buffering=1 << 20))
    except OSError as e:
        raise UnreadableInput(f"{path}: cannot read ({e.strerror})") from None


def _decompress(raw: io.BufferedReader, f: InputFile) -> io.BufferedReader:
    if f.compression == "gzip":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)
    if f.compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20)
    if f.compression == "bz2":
        return io.BufferedReader(bz2.BZ2File(raw), 1 << 20)
    if f.compression == "xz":
        return io.BufferedReader(lzma.LZMAFile(raw), 1 << 20)
    return raw


def _line_start(f: io.BufferedReader, offset: int) -> int:
    """The first line start at or after ``offset``: a piece owns the lines that start in its range."""
    f.seek(offset - 1)
    if f.read(1) != b"\n":
        f.readline()
    return f.tell()


def _count_lines_before(path: Path, offset: int) -> int:
    """Newlines before the first line start at or after ``offset`` (only for error reports)."""
    with open(path, "rb") as f:
        end = _line_start(f, offset)
        f.seek(0)
        count, left = 0, end
        while left > 0:
            block = f.read(min(left, 16 << 20))
            count += block.count(b"\n")
            left -= len(block)
    return count


def _require_columns(f: InputFile, names: list[str], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in names]
    if missing:
        raise ValueError(f"{f.path}: no column {missing[0]!r} (columns: {', '.join(names)}); set --json-keys")
