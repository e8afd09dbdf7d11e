"""``titanenv assets unpack``: verify archive parts, extract them safely into ``HF_HOME``, verify the result.

Safe: each member passes :func:`tarfile.data_filter` (links that point outside the target,
paths through a link that leaves it, device or FIFO members are refused), and absolute names,
``..`` components and hard links are refused as well, naming the member. Every file is written
under a temporary name, checked against its sha256 and renamed, so an interrupted unpack leaves
no partial file; a rerun skips files already in place
and completes the rest. A finished unpack leaves a marker, and a rerun then only re-verifies.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

import zstandard

from titanenv import atomic
from titanenv.assets import lockfile
from titanenv.assets.files import CHUNK
from titanenv.assets.pack import SHA_HEADER, Manifest

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer is Python 3.12+
from titanenv.assets.verify import Problem, verify
from titanenv.digest import sha256_file


class UnpackError(ValueError):
    """The archive is incomplete, corrupt or unsafe; the message names the part or member."""


class _Concat(io.RawIOBase):
    """The archive parts read back to back as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._file: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Buffer) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = open(self._paths.pop(0), "rb")  # noqa: SIM115 reader keeps part open
            n = self._file.readinto(buf)
            if n:
                return n
            self._file.close()
            self._file = None


def find_manifest(src: Path, name: str | None = None) -> Path:
    """The ``NAME.manifest.json`` in ``src`` (the only one, or the one named).

    Raises:
        UnpackError: none, or several and no ``name``.
    """
    found = sorted(src.glob(f"{name or '*'}.manifest.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise UnpackError(
            f"{src}: {what} *.manifest.json found; pass the folder `titanenv assets pack` wrote"
            + (" and --name" if found else "")
        )
    return found[0]


def check_parts(src: Path, manifest: Manifest) -> None:
    """Every part present with its size and sha256, and the lockfile as packed.

    Raises:
        UnpackError: naming the first part that is missing or differs.
    """
    for p in manifest.parts:
        path = src / p.name
        if not path.is_file():
            raise UnpackError(f"{path}: missing archive part ({len(manifest.parts)} parts expected)")
        if path.stat().st_size != p.size or sha256_file(path) != p.sha256:
            raise UnpackError(
                f"{path}: archive part is corrupt or incomplete (size/sha256 differ from the manifest); copy it again"
            )
    if sha256_file(src / manifest.lockfile) != manifest.lock_sha256:
        raise UnpackError(f"{src / manifest.lockfile}: lockfile differs from the one packed")


def unpack(src: Path, home: Path, name: str | None = None) -> tuple[Manifest, list[Problem], bool]:
    """Unpack the archive in ``src`` into ``home`` and verify the lockfile there.

    Returns:
        The manifest, the verification problems (empty when all is intact), and whether the
        archive had been unpacked already (marker present: nothing was extracted).

    Raises:
        UnpackError: missing or corrupt parts, or an unsafe member.
    """
    manifest = Manifest.model_validate_json(find_manifest(src, name).read_text())
    check_parts(src, manifest)
    lock = lockfile.read(src / manifest.lockfile)
    marker = home / "titanenv" / "unpacked" / f"{manifest.archive_id}.done"
    done = marker.is_file()
    if not done:
        home.mkdir(parents=True, exist_ok=True)
        # zstandard's stubs ask for a full IO[bytes]; stream_reader only calls read()/readinto() on it
        stream = zstandard.ZstdDecompressor().stream_reader(_Concat([src / p.name for p in manifest.parts]))  # type: ignore[arg-type]
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                _extract(tar, member, home)
    problems = verify(lock, home)
    if not problems and not done:
        lockfile.write(marker.parent / f"{manifest.name}.lock.json", lock)  # for `assets verify --lock` here
        atomic.write_bytes(marker, f"{manifest.name}\n".encode())
    return manifest, problems, done


def _checked(member: tarfile.TarInfo, home: Path) -> tarfile.TarInfo:
    """``member`` as :func:`tarfile.data_filter` passes it for ``home``; never absolute, ``..`` or a hard link.

    data_filter follows links already on disk, so a path or link that leaves ``home`` through
    one is caught; it would strip a leading ``/`` and allow hard links, which are refused here.

    Raises:
        UnpackError: naming the member and why it is unsafe.
    """
    name = member.name
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise UnpackError(f"archive member {name!r}: absolute or '..' path; refusing to unpack")
    if member.islnk():
        raise UnpackError(f"archive member {name!r}: hard link; refusing")
    try:
        return tarfile.data_filter(member, str(home))
    except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
        raise UnpackError(
            f"archive member {name!r}: link to {member.linkname!r} points outside {home}; refusing"
        ) from None
    except tarfile.SpecialFileError:
        raise UnpackError(f"archive member {name!r}: special file; refusing") from None
    except (tarfile.OutsideDestinationError, tarfile.AbsolutePathError):
        raise UnpackError(
            f"archive member {name!r}: its folder leads outside {home} through a link; refusing"
        ) from None
    except tarfile.FilterError as e:
        raise UnpackError(f"archive member {name!r}: {e}; refusing") from None


def _extract(tar: tarfile.TarFile, original: tarfile.TarInfo, home: Path) -> None:
    member = _checked(original, home)
    name, dest = member.name, home / member.name
    if member.isdir():
        dest.mkdir(parents=True, exist_ok=True)
    elif member.issym():
        link = member.linkname
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() and os.readlink(dest) == link:
            return
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
        tmp.unlink(missing_ok=True)
        os.symlink(link, tmp)
        os.replace(tmp, dest)
    elif member.isfile():
        expected = member.pax_headers.get(SHA_HEADER)
        if (
            dest.is_file()
            and not dest.is_symlink()
            and dest.stat().st_size == member.size
            and (expected is None or sha256_file(dest) == expected)
        ):
            return  # in place from an earlier (interrupted) run
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write(tar.extractfile(original), dest, expected, name)
    else:
        raise UnpackError(f"archive member {name!r}: special file; refusing")


def _write(src: IO[bytes] | None, dest: Path, expected: str | None, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            while src is not None and (chunk := src.read(CHUNK)):
                h.update(chunk)
                out.write(chunk)
        if expected is not None and h.hexdigest() != expected:
            raise UnpackError(f"archive member {name!r}: content differs from its recorded sha256")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
