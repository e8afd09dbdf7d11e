"""One run per output prefix: the lock file ``PREFIX.lock``.

Two runs writing one prefix would rename each other's files away. ``preprocess`` (per array
task: ``PREFIX-iiiii-of-nnnnn.lock``) and ``--merge`` (``PREFIX.lock``) hold this lock while
they write, and a second run fails at once with "prefix P in use by pid N on host H".

``flock`` is a no-op on some shared filesystems, so the lock is the file's existence:

- **Taking it:** ``open(O_CREAT | O_EXCL)``, atomic on local filesystems, NFSv3+, Lustre and
  GPFS; the holder writes ``{"pid", "host", "start", "time", "argv"}`` into it (``start``: the
  process's start time in clock ticks, to tell a reused pid).
- **Stale on this host:** the pid is not running (or runs a different process): the lock is
  taken over with a warning naming the dead pid.
- **Another host:** never taken over. Its pid cannot be checked from here, and a long job may
  hold the lock for days without a heartbeat, so no age makes it safe. The error gives the
  lock's age and says to delete ``PREFIX.lock`` if no run is active on that host (a node that
  crashed, a job killed by Slurm with SIGKILL).
- **Released** on exit from the ``with`` block (also on errors, SIGTERM and SIGINT); a SIGKILLed
  run leaves it, and the next run on the same host takes it over.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from titanenv.atomic import pid_alive

log = logging.getLogger("titanenv.lock")
_WAIT_FOR_CONTENT_S = 2.0  # a holder between its O_EXCL create and its write


class PrefixInUse(OSError):
    """Another run holds ``PREFIX.lock``: "prefix P in use by pid N on host H (...)" and the way out.

    Attributes:
        path: the lock file.
        holder: its content (``pid``, ``host``, ``time``...), ``{}`` if unreadable.
    """

    def __init__(self, message: str, path: Path | None = None, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder or {}


def lock_path(prefix: str | os.PathLike[str]) -> Path:
    """``PREFIX.lock``."""
    return Path(f"{os.fspath(prefix)}.lock")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _start_ticks(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class PrefixLock:
    """``with PrefixLock(prefix): ...`` holds ``PREFIX.lock`` (see the module docstring for the rules).

    Args:
        prefix: the output prefix (path without extension).

    Raises (from ``acquire``/``__enter__``):
        PrefixInUse: a live run holds it, a run on another host holds it, or the lock file is
            unreadable; the message names the holder and what to do.
        OSError: the folder cannot be written (named by the OS).
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = Path(prefix)
        self.path = lock_path(prefix)
        self._mine: dict[str, Any] | None = None
        self._owner_pid: int | None = None

    def acquire(self) -> PrefixLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_ticks(os.getpid()),
            "time": time.time(),
            "argv": sys.argv,
        }
        for _ in range(10):  # a few rounds: each lost race re-reads the new holder
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # removed meanwhile: try again
                if not self._stale(holder):
                    raise self._in_use(holder) from None
                self._take_over(holder)
                continue
            try:
                os.write(fd, (json.dumps(me) + "\n").encode())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            os.close(fd)
            self._mine, self._owner_pid = me, os.getpid()
            return self
        raise PrefixInUse(f"prefix {self.prefix} in use: {self.path} keeps changing hands; rerun later", self.path)

    def release(self) -> None:
        """Delete the lock file if this process holds it (a forked child never does)."""
        if self._mine is None or self._owner_pid != os.getpid():
            return
        holder = self._read(wait=False)
        if holder and holder.get("pid") == self._mine["pid"] and holder.get("host") == self._mine["host"]:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def __enter__(self) -> PrefixLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _read(self, wait: bool = True) -> dict[str, Any] | None:
        """The holder's record; None when the file is gone; ``{}`` when unreadable."""
        deadline = time.monotonic() + (_WAIT_FOR_CONTENT_S if wait else 0)
        while True:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                holder = json.loads(text)
                if isinstance(holder, dict) and "pid" in holder and "host" in holder:
                    return holder
            except ValueError:
                pass
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder or holder.get("host") != socket.gethostname():
            return False
        pid = int(holder["pid"])
        if not pid_alive(pid):
            return True
        start = holder.get("start")
        return start is not None and _start_ticks(pid) not in (None, start)  # the pid was reused

    def _in_use(self, holder: dict[str, Any]) -> PrefixInUse:
        if not holder:
            return PrefixInUse(
                f"prefix {self.prefix} in use: {self.path} exists but is unreadable; "
                f"if no titanenv run writes {self.prefix}, delete {self.path} and rerun",
                self.path,
            )
        age = time.time() - float(holder.get("time", time.time()))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if "time" in holder else "?"
        here = holder.get("host") == socket.gethostname()
        way_out = (
            "wait for it to finish, or stop it"
            if here
            else f"if no titanenv run is active on {holder['host']} (a crashed node, a job killed with SIGKILL), "
            f"delete {self.path} and rerun"
        )
        return PrefixInUse(
            f"prefix {self.prefix} in use by pid {holder['pid']} on host {holder['host']} "
            f"(since {since}, {_ago(age)}; lock {self.path}): {way_out}",
            self.path,
            holder,
        )

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Move the stale lock aside (atomic rename: one taker wins), then retry the create."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run took it over first
        try:
            moved = json.loads(aside.read_text() or "{}")
        except (OSError, ValueError):
            moved = {}
        if moved.get("pid") != holder.get("pid") or moved.get("time") != holder.get("time"):
            # A fresh lock appeared between the read and the rename: give it back.
            try:
                os.link(aside, self.path)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        log.warning(
            "%s: took over a stale lock of pid %s on %s (no longer running, since %s)",
            self.path,
            holder.get("pid"),
            holder.get("host"),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0))),
        )
