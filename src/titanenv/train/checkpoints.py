"""Which checkpoints are complete, which one a run resumes from, and what may be deleted (file logic; torch
is imported only to read a DCP ``.metadata`` for ``--trust-unmarked``).

A checkpoint ``OUTPUT/checkpoint/step-N`` counts only when it holds the completion marker
:data:`MARKER`, written atomically by rank 0 after DCP's save returned on every rank (see
:mod:`titanenv.train.checkpointer`). DCP's own ``.metadata`` is not enough on its own:

- a job killed while a retention purge deletes an old checkpoint leaves a folder whose
  ``.metadata`` may outlive some of its shards; the marker is removed before the purge starts;
- a shard truncated by a full quota or a partial copy (rsync to another machine) keeps its
  ``.metadata``; the marker records every file's size, and resume checks them;
- TorchTitan also accepts a folder with only ``model.safetensors.index.json`` (an HF export,
  not resumable training state).

The resume decision, with a reason for every folder skipped, is returned as a
:class:`ResumeDecision` so the trainer can log it.

What a run may overwrite or delete (:func:`guard`, :func:`purgeable`): a folder that holds
``step-N`` folders but no complete one is refused (they may be a user's intact checkpoints whose
markers were lost; ``--resume-from step-N --trust-unmarked`` checks one against its DCP
``.metadata`` and marks it). Once a run resumed from the newest complete checkpoint ``R``:

- complete checkpoints beyond ``keep_latest_k`` are deleted (only older than the newest);
- an incomplete folder *newer* than ``R`` is crash debris of this run's own interrupted save:
  training redoes those steps and replaces it (a save into it), or deletes it once a newer
  checkpoint is complete;
- an incomplete folder *older* than ``R`` is never deleted, unless it carries :data:`PURGING`
  (a deletion by retention that was interrupted) or :data:`SAVING` (a save by titanenv's
  trainer that was interrupted).

A folder with :data:`SAVING` and no marker is always this run's crash debris, so a job killed
during its very first save is not refused on its requeue; a folder with neither is not ours.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titanenv import atomic

__all__ = [
    "MARKER",
    "CheckpointState",
    "ResumeDecision",
    "PURGING",
    "SAVING",
    "Guard",
    "begin_purge",
    "begin_save",
    "choose_resume",
    "complete_steps",
    "guard",
    "parse_step",
    "purgeable",
    "read_marker",
    "remove",
    "scan",
    "trust",
    "verify_unmarked",
    "write_json_atomic",
    "write_marker",
]

MARKER = "titanenv-complete.json"
"""Completion marker in each ``step-N`` folder: JSON with the step, time, job and file sizes."""

PURGING = "titanenv-purging.json"
"""Left in a ``step-N`` folder that retention is deleting (the marker is renamed to it first)."""

SAVING = "titanenv-saving.json"
"""Left in a ``step-N`` folder while titanenv's trainer saves into it; replaced by :data:`MARKER`."""

STEP_DIR = re.compile(r"step-(\d+)")


def parse_step(text: str | int) -> int:
    """``"step-40"``, ``"40"`` or ``40`` -> 40.

    Raises:
        ValueError: not a step.
    """
    m = re.fullmatch(r"(?:step-)?(\d+)", str(text).strip())
    if m is None:
        raise ValueError(f"{text!r} is not a checkpoint step: write step-N (a folder name under OUTPUT/checkpoint)")
    return int(m.group(1))


def write_json_atomic(path: str | os.PathLike[str], obj: object) -> Path:
    """Write ``obj`` as JSON to ``path``: temporary file, fsync, rename, fsync of the folder.

    A reader never sees a partial file, and after a crash the file is either absent or whole.
    """
    return atomic.write_json(path, obj, sort_keys=True, durable=True)


