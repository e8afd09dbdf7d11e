"""``titanenv assets pack``: the files of a lockfile as tar + zstd archive parts, to carry to another machine.

Output folder, for ``--name assets``::

    assets.tar.zst.000, .001, ...   one zstd-compressed tar stream, split every PART_SIZE bytes
    assets.lock.json                the lockfile (what unpack verifies against)
    assets.summary.json             the fetch summary, when there is one
    SHA256SUMS                      for ``sha256sum -c``
    assets.manifest.json            parts with sizes and sha256; written last, so it marks the pack complete

Without titanenv: ``cat assets.tar.zst.* | zstd -d | tar -x -C "$HF_HOME"``. Member paths are
relative to ``HF_HOME``; snapshot symlinks are kept with their blobs. Each file's sha256 rides in
its pax header (``TITANENV.sha256``), so unpack checks every file as it writes it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

import zstandard
from pydantic import BaseModel

from titanenv import __version__, atomic
from titanenv.assets import lockfile
from titanenv.assets.cache import SECRET_NAMES, CacheLayoutError, relative
from titanenv.assets.files import redacted
from titanenv.assets.lockfile import Lock
from titanenv.digest import sha256_file

SHA_HEADER = "TITANENV.sha256"


class Part(BaseModel):
    """One archive part."""

    name: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """``NAME.manifest.json``."""

    version: int = 1
    generated_by: str = f"titanenv {__version__}"
    name: str
    parts: list[Part]
    lockfile: str
    lock_sha256: str
    files: int
    """Regular files in the archive (blobs and plain files)."""
    bytes: int
    """Their total size before compression."""

    @property
    def archive_id(self) -> str:
        """Identifies this archive's content (the sha256 of its part hashes)."""
        return hashlib.sha256("".join(p.sha256 for p in self.parts).encode()).hexdigest()


class _PartWriter:
    """A write-only stream cut into numbered part files of at most ``part_size`` bytes (None: one part)."""

    def __init__(self, folder: Path, stem: str, part_size: int | None) -> None:
        self.folder, self.stem, self.part_size = folder, stem, part_size
        self.parts: list[Part] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._written = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.stem}.{len(self.parts):03d}"
        self._file = open(self.folder / f".{name}.partial", "wb")  # noqa: SIM115 writer keeps part open
        self.parts.append(Part(name=name, size=0, sha256=""))

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1] = Part(name=self.parts[-1].name, size=self._written, sha256=self._hash.hexdigest())
            self._file, self._hash, self._written = None, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or (self.part_size and self._written >= self.part_size):
                self._open_next()
            assert self._file is not None  # _open_next opened it
            room = len(view) if not self.part_size else min(len(view), self.part_size - self._written)
            self._file.write(view[:room])
            self._hash.update(view[:room])
            self._written += room
            view = view[room:]
        return len(data)

    def close(self) -> list[Part]:
        """Finish the last part and give every part its final name."""
        if self._file is None and not self.parts:
            self._open_next()
        self._close_current()
        for p in self.parts:
            os.replace(self.folder / f".{p.name}.partial", self.folder / p.name)
        return self.parts


def members(lock: Lock, home: Path) -> list[str]:
    """Paths to archive, relative to ``home``: each locked file and, for snapshot symlinks, their targets.

    Raises:
        CacheLayoutError: a path or link target is outside ``home``, or is a credential file.
    """
    out: dict[str, None] = {}
    real_home = home.resolve()
    for asset in lock.assets:
        for f in asset.files:
            path = home / f.path
            if Path(f.path).name in SECRET_NAMES or Path(f.path).is_absolute() or ".." in Path(f.path).parts:
                raise CacheLayoutError(
                    f"lockfile path {f.path!r} (asset {asset.key}) is not an asset file under HF_HOME"
                )
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_home):
                    raise CacheLayoutError(f"{path} links outside HF_HOME ({target}); refusing to pack it")
                out[relative(real_home, target)] = None
            out[f.path] = None
    return list(out)


def pack(
    lock_path: Path,
    home: Path,
    out_dir: Path,
    name: str = "assets",
    part_size: int | None = None,
    level: int = 3,
    summary_path: Path | None = None,
) -> Manifest:
    """Write the archive parts, lockfile, summary, SHA256SUMS and manifest into ``out_dir``.

    Args:
        part_size: bytes per part (e.g. 4 GiB to fit a file system's or transfer tool's limit); None: one part.
        level: zstd level (3 is fast; model weights barely compress at any level).

    Raises:
        lockfile.LockError: the lockfile is missing or invalid.
        CacheLayoutError: see :func:`members`.
        FileNotFoundError: a locked file is missing (run ``titanenv assets verify``).
    """
    lock = lockfile.read(lock_path)
    sha_of = {f.path: f.sha256 for a in lock.assets for f in a.files}
    paths = members(lock, home)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _PartWriter(out_dir, f"{name}.tar.zst", part_size)
    count = total = 0
    # zstandard's stubs ask for a full IO[bytes]; stream_writer only calls write() on it
    with (
        zstandard.ZstdCompressor(level=level).stream_writer(writer, closefd=False) as zw,  # type: ignore[arg-type]
        tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel in paths:
            info = tar.gettarinfo(str(home / rel), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isfile():
                # Blobs are not in the lock by path: hash them here (the OS cache makes it cheap).
                info.pax_headers = {SHA_HEADER: sha_of.get(rel) or sha256_file(home / rel)}
                with open(home / rel, "rb") as f:
                    tar.addfile(info, f)
                count, total = count + 1, total + info.size
            else:
                tar.addfile(info)
    parts = writer.close()
    shutil.copyfile(lock_path, out_dir / f"{name}.lock.json")
    if summary_path is not None and summary_path.is_file():
        shutil.copyfile(summary_path, out_dir / f"{name}.summary.json")
    sums = "".join(f"{p.sha256}  {p.name}\n" for p in parts)
    atomic.write_bytes(out_dir / "SHA256SUMS", sums.encode())
    manifest = Manifest(
        name=name,
        parts=parts,
        lockfile=f"{name}.lock.json",
        lock_sha256=sha256_file(out_dir / f"{name}.lock.json"),
        files=count,
        bytes=total,
    )
    atomic.write_json(out_dir / f"{name}.manifest.json", redacted(manifest.model_dump(mode="json")))
    return manifest
