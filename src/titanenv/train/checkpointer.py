"""TorchTitan's DCP checkpoint manager with completion markers, logged resume decisions and safe retention.

Differences from ``torchtitan.components.checkpoint.CheckpointManager`` (everything else,
DCP format and folder layout included, is TorchTitan's):

- **Marker.** After a save has finished on every rank, rank 0 lists the folder and writes
  :data:`titanenv.train.checkpoints.MARKER` atomically (for async saves, when the save's
  future completes). A stale marker in the target folder is removed before saving, and
  :data:`~titanenv.train.checkpoints.SAVING` left until the marker replaces it, so an
  interrupted save is known as our own crash debris (a requeue is not refused for it).
- **Resume.** The load step is the newest folder *with a valid marker*; newer folders
  without one are skipped and every decision is logged (``resume: ...`` lines). Rank 0
  decides and broadcasts, so all ranks load the same step even if their views of the
  filesystem differ (which is logged as an error).
- **Retention.** ``keep_latest_k`` counts complete checkpoints only. Older complete ones are
  deleted, and incomplete folders older than the newest complete one only when they are this
  run's crash debris (newer than the step it resumed from) or an interrupted purge
  (:func:`titanenv.train.checkpoints.purgeable`). The marker is renamed to
  :data:`~titanenv.train.checkpoints.PURGING` first, so a purge that is interrupted never
  leaves a folder that looks complete.
- **Refusal.** A checkpoint folder holding ``step-N`` folders but no complete one is never
  trained over (:func:`titanenv.train.checkpoints.guard`; ``titanenv train`` refuses it in
  preflight already).
- **Forced save.** :meth:`MarkedCheckpointManager.save_now` writes a full checkpoint at any
  step (the stop-on-signal path of :mod:`titanenv.train.trainer`).
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torchtitan.components.checkpoint import TRAIN_STATE, AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

from titanenv.slurmenv import SlurmEnv, node_name
from titanenv.train import checkpoints

__all__ = ["MarkedCheckpointManager"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class MarkedCheckpointManager(CheckpointManager):  # type: ignore[misc]  # torchtitan ships no type hints
    """DCP checkpoints that count only with a completion marker (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):  # type: ignore[misc]  # torchtitan ships no type hints
        """TorchTitan's checkpoint settings; ``keep_latest_k`` counts complete checkpoints."""

    last_saved_step: int = -1
    """The newest step on disk from this process's point of view: saved or resumed from (-1: none)."""

    resume_step: int = -1
    """The complete checkpoint this run resumed from (-1: a fresh start); incomplete folders older than it are
    never purged (see :func:`titanenv.train.checkpoints.purgeable`)."""

    def _marker_info(self) -> dict[str, object]:
        slurm = SlurmEnv.from_env()
        return {
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "job": slurm.job_id or "",
            "restart": str(slurm.restart_count or 0),
        }

    def _mark(self, step: int) -> None:
        path = Path(self._create_checkpoint_id(step))
        checkpoints.write_marker(path, step, **self._marker_info())
        logger.info(f"checkpoint step-{step} complete: wrote {path / checkpoints.MARKER}")
        self._purge_complete()

    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        if _rank() == 0:
            # A folder left by an earlier attempt may still hold its marker; it must not vouch for new shards.
            # The SAVING tag marks an interrupted save as our own debris.
            checkpoints.begin_save(self._create_checkpoint_id(curr_step), **self._marker_info())
        saved: bool = super()._save(curr_step, last_step)
        if saved:
            self.last_saved_step = curr_step
            if _rank() == 0:
                self._mark_when_written(curr_step, last_step)
        return saved

    def _load(self, step: int = -1) -> bool:
        if step != -1:  # --checkpoint.load-step: TorchTitan skips _find_load_step
            self.resume_step = step
        loaded: bool = super()._load(step)
        if loaded:
            self.last_saved_step = int(self.states[TRAIN_STATE].state_dict()["step"])
        return loaded

    def _mark_when_written(self, step: int, last_step: bool) -> None:
        future = self.save_future if self.async_mode != AsyncMode.DISABLED and not last_step else None
        if isinstance(future, Future):
            # Rank 0's future completes after DCP wrote .metadata, i.e. after every rank's shards.
            future.add_done_callback(lambda f: self._mark(step) if f.exception() is None else None)
        else:
            self._mark(step)  # dcp.save returned: every rank's shards and .metadata are written

    @torch.no_grad()
    def save_now(self, step: int) -> None:
        """Write a full, synchronous checkpoint of ``step`` now, whatever the interval (collective)."""
        if not self.enable:
            return
        self.maybe_wait_for_saving()
        if _rank() == 0:
            checkpoints.begin_save(self._create_checkpoint_id(step), **self._marker_info())
        logger.info(f"Saving a full checkpoint at step {step} (stop requested).")
        self.dcp_save(
            self._flattened_model_states_sd(),
            checkpoint_id=self._create_checkpoint_id(step),
            async_mode=AsyncMode.DISABLED,
            enable_garbage_collection=True,
        )
        self.last_saved_step = step
        if _rank() == 0:
            self._mark(step)
        if dist.is_initialized():
            dist.barrier()  # no rank leaves before the marker exists

    def _purge_stale_checkpoints(self) -> None:
        """Replaced by :meth:`_purge_complete`, which runs after the marker is written."""

    def _purge_complete(self) -> None:
        if self.keep_latest_k <= 0 or _rank() != 0:
            return
        doomed = checkpoints.purgeable(checkpoints.scan(self.folder), self.keep_latest_k, self.resume_step)
        for state in doomed:
            # Marker first: an interrupted deletion must never look complete (nor like someone's unmarked checkpoint).
            checkpoints.begin_purge(state.path)
            logger.info(f"retention: deleting {state.path} ({state.reason or 'complete, beyond keep_latest_k'})")
            if self.purge_thread is not None and self.purge_thread.is_alive():
                self.purge_queue.put(str(state.path))
            else:
                shutil.rmtree(state.path, ignore_errors=True)

    def _find_load_step(self, folder: str = "") -> int:
        folder = folder or self.folder
        guard = checkpoints.guard(folder)
        if not guard.ok:  # `titanenv train` refuses this in preflight; this catches a bare torchrun
            raise RuntimeError(f"checkpoints: {guard.detail} -- fix: {guard.fix}")
        decision = checkpoints.choose_resume(folder)
        step = decision.step
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [step]
            dist.broadcast_object_list(box, src=0)
            if box[0] != step:
                logger.error(
                    f"rank {dist.get_rank()} on {node_name()} sees step {step} as the newest complete "
                    f"checkpoint in {folder} but rank 0 sees {box[0]}: is the folder on a shared filesystem? "
                    "Using rank 0's choice."
                )
            step = box[0]
        for line in decision.lines:
            logger.info(line)
        self.resume_step = step
        return step
