"""TorchTitan's Trainer plus what a Slurm job needs: stop at a step boundary, hang watchdog, preflight all-reduce.

``TitanenvTrainer.Config`` is what the recipes in :mod:`titanenv.train.recipes` return
(``TitanenvConfig`` is the same class). TorchTitan builds the trainer from it
(``config.build()``), so ``python -m torchtitan.train --module titanenv.train.recipes``
runs this class; nothing of TorchTitan is patched. Additions to TorchTitan's loop:

- **Vocabulary** follows the tokenizer (``--vocab-size``, see :class:`TitanenvTrainer.Config`).
- **Preflight all-reduce** right after the process group exists
  (:func:`titanenv.train.preflight.allreduce_check`).
- **Stop request** (:mod:`titanenv.train.control`): at every step boundary the ranks agree
  whether a stop was asked (stop file or SIGUSR1); if so they write a full checkpoint of
  the last finished step (unless that step was just saved), rank 0 writes
  ``status.json`` with ``state: stopped``, and training returns normally. ``titanenv
  train`` turns that into exit code 75 (requeue).
- **Hang watchdog** armed per step.
- **MFU peak** from :mod:`titanenv.train.peak` (A100 312, H100/H200/GH200 989 TFLOP/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
import torch.distributed as dist
import tyro
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from titanenv.slurmenv import node_name
from titanenv.train import control, lora, peak, preflight, vocab

__all__ = ["JobControl", "TitanenvConfig", "TitanenvTrainer"]


@dataclass(kw_only=True, slots=True)
class JobControl:
    """Run control for batch jobs (``--control.*``); ``titanenv train`` sets the files."""

    stop_file: str = ""
    """When this file appears (the sbatch script creates it on SIGUSR1 before the time limit), all
    ranks checkpoint at the next step boundary and stop. SIGUSR1 to any rank does the same. Empty: signal only."""

    status_file: str = ""
    """Rank 0 writes how training ended here (JSON: state completed/stopped, step). Empty: not written."""

    stop_check_every: int = 1
    """Check for a stop request every N steps (one small gloo all-reduce per check)."""

    hang_timeout_s: float = 0.0
    """Dump every rank's Python stacks when a step takes longer than this. 0: 80% of
    --comm.train-timeout-seconds (the first step: 80% of --comm.init-timeout-seconds); <0: off."""

    allreduce_timeout_s: float = 60.0
    """Preflight: the first all-reduce across all ranks must finish within this many seconds. 0: skip."""

    peak_tflops: float = 0.0
    """Dense bf16 peak TFLOP/s per device for MFU. 0: from the device name (titanenv.train.peak)."""


class TitanenvTrainer(Trainer):  # type: ignore[misc]  # torchtitan ships no type hints
    """TorchTitan's Trainer with stop-on-request, a hang watchdog and a preflight all-reduce."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):  # type: ignore[misc]  # torchtitan ships no type hints
        """TorchTitan's trainer config plus a model vocabulary that follows the tokenizer and job control."""

        vocab_size: int = 0
        """Model vocabulary (embedding rows). 0: the tokenizer's vocabulary rounded up to a multiple of 64."""

        recipe: Annotated[str, tyro.conf.Suppress] = ""
        """Name of the config function that made this config (recorded for evaluation; not a flag)."""

        control: JobControl = field(default_factory=JobControl)

        lora: lora.LoraOptions = field(default_factory=lora.LoraOptions)
        """LoRA adapters (``--lora.rank`` > 0): only they train; see :mod:`titanenv.train.lora`."""

        def build(self, **kwargs: Any) -> Any:  # a TitanenvTrainer (TorchTitan's Config.build)
            """Resolve the vocabulary against the tokenizer, then build the trainer.

            Raises:
                FileNotFoundError: if ``hf_assets_path`` has no ``tokenizer.json``.
                ValueError: if ``vocab_size`` is smaller than the tokenizer's vocabulary.
            """
            tok_vocab = vocab.tokenizer_vocab_size(self.hf_assets_path)
            if self.vocab_size == 0:
                self.vocab_size = vocab.padded_vocab_size(tok_vocab)
            elif self.vocab_size < tok_vocab:
                raise ValueError(
                    f"--vocab-size {self.vocab_size} is smaller than the {tok_vocab} tokens of "
                    f"{self.hf_assets_path}/tokenizer.json; use 0 (automatic) or >= {tok_vocab}"
                )
            vocab.set_vocab_size(self, self.vocab_size)
            # Explicit base call: zero-argument super() fails in slots dataclasses.
            return Trainer.Config.build(self, **kwargs)

    config: Config

    def __init__(self, config: Config) -> None:
        ctl = config.control
        # Before anything slow: a USR1 during start-up must already count.
        self.stop_request = control.StopRequest(ctl.stop_file or None)
        self.parameter_counts: dict[str, int] | None = None
        if config.lora.rank > 0:
            if not config.checkpoint.initial_load_path:
                raise ValueError(
                    "LoRA (--lora.rank > 0) trains adapters on base weights, and none were given: pass "
                    "--checkpoint.initial-load-path HF_DIR --checkpoint.initial-load-in-hf, "
                    "or use `titanenv finetune --from`"
                )
            _add_lora(config)
        super().__init__(config)
        if config.lora.rank > 0:
            self._check_lora()
        self._set_mfu_peak(ctl.peak_tflops)
        hang = ctl.hang_timeout_s
        if hang == 0:
            hang = 0.8 * config.comm.train_timeout_seconds
            first = 0.8 * config.comm.init_timeout_seconds
        else:
            first = max(hang, 0.8 * config.comm.init_timeout_seconds)
        self.watchdog = control.HangWatchdog(hang, first)

    # -- start-up

    def init_distributed(self) -> Any:  # torchtitan's ParallelDims
        parallel_dims = super().init_distributed()
        node = node_name()
        if self.config.control.allreduce_timeout_s > 0 and dist.is_initialized():
            took = preflight.allreduce_check(self.config.control.allreduce_timeout_s, self.device, node)
            logger.info(
                f"preflight ok on {node}: all-reduce over {dist.get_world_size()} ranks "
                f"({dist.get_backend()}) in {took:.3f} s"
            )
        # Stop agreement runs on CPU: the default group on CPU runs, a gloo group beside NCCL on GPU.
        self.control_group = None
        if dist.is_initialized() and dist.get_backend() != "gloo":
            self.control_group = dist.new_group(backend="gloo")
        return parallel_dims

    def _check_lora(self) -> None:
        """Fail before the first step unless the optimizer holds exactly the adapters; log the counts."""
        tensors = lora.check_optimizer(self.model_parts, self.optimizers)
        counts = lora.parameter_counts(self.model_parts)
        self.parameter_counts = counts
        total = counts["trainable"] + counts["frozen"]
        logger.info(
            f"LoRA r={self.config.lora.rank} alpha={self.config.lora.alpha:g} on "
            f"{','.join(self.config.lora.target_modules)}: trainable {counts['trainable']:,} parameters "
            f"({100 * counts['trainable'] / max(1, total):.2f}%, {tensors} tensors in the optimizer), "
            f"frozen {counts['frozen']:,}"
        )

    def _set_mfu_peak(self, tflops: float) -> None:
        name = self.metrics_processor.device_memory_monitor.device_name
        flops = tflops * 1e12 if tflops > 0 else peak.peak_flops(name)
        if flops and torch.cuda.is_available():
            self.metrics_processor.gpu_peak_flops = flops
            logger.info(f"MFU against {flops / 1e12:.0f} TFLOP/s dense bf16 per device ({name})")

    # -- the loop

    def train_step(self, data_iterator: Any) -> Any:
        self.watchdog.arm()  # covers this step and the checkpoint save after it, until the next step
        return super().train_step(data_iterator)

    def should_continue_training(self) -> bool:
        if not super().should_continue_training():
            return False
        if self.step % max(1, self.config.control.stop_check_every) != 0:
            return True
        if not control.agree(self.stop_request.local(), self.control_group):
            return True
        self.watchdog.disarm()
        # The step just finished may already be on disk (interval save, or the step this run resumed from).
        on_disk = getattr(self.checkpointer, "last_saved_step", -1) == self.step
        if self.step == 0:
            logger.warning("stop requested before the first step: nothing to checkpoint; stopping")
        else:
            note = " (already on disk)" if on_disk else ""
            logger.warning(
                f"stop requested: checkpointing step {self.step} and stopping{note}; the job requeues itself"
            )
        if not self.config.checkpoint.enable:
            logger.warning("checkpointing is disabled (--checkpoint.enable): the next run starts again at step 1")
        elif self.step > 0 and not on_disk:
            self.checkpointer.save_now(self.step)
        self._write_status("stopped", f"stop requested after step {self.step}")
        return False

    def train(self) -> None:
        super().train()
        self.watchdog.disarm()
        if self.step >= self.config.training.steps:
            self._write_status("completed", f"reached step {self.step}")

    def _write_status(self, state: str, reason: str) -> None:
        path = self.config.control.status_file
        if path and (not dist.is_initialized() or dist.get_rank() == 0):
            control.write_status(path, state=state, step=self.step, steps=self.config.training.steps, reason=reason,
                                 parameters=self.parameter_counts)  # fmt: skip
        if dist.is_initialized():
            dist.barrier(group=self.control_group)  # every launcher reads the status only after this


def _add_lora(config: TitanenvTrainer.Config) -> None:
    """Put the adapters into the model config, and re-freeze the base right after ``parallelize``."""
    spec = config.model_spec
    spec.model = lora.convert(spec.model, config.lora)
    parallelize = spec.parallelize_fn
    dropout = config.lora.dropout

    def parallelize_then_freeze(model: Any, *args: Any, **kwargs: Any) -> Any:
        out = parallelize(model, *args, **kwargs)
        lora.freeze(out if out is not None else model, dropout)
        return out

    spec.parallelize_fn = parallelize_then_freeze


TitanenvConfig = TitanenvTrainer.Config
"""The config class the recipes return (an alias kept for existing imports)."""
