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
- **LoRA** (``--lora.rank`` > 0, :mod:`titanenv.train.lora`).
- **Infini-attention** (``--infini.segment-len`` > 0, :mod:`titanenv.train.infini`): every attention
  layer converted, the gates in their own optimizer group (first), ``sigmoid(β)`` per layer and head
  logged to TensorBoard at every metrics step (``infini/gate/layers.{i}/head{h}``,
  ``infini/gate_mean/layers.{i}``, histogram ``infini/gates``) and the final values written to
  ``status.json`` (``infini``). Not together with LoRA (refused).
- **Config checks** when the config is built (before any process group): every optimizer param group
  sets ``weight_decay``; ``--attn-backend`` and ``--fused-adam`` are resolved and logged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
import tyro
from torchtitan.components.metrics import LoggerContainer, TensorBoardLogger
from torchtitan.models.common.attention import FlexAttention, GQAttention, ScaledDotProductAttention
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from titanenv.slurmenv import node_name
from titanenv.train import control, cpu, infini, lora, peak, preflight, vocab

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

        infini: infini.InfiniOptions = field(default_factory=infini.InfiniOptions)
        """Infini-attention (``--infini.segment-len`` > 0) in every layer; see :mod:`titanenv.train.infini`."""

        attn_backend: Literal["auto", "flex", "sdpa"] = "auto"
        """Attention kernel. auto: the recipe's (FlexAttention with per-document masks on CUDA, causal SDPA
        without CUDA). sdpa: causal SDPA on every host, attention crossing documents inside a window and no
        per-document positions, as on CPU (the workflow's --disable-flash-attn). flex: FlexAttention; needs CUDA.
        Infini-attention's local attention is SDPA inside each segment whatever this says."""

        fused_adam: bool = False
        """Set ``fused=True`` (and ``foreach=False``) in every Adam/AdamW param group on CUDA (the workflow's
        --enable-fused-adam); ignored, with a log line, without CUDA. Off: --optimizer.implementation decides."""

        def build(self, **kwargs: Any) -> Any:  # a TitanenvTrainer (TorchTitan's Config.build)
            """Check the config, resolve the vocabulary against the tokenizer, then build the trainer.

            Raises:
                FileNotFoundError: if ``hf_assets_path`` has no ``tokenizer.json``.
                ValueError: a config error, naming the flag or field: ``vocab_size`` smaller than the
                    tokenizer's vocabulary, an optimizer group without ``weight_decay``, LoRA together
                    with Infini-attention, bad ``--infini.*`` values, ``--attn-backend flex`` without CUDA.
            """
            check_config(self)
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
        if config.infini.enabled:
            _add_infini(config)
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
        out = super().train_step(data_iterator)
        if self.config.infini.enabled and self.metrics_processor.should_log(self.step):
            self._log_gates()
        return out

    def _gates(self) -> dict[str, torch.Tensor]:
        """``sigmoid(β)`` of every Infini layer this rank holds; a collective under FSDP (every rank calls it)."""
        return {fqn: v for part in self.model_parts for fqn, v in infini.gate_values(part).items()}

    def _log_gates(self) -> None:
        """Gate scalars and histogram to the metrics logger (a no-op logger on every rank but the metrics rank)."""
        gates = self._gates()
        self.metrics_processor.logger.log(infini.gate_metrics(gates), self.step)
        writer = _summary_writer(self.metrics_processor.logger)
        if writer is not None and gates:
            writer.add_histogram("infini/gates", torch.cat(list(gates.values())).cpu(), self.step)

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
        gates = self._gates() if path and self.config.infini.enabled else None  # every rank: a collective
        if path and (not dist.is_initialized() or dist.get_rank() == 0):
            record = _gate_record(self.config.infini, gates) if gates is not None else None
            control.write_status(path, state=state, step=self.step, steps=self.config.training.steps, reason=reason,
                                 parameters=self.parameter_counts, infini=record)  # fmt: skip
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


