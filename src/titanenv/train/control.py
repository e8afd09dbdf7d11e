"""Run control inside the training processes: stop requests, rank agreement, hang watchdog, status.

**Stopping at the time limit.** The sbatch template asks Slurm for ``--signal=B:USR1@S``:
only the batch shell gets USR1, ``S`` seconds before the limit, and it creates the *stop
file* (``$TITANENV_STOP_FILE``, on the shared filesystem). Every rank checks, at each step
boundary, whether the stop file exists or it received SIGUSR1 itself (a ``scancel
--signal=USR1`` to the job step, or ``titanenv train`` forwarding one). Ranks may see the
file at different steps (filesystem caches, skew), so they agree with a MAX all-reduce of
their flags on a CPU (gloo) group: all stop at the same boundary, write one checkpoint
and exit cleanly. The all-reduce costs one small CPU message per step and never
synchronises with the GPU stream.

Why a file and not only the signal: a signal has to be forwarded through ``srun``, the
container runtime, ``titanenv train`` and torchrun's agent, which *dies* of USR1 (it
handles only TERM/INT/HUP/QUIT). A file on the shared filesystem reaches every rank
without touching any process in between. ``titanenv train`` therefore starts torchrun
with USR1 ignored (inherited by the agent; the workers install their own handler here).

**Hang watchdog.** :class:`HangWatchdog` arms ``faulthandler.dump_traceback_later`` at the
start of every step. If the step does not finish in time, the C-level watchdog thread
writes every Python thread's stack to stderr (no GIL needed, so it works while a rank is
stuck inside NCCL or gloo). In a collective hang every rank stalls, so every rank dumps;
torchrun's per-rank log files keep each dump. The dump starts with ``Timeout (H:MM:SS)!``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from titanenv.train.checkpoints import write_json_atomic

__all__ = ["HangWatchdog", "StopRequest", "agree", "read_status", "write_status"]

STOP_SIGNAL = signal.SIGUSR1


class StopRequest:
    """This rank's view of "please checkpoint and stop": the stop file, or SIGUSR1 received.

    Args:
        stop_file: path polled at step boundaries (None: signals only).
        install_handler: catch SIGUSR1 in this process (main thread only).
    """

    def __init__(self, stop_file: str | os.PathLike[str] | None, *, install_handler: bool = True) -> None:
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled = False
        if install_handler:
            signal.signal(STOP_SIGNAL, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = True

    def local(self) -> bool:
        """True once a stop was asked of this rank (cheap: one ``stat``)."""
        if not self.signalled and self.stop_file is not None and self.stop_file.exists():
            self.signalled = True
        return self.signalled


def agree(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is True on any rank (MAX all-reduce of one int on CPU).

    ``group`` must be a gloo group (the default group on CPU runs). Without
    ``torch.distributed``, returns ``flag``.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class HangWatchdog:
    """Dump all Python stacks if a step takes longer than ``timeout_s`` (see the module docstring).

    Args:
        timeout_s: seconds a step may take; 0 disables the watchdog.
        first_timeout_s: seconds for the first step of a process (compilation, NCCL set-up).
        file: where stacks go (a real file with a descriptor; stderr by default).
    """

    def __init__(self, timeout_s: float, first_timeout_s: float | None = None, file: TextIO | None = None) -> None:
        self.timeout_s = timeout_s
        self.first_timeout_s = first_timeout_s or timeout_s
        self.file = file or sys.stderr
        self._armed_steps = 0

    def arm(self) -> None:
        """Start (or restart) the countdown for the step that begins now."""
        if self.timeout_s <= 0:
            return
        timeout = self.first_timeout_s if self._armed_steps == 0 else self.timeout_s
        self._armed_steps += 1
        faulthandler.cancel_dump_traceback_later()
        faulthandler.dump_traceback_later(timeout, repeat=False, file=self.file, exit=False)

    def disarm(self) -> None:
        """Stop the countdown (training ended or is saving its last checkpoint)."""
        faulthandler.cancel_dump_traceback_later()


def write_status(
    path: str | os.PathLike[str],
    *,
    state: str,
    step: int,
    steps: int,
    reason: str = "",
    parameters: dict[str, int] | None = None,
    infini: dict[str, Any] | None = None,
) -> None:
    """Record how training ended (``state``: ``completed`` or ``stopped``) for ``titanenv train``.

    ``parameters``: trainable/frozen counts of a LoRA run (:func:`titanenv.train.lora.parameter_counts`);
    ``infini``: an Infini-attention run's settings and final gates.
    """
    status: dict[str, object] = {"state": state, "step": step, "steps": steps, "reason": reason,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    if parameters is not None:
        status["parameters"] = parameters
    if infini is not None:
        status["infini"] = infini
    write_json_atomic(path, status)


def read_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The status written by :func:`write_status`, or None when there is none."""
    try:
        status: dict[str, Any] = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return status