def write_marker(step_dir: str | os.PathLike[str], step: int, **info: object) -> Path:
    """Mark ``step_dir`` complete: list every file in it with its size, then write :data:`MARKER`.

    Call only after the checkpoint's save has finished on every rank. ``info`` (job id, world
    size ...) is recorded as given.
    """
    step_dir = Path(step_dir)
    files = {
        str(p.relative_to(step_dir)): p.stat().st_size
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name not in (MARKER, PURGING, SAVING) and not p.name.startswith(f".{MARKER}.")
    }
    record = {"step": step, "complete": True, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, **info}
    marker = write_json_atomic(step_dir / MARKER, record)
    (step_dir / SAVING).unlink(missing_ok=True)
    return marker


def begin_save(step_dir: str | os.PathLike[str], **info: object) -> Path:
    """Before a save into ``step_dir``: drop a stale marker and leave :data:`SAVING` (removed by
    :func:`write_marker`), so a save that is interrupted is known as this run's own crash debris."""
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / MARKER).unlink(missing_ok=True)
    (step_dir / PURGING).unlink(missing_ok=True)
    return write_json_atomic(step_dir / SAVING, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info})


def read_marker(step_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of ``step_dir``, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(step_dir) / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class CheckpointState:
    """One ``step-N`` folder and whether it can be resumed from.

    Attributes:
        step: N.
        path: the folder.
        complete: True when the marker is present and every file it lists has its recorded size.
        reason: why it is not complete (empty when it is).
        purging: retention began deleting it (:data:`PURGING`); never resumable.
        saving: titanenv's trainer began a save into it that never finished (:data:`SAVING`).
    """

    step: int
    path: Path
    complete: bool
    reason: str = ""
    purging: bool = False
    saving: bool = False

    @property
    def ours(self) -> bool:
        """Incomplete, and known to be titanenv's own debris (an interrupted purge or save)."""
        return not self.complete and (self.purging or self.saving)


def _check(step: int, path: Path) -> CheckpointState:
    record = read_marker(path)
    if record is None and (path / PURGING).exists():
        return CheckpointState(step, path, False, "partly deleted by retention (an interrupted purge)", purging=True)
    if record is None and (path / SAVING).exists():
        return CheckpointState(step, path, False, f"its save was interrupted ({SAVING}, no {MARKER})", saving=True)
    if record is None:
        return CheckpointState(step, path, False, f"no completion marker {MARKER} (its save did not finish)")
    if record.get("step") != step:
        return CheckpointState(step, path, False, f"its marker is for step {record.get('step')}, not {step}")
    for name, size in (record.get("files") or {}).items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            return CheckpointState(step, path, False, f"{name} is missing (truncated or partly deleted)")
        if actual != size:
            return CheckpointState(step, path, False, f"{name} has {actual} bytes, the marker says {size} (truncated)")
    return CheckpointState(step, path, True)


def scan(folder: str | os.PathLike[str]) -> list[CheckpointState]:
    """Every ``step-N`` folder under ``folder``, newest first, each checked (empty when none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        m = STEP_DIR.fullmatch(child.name)
        if m and child.is_dir():
            found.append(_check(int(m.group(1)), child))
    return sorted(found, key=lambda s: s.step, reverse=True)


def complete_steps(folder: str | os.PathLike[str]) -> list[int]:
    """Steps of the complete checkpoints under ``folder``, newest first."""
    return [s.step for s in scan(folder) if s.complete]


@dataclass(frozen=True)
class ResumeDecision:
    """Where a run starts: ``step`` (-1: fresh start) and the log lines that explain it."""

    step: int
    path: Path | None
    lines: list[str] = field(default_factory=list)


def choose_resume(folder: str | os.PathLike[str]) -> ResumeDecision:
    """The newest complete checkpoint under ``folder``; every newer, incomplete one is skipped with its reason."""
    states = scan(folder)
    lines = []
    for s in states:
        if s.complete:
            older = sum(1 for o in states if o.complete and o.step < s.step)
            lines.append(
                f"resume: step-{s.step} is complete ({older} older complete checkpoint(s) kept) "
                f"-> resuming from step {s.step}"
            )
            return ResumeDecision(s.step, s.path, lines)
        lines.append(f"resume: skipping {s.path}: {s.reason}")
    lines.append(f"resume: no complete checkpoint in {folder} -> fresh start at step 1")
    return ResumeDecision(-1, None, lines)


def begin_purge(step_dir: str | os.PathLike[str]) -> None:
    """First step of deleting ``step_dir``: rename its marker to :data:`PURGING` (atomic), so an
    interrupted deletion neither looks complete nor like someone's unmarked checkpoint."""
    step_dir = Path(step_dir)
    try:
        os.replace(step_dir / MARKER, step_dir / PURGING)
    except FileNotFoundError:
        (step_dir / PURGING).touch()


def remove(step_dir: str | os.PathLike[str]) -> None:
    """Delete ``step_dir``: :func:`begin_purge`, then its files."""
    begin_purge(step_dir)
    shutil.rmtree(step_dir, ignore_errors=True)


def purgeable(states: list[CheckpointState], keep: int, resume_step: int) -> list[CheckpointState]:
    """Which of ``states`` retention deletes (the rules are in the module docstring).

    Args:
        states: the ``step-N`` folders from :func:`scan`, newest first.
        keep: ``keep_latest_k``: complete checkpoints kept (<= 0: nothing is deleted).
        resume_step: the complete checkpoint this run resumed from (-1: a fresh start).

    Returns:
        Complete checkpoints beyond the newest ``keep``, and incomplete folders older than the
        newest complete one that are this run's crash debris (newer than ``resume_step``, or
        an interrupted save or purge). Never another incomplete folder older than ``resume_step``.
    """
    complete = [s for s in states if s.complete]
    if keep <= 0 or not complete:
        return []
    newest = complete[0].step
    debris = [s for s in states if not s.complete and s.step < newest and (s.ours or s.step > resume_step)]
    return complete[keep:] + debris


def verify_unmarked(step_dir: str | os.PathLike[str]) -> str:
    """Check an unmarked checkpoint against its DCP ``.metadata``; "" when it looks whole.

    ``.metadata`` must be present and readable by ``torch.distributed.checkpoint``; every shard
    file it names must be present, non-empty and at least as long as the last byte it records.

    Returns:
        "" when every check passes, else the first problem (one phrase naming the file).
    """
    step_dir = Path(step_dir)
    meta = step_dir / ".metadata"
    if not meta.is_file() or meta.stat().st_size == 0:
        return ".metadata is missing or empty (not a DCP checkpoint, or its save never finished)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(step_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 (any unpickling error means unreadable)
        return f".metadata is unreadable ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = getattr(info, "relative_path", None)
        if name is not None:
            needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    if not needed:
        return ".metadata names no shard files"
    for name, end in sorted(needed.items()):
        try:
            size = (step_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing (named in .metadata)"
        if size == 0:
            return f"{name} is empty"
        if size < end:
            return f"{name} has {size} bytes, .metadata needs {end} (truncated)"
    return ""


@dataclass(frozen=True)
class Guard:
    """Whether a run may start in a checkpoint folder, and why.

    Attributes:
        ok: the run may start.
        detail: one line: where it resumes, or why it may not (every folder with its reason).
        fix: the ways out when not ok.
        trust: the unmarked checkpoint to mark complete before training (``--trust-unmarked``).
    """

    ok: bool
    detail: str
    fix: str = ""
    trust: CheckpointState | None = None


def _names(states: list[CheckpointState]) -> str:
    return ", ".join(f"step-{s.step} ({s.reason})" for s in states)


def guard(folder: str | os.PathLike[str], resume_from: int | None = None, trust_unmarked: bool = False) -> Guard:
    """Whether training may start in ``folder`` without overwriting a checkpoint it must keep.

    Args:
        folder: ``OUTPUT/checkpoint``.
        resume_from: ``--resume-from``: the step to resume from (None: the newest complete one).
        trust_unmarked: ``--trust-unmarked``: accept an unmarked ``resume_from`` that passes
            :func:`verify_unmarked`; :func:`trust` marks it before training.

    Returns:
        A :class:`Guard`, not ok when the folder holds checkpoints but none is complete (and no
        trusted one is given), or when ``resume_from`` would overwrite a newer folder.
    """
    folder = Path(folder)
    states = scan(folder)
    complete = [s for s in states if s.complete]
    unknown = [s for s in states if not s.complete and not s.ours]
    ours = [s for s in states if s.ours]
    replaced = "training redoes those steps; it is replaced by the new save, or deleted once a newer one is complete"
    if resume_from is None or any(s.step == resume_from for s in complete):
        if complete:
            newest = complete[0]
            parts = [f"resume from step-{newest.step} (complete)"]
            if resume_from is not None and resume_from != newest.step:
                parts[0] += f"; --resume-from step-{resume_from} is complete but older: resuming from the newest"
            if debris := [s for s in unknown if s.step > newest.step]:
                parts.append(f"{_names(debris)}: newer than the newest complete checkpoint, so crash debris of an "
                             f"interrupted save of this run: {replaced}")  # fmt: skip
            if ours:
                parts.append(f"{_names(ours)}: titanenv's own crash debris: {replaced}")
            if kept := [s for s in unknown if s.step < newest.step]:
                parts.append(f"kept, never deleted: {_names(kept)}")
            return Guard(True, "; ".join(parts))
        if not unknown:
            if ours:
                return Guard(True, f"no complete checkpoint; {_names(ours)}: titanenv's own crash debris: {replaced}")
            return Guard(True, "no checkpoint yet")
        return Guard(
            False,
            f"{folder} holds checkpoint folders but none is complete: {_names(unknown)}",
            f"to resume from one, pass --resume-from step-N --trust-unmarked (titanenv first checks its DCP .metadata "
            f"and shard sizes, then marks it complete), e.g. --resume-from step-{unknown[0].step} --trust-unmarked; "
            "or start afresh with a new --output-dir. No checkpoint was touched",
        )
    target = next((s for s in states if s.step == resume_from), None)
    if target is None:
        found = ", ".join(f"step-{s.step}" for s in states) or "none"
        return Guard(
            False,
            f"--resume-from step-{resume_from}: there is no {folder}/step-{resume_from} (found: {found})",
            "pass one of the folders found, or drop --resume-from",
        )
    if newer := [s for s in states if s.step > resume_from and not s.ours]:
        names = ", ".join(f"step-{s.step}" for s in newer)
        return Guard(
            False,
            f"{names} {'is' if len(newer) == 1 else 'are'} newer than step-{resume_from}: resuming from "
            f"step-{resume_from} would overwrite {'it' if len(newer) == 1 else 'them'}",
            f"resume from the newest (--resume-from step-{newer[0].step}), or move the newer folders out "
            f"of {folder}. No checkpoint was touched",
        )
    if not trust_unmarked:
        return Guard(False, f"--resume-from step-{resume_from}: {target.reason}",
                     "add --trust-unmarked to check its .metadata and shard sizes and mark it complete; or pass a new "
                     "--output-dir. No checkpoint was touched")  # fmt: skip
    if problem := verify_unmarked(target.path):
        return Guard(
            False,
            f"--trust-unmarked: {target.path} is not a whole DCP checkpoint: {problem}",
            "pick another step-N, or start afresh with a new --output-dir. No checkpoint was touched",
        )
    return Guard(True, f"resume from step-{resume_from}: unmarked, but its .metadata and shards check out "
                 "(--trust-unmarked): marked complete before training starts", trust=target)  # fmt: skip


def trust(state: CheckpointState, **info: object) -> Path:
    """Mark the unmarked checkpoint ``state`` complete (``--trust-unmarked``), after :func:`verify_unmarked`.

    Returns:
        The marker written; it records ``trusted: true``.

    Raises:
        ValueError: the checkpoint no longer checks out.
    """
    if problem := verify_unmarked(state.path):
        raise ValueError(f"--trust-unmarked: {state.path} is not a whole DCP checkpoint: {problem}")
    return write_marker(state.path, state.step, trusted=True, **info)
