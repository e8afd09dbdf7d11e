"""Where titanenv keeps its own records inside a run folder (``titanenv train --output-dir``).

::

    RUN/
      checkpoint/step-N/               DCP checkpoint + titanenv-complete.json (TorchTitan's folder)
      tb/                              TensorBoard (TorchTitan)
      tokenizer/                       the run's copy of the tokenizer
      cache/max-token-id.json          preflight: largest token id of data without a manifest, by .bin size and mtime
      trainer_config.json              resolved TorchTitan config of the latest start (rank 0)
      provenance/ATTEMPT/              one folder per start of the run (see titanenv.train.provenance)
        provenance.json                versions, git sha, image, nodes, times, command, exit
        config.json                    resolved trainer config of this attempt
        site.json                      resolved site configuration (configuration.sh)
        sbatch.sh                      the batch script that ran (Slurm jobs)
        pip-freeze.txt                 installed distributions
        status.json                    how training ended: completed / stopped (rank 0)
        preflight/NODE.txt             filesystem probes of the preflight
      logs/ATTEMPT/NODE/...            torchrun's per-rank stdout/stderr files

``ATTEMPT`` is ``job-<SLURM_JOB_ID>.<SLURM_RESTART_COUNT>`` in a Slurm job (the same on
every node, distinct after each requeue) and ``local-<date>-<time>-<pid>`` outside Slurm.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from titanenv.data import tokenizer as toklib
from titanenv.slurmenv import SlurmEnv

__all__ = ["TOKENIZER_FILES", "RunDir", "attempt_id", "stage_tokenizer"]


def attempt_id(env: Mapping[str, str]) -> str:
    """The id of this start of a run: per Slurm job and restart, else per local launch."""
    slurm = SlurmEnv.from_env(env)
    if slurm.job_id:
        return f"job-{slurm.job_id}.{slurm.restart_count or 0}"
    return f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


@dataclass(frozen=True)
class RunDir:
    """Paths of one attempt inside a run folder (nothing is created here)."""

    root: Path
    attempt: str

    @property
    def provenance(self) -> Path:
        return self.root / "provenance" / self.attempt

    @property
    def status(self) -> Path:
        return self.provenance / "status.json"

    @property
    def preflight(self) -> Path:
        return self.provenance / "preflight"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoint"

    def logs(self, node: str) -> Path:
        """torchrun's ``--log-dir`` on ``node``."""
        return self.root / "logs" / self.attempt / node


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
"""What :func:`stage_tokenizer` copies from a tokenizer folder."""


def stage_tokenizer(tokenizer: Path, output_dir: Path) -> Path:
    """Copy the tokenizer into ``OUTPUT/tokenizer/`` and return that folder.

    ``tokenizer`` is a ``tokenizer.json`` file (any name), a folder holding one (its
    ``tokenizer_config.json`` is copied too) or a Hub id in the local cache, found by
    :func:`titanenv.data.tokenizer.resolve`. TorchTitan loads ``<folder>/tokenizer.json``
    from ``--hf-assets-path``; a copy in the output folder keeps the run self-contained
    for resuming and evaluation. Copies are atomic, so concurrent nodes are safe.

    Raises:
        FileNotFoundError: if there is no tokenizer at ``tokenizer``.
    """
    found = toklib.resolve(tokenizer)  # the one resolver; TokenizerNotFound is a FileNotFoundError
    sources = {"tokenizer.json": found}
    if not Path(tokenizer).is_file():  # a folder (or cached Hub id): its tokenizer_config.json too
        folder = Path(tokenizer) if Path(tokenizer).is_dir() else found.parent
        sources |= {n: folder / n for n in TOKENIZER_FILES[1:] if (folder / n).is_file()}
    dest = Path(output_dir) / "tokenizer"
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        target = dest / name
        if target.is_file() and filecmp.cmp(src, target, shallow=False):
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    return dest
