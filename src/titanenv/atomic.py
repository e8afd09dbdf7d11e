"""Atomic file writes: a temporary file beside the target, then a rename over it.

Readers see the old file or the new one, never a partial one. ``durable=True`` also fsyncs the
file and its folder, so after a crash the file is either absent or whole (checkpoint markers).
Standard library only: ``env/set_up.sh`` uses it before anything is installed.

Temporary names are ``NAME.tmp.PID.HOST[.RANDOM]`` (``HOST`` with dots as ``_``), so a later run
can tell a leftover of a dead process (:func:`sweep_temp`) from a file another process is
still writing. A full disk raises :class:`DiskFull`, naming the path and the free space.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("titanenv.atomic")
_TMP = ".tmp."


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def temp_path(path: str | os.PathLike, *, pid: int | None = None, host: str | None = None) -> Path:
    """``PATH.tmp.PID.HOST``: the temporary name a process writes ``path`` under before the rename."""
    path = Path(path)
    host = (host if host is not None else socket.gethostname()).replace(".", "_") or "localhost"
    return path.with_name(f"{path.name}{_TMP}{os.getpid() if pid is None else pid}.{host}")


def _writer_of(name: str) -> tuple[int, str] | None:
    """(pid, host) from a temporary name made by :func:`temp_path`, or None for other names."""
    if _TMP not in name:
        return None
    fields = name.rsplit(_TMP, 1)[1].split(".")
    if len(fields) < 2 or not fields[0].isdigit() or not fields[1]:
        return None
    return int(fields[0]), fields[1]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def sweep_temp(folder: str | os.PathLike, names: tuple[str, ...] = ("",)) -> list[Path]:
    """Delete temporary files in ``folder`` (not below it) left by dead processes of this host.

    A file qualifies when its name starts with one of ``names``, it was made by
    :func:`temp_path` (or :func:`write_bytes`), its host is this host and its pid is no longer
    running. Files of live processes and of other hosts (whose pids cannot be checked) stay;
    the latter are logged.

    Returns:
        The files deleted (each is logged).
    """
    folder = Path(folder)
    me = _host()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        name = entry.name.removeprefix(".")
        writer = _writer_of(name)
        if writer is None or not name.startswith(names) or not entry.is_file(follow_symlinks=False):
            continue
        pid, host = writer
        if host != me:
            log.info(
                "%s: temporary file of pid %d on host %s; left in place (delete it if no run is active there)",
                entry.path,
                pid,
                host,
            )
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        Path(entry.path).unlink(missing_ok=True)
        log.warning("%s: removed a temporary file left by pid %d, which is no longer running", entry.path, pid)
        removed.append(Path(entry.path))
    return removed


class DiskFull(OSError):
    """No space left on the device (``errno`` is ``ENOSPC``); the message names the path, the
    bytes free there and, where known, the bytes needed. Build it with :func:`disk_full`."""

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for unprivileged writers on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def disk_full(path: str | os.PathLike, needed: int | None = None, what: str = "writing") -> DiskFull:
    """A :class:`DiskFull` for ``path``: "PATH: no space left on device while WHAT (N bytes needed, F bytes free)"."""
    try:
        free = f"{free_bytes(Path(path).parent)} bytes free"
    except OSError:
        free = "free space unknown"
    need = f"{needed} bytes needed, " if needed is not None else ""
    return DiskFull(
        errno.ENOSPC,
        f"{path}: no space left on device while {what} ({need}{free} there); "
        "free up space there, or write to another filesystem, then rerun the same command",
    )


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically, with the permissions the umask allows (not 0600).

    Raises:
        DiskFull: the filesystem is full (or over quota); the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{temp_path(path).name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # files are shared with jobs and colleagues
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(path, len(data)) from e
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    return path


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """:func:`write_bytes` of ``text`` as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(
    path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False, durable: bool = False
) -> Path:
    """:func:`write_bytes` of ``obj`` as JSON with a final newline."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n", durable=durable)
