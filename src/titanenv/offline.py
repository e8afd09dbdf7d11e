"""The offline environment: what a compute-node job sets so nothing reaches for the network.

The variables live in ``offline.env`` beside this module, read by bash (``container_run.sh``,
the sbatch files) and by this module, so the two can never disagree. :func:`guard_sockets` is
the proof's fallback where the network cannot be cut with ``unshare -n``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shlex
import socket
from pathlib import Path
from typing import Any

ENV_FILE = Path(__file__).with_name("offline.env")
log = logging.getLogger("titanenv.offline")


def offline_environment(path: Path = ENV_FILE) -> tuple[dict[str, str], list[str]]:
    """Parse ``offline.env``.

    Returns:
        ``(set, unset)``: variables to set with their values, and variables to clear.
    """
    to_set: dict[str, str] = {}
    to_unset: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("unset "):
            to_unset.extend(line.split()[1:])
        else:
            key, _, value = line.partition("=")
            to_set[key] = " ".join(shlex.split(value))  # bash's unquoting: no_proxy='*' is *
    return to_set, to_unset


def apply(environ: dict[str, str] | os._Environ = os.environ, verbose: bool = False) -> None:
    """Set the offline environment in ``environ`` and log it with an ``Offline mode:`` prefix."""
    to_set, to_unset = offline_environment()
    environ.update(to_set)
    cleared = [name for name in to_unset if environ.pop(name, None) is not None]
    log.info("Offline mode: %d variables set, %d proxy variables cleared", len(to_set), len(cleared))
    if verbose:
        for key, value in to_set.items():
            log.info("Offline mode: %s=%s", key, value)
        for name in cleared:
            log.info("Offline mode: unset %s", name)


OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE")
"""The four variables that switch the Hugging Face libraries to their local caches."""


def is_offline(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """The offline flags set to a true value (``1``, ``true``, ``yes``, ``on``); empty when online."""
    return [f for f in OFFLINE_FLAGS if environ.get(f, "").strip().lower() in ("1", "true", "yes", "on")]


def describe(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """One line per variable of ``offline.env``: its value in ``environ``, and whether that is the offline one."""
    to_set, to_unset = offline_environment()
    lines = []
    for key, value in to_set.items():
        now = environ.get(key)
        mark = "ok" if now == value else f"expected {value}"
        lines.append(f"Offline mode: {key}={now if now is not None else '(unset)'} [{mark}]")
    for name in to_unset:
        lines.append(f"Offline mode: {name} {'(unset) [ok]' if name not in environ else 'is set [expected unset]'}")
    return lines


class NetworkBlocked(OSError):
    """A connection to a non-loopback address was attempted while :func:`guard_sockets` is active."""

    def __init__(self, target: str) -> None:
        super().__init__(errno.ENETUNREACH, f"Offline mode: network is cut, refused connection to {target}")
        self.target = target


_attempts: list[str] = []
_installed = False


def guard_sockets() -> list[str]:
    """Make every socket connection to a non-loopback address raise :class:`NetworkBlocked`.

    The fallback where ``unshare -n`` is not permitted: it covers Python-level sockets
    (``socket.connect``/``connect_ex``/``sendto``, ``getaddrinfo`` of remote names), which is what
    huggingface_hub, datasets, evaluate, nltk and httpx use; native code that opens sockets by
    itself is not covered. Loopback and Unix sockets stay allowed. Idempotent.

    Returns:
        The list every blocked attempt is appended to (``host:port``), for reports.
    """
    global _installed
    if _installed:
        return _attempts
    real_connect, real_connect_ex, real_sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto
    real_getaddrinfo = socket.getaddrinfo

    def check(address: object) -> None:
        if isinstance(address, tuple) and len(address) >= 2 and not _is_local(str(address[0])):
            target = f"{address[0]}:{address[1]}"
            _attempts.append(target)
            raise NetworkBlocked(target)

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: bytes, *args: Any) -> int:
        check(args[-1])
        return real_sendto(self, data, *args)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host is not None:
            check((host.decode() if isinstance(host, bytes) else str(host), port))
        return real_getaddrinfo(host, port, *args, **kwargs)

    # the guard replaces the methods on the class on purpose (typeshed's stdlib stubs forbid that)
    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto  # type: ignore[method-assign, assignment]
    socket.getaddrinfo = getaddrinfo
    _installed = True
    return _attempts


def _is_local(host: str) -> bool:
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a name: resolving it needs DNS, which is the network
