"""Turn ``--input`` specs into an ordered list of input files, each with its format.

A spec is one of:

- a file: the format follows the name (``.jsonl``/``.json``/``.ndjson`` JSON lines,
  ``.parquet``, ``.arrow``, anything else plain text), after an optional compression
  suffix (``.gz``, ``.zst``/``.zstd``, ``.bz2``, ``.xz``);
- a glob (``data/**/*.jsonl.gz``), expanded sorted;
- a directory: a ``save_to_disk`` folder of a Hugging Face dataset (it holds ``state.json``)
  is read as its Arrow files; any other folder as every file below it, sorted, except hidden
  ones and tokenized outputs (``.bin``, ``.idx``, ``.manifest.json``, ``*.parts/``); the files
  skipped are reported (``--dry-run`` lists them, the manifest counts them as ``files_skipped``);
- ``@LIST``: a file with one spec per line (``#`` comments and blank lines ignored);
  relative paths in it are relative to the list file's folder;
- ``hf:NAME[?name=CONFIG&split=SPLIT]``: a Hugging Face dataset loaded offline with
  ``datasets.load_dataset`` from the local cache (or a local dataset folder); its Arrow
  cache files are read. ``split`` defaults to ``train``.

Order is kept: specs in the order given, each expanded in sorted order.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from titanenv import offline

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class InputFile:
    """One file to read, with how to read it."""

    path: Path
    format: str
    """``jsonl``, ``parquet``, ``arrow`` or ``text``."""
    compression: str | None = None
    """``gzip``, ``zstd``, ``bz2``, ``xz`` or None."""
    size: int = 0
    """Bytes on disk."""
    mtime_ns: int = 0


class InputError(FileNotFoundError):
    """An input spec matches nothing or names a file that cannot be read; the message names it."""


def expand(specs: Sequence[str | os.PathLike[str]], skipped: list[Path] | None = None) -> list[InputFile]:
    """Expand ``--input`` specs into files, in order.

    Args:
        skipped: when given, receives every file a folder spec holds but does not read
            (hidden files, ``.bin``/``.idx``/``.manifest.json`` outputs, ``*.parts/``), in order.

    Raises:
        InputError: a spec matches nothing, or a file is missing or unreadable.
    """
    files: list[InputFile] = []
    skipped = [] if skipped is None else skipped
    for spec in specs:
        files += _expand_one(os.fspath(spec), base=Path.cwd(), skipped=skipped)
    if not files:
        raise InputError("no input files: pass --input FILE, a glob, a folder, @LIST or hf:NAME")
    return files


def _expand_one(spec: str, base: Path, skipped: list[Path]) -> list[InputFile]:
    if spec.startswith("hf:"):
        return _hf_dataset(spec)
    if spec.startswith("@"):
        return _list_file((base / spec[1:]).resolve(), skipped)
    path = base / spec
    if glob.has_magic(spec):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise InputError(f"--input {spec}: the pattern matches no file")
        return [f for m in matches for f in _expand_path(Path(m), skipped)]
    if not path.exists():
        raise InputError(f"--input {spec}: no such file or folder")
    return _expand_path(path, skipped)


def _expand_path(path: Path, skipped: list[Path]) -> list[InputFile]:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise InputError(
                f"--input {path}: a DatasetDict; pass one split's folder, e.g. {path / (splits or ['train'])[0]}"
            )
        if (path / "state.json").is_file():
            return _saved_dataset(path)
        found: list[Path] = []
        passed: list[Path] = []
        for p in sorted(path.rglob("*")):
            if p.is_file():
                (passed if _skipped(p.relative_to(path)) else found).append(p)
        skipped += passed
        if not found:
            why = f" to read, only skipped ones ({', '.join(p.name for p in passed[:3])}, ...)" if passed else ""
            raise InputError(f"--input {path}: the folder holds no files{why}")
        return [_file(p) for p in found]
    return [_file(path)]


def _file(path: Path, fmt: str | None = None) -> InputFile:
    if not os.access(path, os.R_OK):
        raise InputError(f"--input {path}: not readable (permission denied)")
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = fmt or (FORMATS.get(suffixes[-1], "text") if suffixes else "text")
    st = path.stat()
    return InputFile(path.resolve(), fmt, compression, st.st_size, st.st_mtime_ns)


def _skipped(rel: Path) -> bool:
    """Hidden files, and titanenv's own outputs (a folder may hold the data and its tokenized form)."""
    return (
        any(part.startswith(".") or part.endswith(".parts") for part in rel.parts)
        or rel.suffix in (".bin", ".idx")
        or rel.name.endswith(".manifest.json")
    )


def _list_file(path: Path, skipped: list[Path]) -> list[InputFile]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"--input @{path}: cannot read the list ({e.strerror})") from None
    files: list[InputFile] = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            files += _expand_one(line, base=path.parent, skipped=skipped)
    return files


def _saved_dataset(folder: Path) -> list[InputFile]:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, in row order."""
    state = json.loads((folder / "state.json").read_text())
    names = [d["filename"] for d in state.get("_data_files", [])]
    if not names:
        raise InputError(f"--input {folder}: state.json lists no data files")
    return [_file(folder / n, "arrow") for n in names]


def _asset_key(name: str, opts: dict[str, str], split: str) -> str:
    """The `titanenv assets fetch --add` key of a dataset (see titanenv.assets.spec.parse_key)."""
    query = "&".join(f"{k}={v}" for k, v in (("name", opts.get("name")), ("split", split)) if v)
    return f"dataset:{name}?{query}"


def _hf_dataset(spec: str) -> list[InputFile]:
    """A dataset from the local Hugging Face cache, loaded with the network off."""
    name, _, query = spec[3:].partition("?")
    opts = dict(parse_qsl(query))
    split = opts.pop("split", "train")
    offline.apply()  # compute nodes have no network: fail fast instead of hanging
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, **opts)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise InputError(
            f"--input {spec}: cannot load it offline ({type(e).__name__}: {e}). On a login node, fetch it first:\n"
            "  TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch "
            f"--add {shlex.quote(_asset_key(name, opts, split))}"
        ) from None
    files = [Path(c["filename"]) for c in ds.cache_files]
    if not files or getattr(ds, "_indices", None) is not None:
        raise InputError(f"--input {spec}: the dataset is not backed by plain Arrow cache files")
    return [_file(p, "arrow") for p in files]
