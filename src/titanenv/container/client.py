"""The container runtime (Apptainer or Singularity), found on PATH and driven through spython's Client.

spython's Client runs inspect and exec; titanenv never uses spython's definition parser or
writer (docs/container.md says why). spython always starts the command named ``singularity``:
Apptainer installs that name only as a compatibility link, which some installs lack, and where
it exists it may belong to another (older) install. So every command the client builds starts
with the path of the runtime chosen here instead.

``apptainer build`` stays a plain subprocess in ``build.py``: ``container/build_container.sh``
runs before spython is installed, and spython's ``Client.build`` drops the runtime's exit status
(it returns the image path even when the build failed) and swallows its error output.

Importing this module needs the standard library only; spython is imported when first used.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

__all__ = ["RUNTIMES", "ClientError", "execute", "find_runtime", "inspect", "spython_client"]

RUNTIMES = ("apptainer", "singularity")


class ClientError(RuntimeError):
    """No runtime, no spython, or a runtime command failed; the message says which and what to do."""


def find_runtime(choice: str = "auto") -> str:
    """The runtime's command name: ``choice``, or for ``auto`` apptainer, else singularity.

    Raises:
        ClientError: ``choice`` is ``none`` or unknown, or the runtime is not on PATH.
    """
    if choice == "none":
        raise ClientError(
            "TITANENV_CONTAINER_RUNTIME=none: no container runtime is used, so there is no image to build or inspect "
            "(set it to auto, apptainer or singularity)"
        )
    if choice not in ("auto", *RUNTIMES):
        raise ClientError(f"container runtime {choice!r}: use auto, apptainer or singularity")
    for name in RUNTIMES if choice == "auto" else (choice,):
        if shutil.which(name):
            return name
    raise ClientError(f"no {'apptainer or singularity' if choice == 'auto' else choice} on PATH")


def spython_client(runtime: str) -> Any:
    """spython's Client, each of whose commands starts with the path of ``runtime`` (not ``singularity``).

    Raises:
        ClientError: spython is not installed, or ``runtime`` is not on PATH.
    """
    try:
        from spython.main import get_client
    except ImportError:
        raise ClientError(
            "spython is not installed in this Python: run `env/set_up.sh install` (it is in the lock)"
        ) from None
    path = shutil.which(runtime)
    if not path:
        raise ClientError(f"no {runtime} on PATH")
    client = get_client(quiet=False)  # quiet=True would insert --quiet before the action
    init_command = client._init_command

    def _init_command(action, flags=None):
        cmd = init_command(action, flags)
        cmd[0] = path  # spython writes "singularity" here
        return cmd

    client._init_command = _init_command
    return client


def inspect(runtime: str, image: Path) -> dict[str, Any]:
    """``RUNTIME inspect`` of ``image``: ``deffile`` (the embedded definition), ``labels``, ``helpfile``, ``test``...

    Raises:
        ClientError: spython or the runtime is missing, or inspect failed (its message is included).
    """
    result = spython_client(runtime).inspect(image=str(image), quiet=True)
    if not isinstance(result, dict) or "attributes" not in result:
        message = result.get("message") if isinstance(result, dict) else result
        raise ClientError(f"{runtime} inspect {image} failed: {_text(message)}")
    return result["attributes"]


def execute(runtime: str, image: Path, command: list[str], bind: list[str] | None = None, nv: bool = True) -> str:
    """Run ``command`` in ``image`` (``RUNTIME exec [--nv] [--bind B]... IMAGE COMMAND``); return its output.

    Raises:
        ClientError: spython or the runtime is missing, a bind source does not exist, or the
            command failed (its exit status and output are included).
    """
    for b in bind or []:
        if not Path(b.split(":")[0]).exists():  # spython would exit the process instead
            raise ClientError(f"bind source {b.split(':')[0]} does not exist")
    result = spython_client(runtime).execute(
        image=str(image), command=command, bind=bind, nv=nv, return_result=True, quiet=True
    )
    if result["return_code"] != 0:
        raise ClientError(
            f"{runtime} exec {image} {' '.join(command)} exited {result['return_code']}: {_text(result['message'])}"
        )
    return _text(result["message"])


def _text(message: Any) -> str:
    if isinstance(message, list):
        return "".join(str(m) for m in message).strip()
    return str(message or "").strip()
