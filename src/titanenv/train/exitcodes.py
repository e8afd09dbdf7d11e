"""The exit codes of ``titanenv train``: the one table, read by Python and rendered into the sbatch script.

The training sbatch template (``slurm/templates/train.sbatch.j2``) gets these values from
:func:`table`, so the script's ``if ((rc == ...))`` and the Python side cannot drift apart.
Any other code is torchrun's own (a failed training), passed on unchanged.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "table"]


class ExitCode(IntEnum):
    """What ``titanenv train`` (one node) exits with."""

    DONE = 0
    """Training ran its planned steps (or there was nothing left to do)."""
    PREFLIGHT_FAILED = 3
    """The preflight failed on some node; torchrun never started. Not requeued."""
    STOPPED = 75
    """Checkpointed and stopped before the planned steps on request (EX_TEMPFAIL: try again);
    the sbatch script requeues the job."""

    def __str__(self) -> str:  # the number, also on Python 3.10 (bash and log lines read it)
        return str(int(self))


def table() -> dict[str, int]:
    """``{name: code}`` as plain ints, for templates."""
    return {c.name: int(c) for c in ExitCode}