def _add_infini(config: TitanenvTrainer.Config) -> None:
    """Turn every attention config into Infini-attention and put the gate group first in the optimizer (idempotent)."""
    cfg = config.infini.config()
    model = config.model_spec.model
    if not any(isinstance(c, infini.InfiniAttention.Config) for _, c, _, _ in model.traverse(GQAttention.Config)):
        infini.infini_model_config(model, cfg)
    config.optimizer = infini.with_gate_param_group(config.optimizer, cfg)
    n_seg = -(-config.training.seq_len // cfg.segment_len)
    logger.info(
        f"Infini-attention: {n_seg} segments of {cfg.segment_len} tokens per {config.training.seq_len}-token sample, "
        f"memory {cfg.update}, documents {cfg.documents}; gates from {cfg.gate_init:g}, "
        f"lr {cfg.gate_lr:g}, weight decay {cfg.gate_weight_decay:g}"
    )


def _gate_record(options: infini.InfiniOptions, gates: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``status.json``'s ``infini`` entry: the settings and the final ``sigmoid(β)`` per layer (list per head)."""
    metrics = infini.gate_metrics(gates)
    prefix = "infini/gate_mean/"
    means = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    per_head = {layer: [v for k, v in metrics.items() if k.startswith(f"infini/gate/{layer}/head")] for layer in means}
    return {**asdict(options), "gates": per_head, "gate_mean": means}


def _summary_writer(metric_logger: Any) -> Any:
    """The SummaryWriter of TorchTitan's TensorBoard logger, if this rank has one (else None)."""
    loggers = metric_logger._loggers if isinstance(metric_logger, LoggerContainer) else [metric_logger]
    return next((lg.writer for lg in loggers if isinstance(lg, TensorBoardLogger)), None)


def check_config(config: TitanenvTrainer.Config) -> None:
    """Config errors before anything starts, and the host-dependent choices (attention, fused AdamW), logged.

    Raises:
        ValueError: naming the flag or field to change.
    """
    for i, group in enumerate(config.optimizer.param_groups):
        if group.optimizer_kwargs.get("weight_decay") is None:
            state = "is None" if "weight_decay" in group.optimizer_kwargs else "is missing"
            raise ValueError(
                f"optimizer.param_groups[{i}] (pattern {group.pattern!r}, {group.optimizer_name}): "
                f"optimizer_kwargs['weight_decay'] {state}; set it explicitly (e.g. 0.0 or 0.1) in the recipe's "
                "--optimizer param group, since the optimizer's own default would apply silently"
            )
    if config.infini.enabled:
        if config.lora.rank > 0:
            raise ValueError(
                f"--infini.segment-len {config.infini.segment_len} with --lora.rank {config.lora.rank}: not supported; "
                "LoRA freezes every non-adapter weight, so the Infini gates would not train, and a Hugging Face "
                "base has no gates. Use one of them (--infini.segment-len 0 or --lora.rank 0)"
            )
        config.infini.config()  # range checks, naming the --infini.* flag
        par = config.parallelism
        for flag, degree in (("tensor-parallel-degree", par.tensor_parallel_degree),
                             ("context-parallel-degree", par.context_parallel_degree)):  # fmt: skip
            if degree > 1:
                raise ValueError(f"--parallelism.{flag} {degree}: Infini-attention supports FSDP/DDP only (1)")
    _resolve_attention(config)
    _resolve_fused_adam(config)


def _resolve_attention(config: TitanenvTrainer.Config) -> None:
    """Apply ``--attn-backend`` and log one line: which attention runs, and why."""
    choice = config.attn_backend
    spec = config.model_spec
    if choice == "flex" and cpu.cpu_only():
        raise ValueError("--attn-backend flex: FlexAttention needs CUDA (it has no backward on CPU); use auto or sdpa")
    old_gpu = None
    if choice == "auto" and not cpu.cpu_only() and torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        old_gpu = f"sm_{major}{minor} < sm_80: FlexAttention needs Ampere or newer"  # e.g. V100 on JUWELS Cluster
    if choice == "sdpa" or old_gpu:
        cpu.use_causal_sdpa(spec)
        if hasattr(config.dataloader, "document_positions"):
            config.dataloader.document_positions = False
    flex = any(True for _ in spec.model.traverse(FlexAttention.Config))
    if choice == "flex" and not flex:
        raise ValueError(f"--attn-backend flex: recipe {config.recipe!r} builds no FlexAttention; use auto or sdpa")
    sdpa = any(True for _ in spec.model.traverse(ScaledDotProductAttention.Config))
    backend = "flex" if flex else "sdpa" if sdpa else "other"
    if choice != "auto":
        why = f"--attn-backend {choice}"
    elif old_gpu:
        why = old_gpu
    elif cpu.cpu_only():
        why = "no CUDA"
    else:
        why = f"CUDA, torch {torch.__version__}"
    if config.infini.enabled:
        docs = "document mask from positions" if getattr(config.dataloader, "document_positions", False) else "causal"
        logger.info(
            f"attention: infini, local softmax by sdpa inside {config.infini.segment_len}-token segments ({docs}; "
            f"the recipe's {backend} is unused) plus compressive memory ({why})"
        )
    else:
        logger.info(f"attention: {backend} ({why})")


def _resolve_fused_adam(config: TitanenvTrainer.Config) -> None:
    """``--fused-adam``: ``fused=True`` in every Adam/AdamW group on CUDA; without CUDA only a log line."""
    if not config.fused_adam:
        return
    if cpu.cpu_only():
        logger.info("--fused-adam is ignored on CPU (no CUDA): --optimizer.implementation decides")
        return
    for group in config.optimizer.param_groups:
        if group.optimizer_name in ("Adam", "AdamW"):
            group.optimizer_kwargs = {**group.optimizer_kwargs, "fused": True, "foreach": False}
    logger.info("--fused-adam: fused=True in every Adam/AdamW param group")


TitanenvConfig = TitanenvTrainer.Config
"""The config class the recipes return (an alias kept for existing imports)."""
