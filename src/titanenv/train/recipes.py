"""TorchTitan config functions for titanenv (``--module titanenv.train.recipes``).

Use with TorchTitan's own entry point; every value can be overridden with its flags::

    torchrun ... -m torchtitan.train --module titanenv.train.recipes --config titanenv_debug \\
        --hf-assets-path TOKENIZER_DIR --dataloader.path DATA_PREFIX \\
        --dump-folder OUT --training.steps 100 --training.seq-len 256

Recipes:

``titanenv_debug``
    TorchTitan's llama3 debug model (6 layers, dim 256, 16 heads; 6.2M parameters
    with a 2048 vocabulary), fp32, eager, AdamW lr 8e-4, seq_len 512, batch 8 per
    rank, 100 steps, log every step, checkpoint every 10 steps (keep 3), TensorBoard
    on; fits a laptop CPU.
``titanenv_1b``
    Llama-3.2-1B shape (16 layers, dim 2048, GQA 32/8, tied embeddings, RoPE llama3 scaling
    with factor 32 as in Meta's config.json, not TorchTitan's 8; 1.076B parameters with
    GPT-2's padded 50304 vocabulary) for GPU nodes: FSDP with bf16
    parameters / fp32 reductions, torch.compile, selective activation
    checkpointing, FlexAttention with per-document masks, seq_len 2048, batch 4 per
    GPU, AdamW lr 3e-4 with 500 warmup steps and cosine decay, checkpoint every 500
    steps. Not exercised here (no GPU).
``titanenv_debug_lora``
    ``titanenv_debug`` with LoRA adapters (r 8, alpha 16, on wqkv, wo, w1, w2, w3), AdamW lr
    1e-3 without weight decay, 20 steps, base weights read from Hugging Face safetensors
    (``--checkpoint.initial-load-path HF_DIR``, which ``titanenv finetune --from`` sets).
``titanenv_1b_lora``
    Llama-3.2-1B (or a ``titanenv_1b`` run) for LoRA fine-tuning: ``titanenv_1b`` with LoRA r 16,
    alpha 32 on every block Linear, AdamW lr 2e-4 without weight
    decay, 50 warmup steps, 1000 steps, checkpoint every 200, base from Hugging Face safetensors.
``titanenv_debug_infini``, ``titanenv_1b_infini``
    ``titanenv_debug`` / ``titanenv_1b`` unchanged (data, optimizer, schedule, steps: a fair baseline) with
    Infini-attention (arXiv:2404.07143, :mod:`titanenv.train.infini`) in every layer: 16 segments per
    sample (``--infini.segment-len`` = seq_len // 16: 32 and 128; the Hugging Face post-mortem needed
    that many), linear memory update, memory reset at document boundaries, gates from 0 in their own
    AdamW group with lr 1e-2 and no weight decay. The gates go to TensorBoard (``infini/gate/...``).
    Trained from scratch; not exportable to Hugging Face Llama (no such layer there).

Vocabulary: the model's embedding/output size is ``--vocab-size``; the default 0
means "the tokenizer's vocabulary (with added tokens) rounded up to a multiple of
64", read from ``tokenizer.json`` in ``--hf-assets-path`` when the trainer is
built. The tokenizer is only ever read from that local folder (TorchTitan's
``HuggingFaceTokenizer`` loads ``<hf_assets_path>/tokenizer.json``; it never
contacts the Hub).

Every recipe builds :class:`titanenv.train.trainer.TitanenvTrainer` (TorchTitan's trainer plus
stop-at-a-step-boundary on request, a hang watchdog and a preflight all-reduce; ``--control.*``
flags) and :class:`titanenv.train.checkpointer.MarkedCheckpointManager` (a checkpoint counts
only with its completion marker; resume skips, and logs, the incomplete ones).

Importing this module applies :mod:`titanenv.train.cpu` (process-level workarounds;
the CPU ones only without CUDA). On CPU the recipes also switch attention to causal
SDPA, turn off per-document positions, use plain-SUM FSDP reductions, and disable
CUDA graphs and compile. On every host they use the ``partial_dtensor`` SPMD backend
(torch 2.13's ``fully_shard`` fails with TorchTitan 0.3.0's default ``spmd_types``
once there are two or more data-parallel ranks).
"""

from __future__ import annotations

import logging

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.config.configs import DebugConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.models.llama3 import model_registry

from titanenv.train import cpu
from titanenv.train.checkpointer import MarkedCheckpointManager
from titanenv.train.cpu import use_causal_sdpa
from titanenv.train.dataloader import MegatronDataloader
from titanenv.train.infini import InfiniOptions
from titanenv.train.job import RECIPE_SEQ_LEN
from titanenv.train.lora import LoraOptions
from titanenv.train.trainer import TitanenvConfig
from titanenv.train.vocab import VOCAB_MULTIPLE, padded_vocab_size, set_vocab_size, tokenizer_vocab_size

__all__ = [
    "CONFIG_RECORD",
    "TitanenvConfig",
    "VOCAB_MULTIPLE",
    "load_recipe",
    "padded_vocab_size",
    "recipe_names",
    "set_vocab_size",
    "titanenv_1b",
    "titanenv_1b_infini",
    "titanenv_1b_lora",
    "titanenv_debug",
    "titanenv_debug_infini",
    "titanenv_debug_lora",
    "tokenizer_vocab_size",
    "use_causal_sdpa",
]

cpu.apply()  # runs in every torchrun worker: torchtitan.train imports this module to find the recipe


def _parallelism() -> ParallelismConfig:
    # torch 2.13's fully_shard rejects the plain-tensor parameters that TorchTitan 0.3.0's
    # default "spmd_types" backend hands it once there are 2+ data-parallel ranks
    # ("all parameters must be DTensors on the full SPMD mesh"). "partial_dtensor" is the
    # classic FSDP2 path (DTensor only on TP axes).
    return ParallelismConfig(spmd_backend="partial_dtensor")


CONFIG_RECORD = "trainer_config.json"
"""File in the dump folder where rank 0 records the final config (read by :mod:`titanenv.eval`)."""


def _debug() -> DebugConfig:
    return DebugConfig(save_config_file=CONFIG_RECORD)


def _loss(vocab_size: int) -> ChunkedLossWrapper.Config:
    return ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=vocab_size))


def _adapt_to_host(config: TitanenvConfig) -> TitanenvConfig:
    """Apply the CPU settings documented in :mod:`titanenv.train.cpu` when there is no CUDA."""
    if not cpu.cpu_only():
        return config
    use_causal_sdpa(config.model_spec)
    config.model_spec.parallelize_fn = cpu.parallelize_for_cpu(config.model_spec.parallelize_fn)
    config.dataloader.document_positions = False
    config.training.disable_cuda_graphs = True
    config.compile.enable = False
    return config


def titanenv_debug() -> TitanenvConfig:
    """Tiny llama3 (TorchTitan debug model) for smoke tests and CPU runs."""
    spec = model_registry("debugmodel", attn_backend="flex")
    config = TitanenvConfig(
        recipe="titanenv_debug",
        model_spec=spec,
        hf_assets_path="./tokenizer",
        dump_folder="./outputs",
        loss=_loss(spec.model.vocab_size),
        optimizer=default_adamw(lr=8e-4),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=2, decay_ratio=0.8, decay_type="linear", min_lr_factor=0.0
        ),
        training=TrainingConfig(local_batch_size=8, seq_len=RECIPE_SEQ_LEN["titanenv_debug"], steps=100),
        dataloader=MegatronDataloader.Config(),
        metrics=MetricsProcessor.Config(log_freq=1, enable_tensorboard=True),
        checkpoint=MarkedCheckpointManager.Config(
            enable=True, interval=10, last_save_model_only=False, keep_latest_k=3
        ),
        activation_checkpoint=None,
        parallelism=_parallelism(),
        debug=_debug(),
    )
    return _adapt_to_host(config)


def titanenv_1b() -> TitanenvConfig:
    """~1B-parameter llama3 (Llama-3.2-1B shape) for GPU nodes: bf16 FSDP, compile, SAC."""
    spec = model_registry("1B", attn_backend="flex")
    for layer in spec.model.layers:
        # Meta's Llama-3.2-1B config.json has factor 32 (TorchTitan's 1B flavor: 8): so this recipe's runs and
        # Meta's weights are the same model, and titanenv_1b_lora fine-tunes either.
        layer.attention.rope.scaling_factor = 32.0
    config = TitanenvConfig(
        recipe="titanenv_1b",
        model_spec=spec,
        hf_assets_path="./tokenizer",
        dump_folder="./outputs",
        loss=_loss(spec.model.vocab_size),
        optimizer=default_adamw(lr=3e-4),
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=500, decay_ratio=0.2, decay_type="cosine", min_lr_factor=0.1
        ),
        training=TrainingConfig(
            local_batch_size=4,
            seq_len=RECIPE_SEQ_LEN["titanenv_1b"],
            steps=10000,
            mixed_precision_param="bfloat16",
            mixed_precision_reduce="float32",
        ),
        dataloader=MegatronDataloader.Config(),
        metrics=MetricsProcessor.Config(log_freq=10, enable_tensorboard=True),
        checkpoint=MarkedCheckpointManager.Config(
            enable=True, interval=500, last_save_model_only=False, keep_latest_k=3
        ),
        activation_checkpoint=SelectiveAC.Config(),
        compile=CompileConfig(enable=True, components=["model", "loss"]),
        parallelism=_parallelism(),
        debug=_debug(),
    )
    return _adapt_to_host(config)


def _lora(config: TitanenvConfig, recipe: str, lora: LoraOptions, lr: float) -> TitanenvConfig:
    """``config`` as a LoRA fine-tune: adapters, base weights from Hugging Face, no weight decay."""
    config.recipe = recipe
    config.lora = lora
    config.optimizer = default_adamw(lr=lr, weight_decay=0.0)
    config.checkpoint.initial_load_in_hf = True  # the base: --checkpoint.initial-load-path HF_DIR
    config.checkpoint.initial_load_model_only = True
    return config


def titanenv_debug_lora() -> TitanenvConfig:
    """``titanenv_debug`` with LoRA adapters, fine-tuning Hugging Face weights (CPU ok)."""
    config = _lora(titanenv_debug(), "titanenv_debug_lora", LoraOptions(rank=8, alpha=16.0), lr=1e-3)
    config.training.steps = 20
    config.lr_scheduler.warmup_steps = 2
    return config


def titanenv_1b_lora() -> TitanenvConfig:
    """Llama-3.2-1B (RoPE llama3 factor 32, tied embeddings) LoRA fine-tune for GPU nodes."""
    config = _lora(titanenv_1b(), "titanenv_1b_lora", LoraOptions(rank=16, alpha=32.0), lr=2e-4)
    config.training.steps = 1000
    config.lr_scheduler.warmup_steps = 50
    config.checkpoint.interval = 200
    return config


INFINI_SEGMENTS = 16
"""Segments per sample in the Infini recipes (``segment_len = seq_len // INFINI_SEGMENTS``)."""


def _infini(config: TitanenvConfig, recipe: str) -> TitanenvConfig:
    """``config`` with Infini-attention, 16 segments per sample; nothing else changes."""
    config.recipe = recipe
    segment_len = config.training.seq_len // INFINI_SEGMENTS
    config.infini = InfiniOptions(segment_len=segment_len, gate_lr=1e-2, gate_weight_decay=0.0)
    return config


def titanenv_debug_infini() -> TitanenvConfig:
    """``titanenv_debug`` with Infini-attention (segments of 32 tokens; CPU ok)."""
    return _infini(titanenv_debug(), "titanenv_debug_infini")


def titanenv_1b_infini() -> TitanenvConfig:
    """``titanenv_1b`` with Infini-attention (segments of 128 tokens) for GPU nodes."""
    return _infini(titanenv_1b(), "titanenv_1b_infini")


def recipe_names() -> list[str]:
    """Names accepted by ``--config``."""
    return ["titanenv_debug", "titanenv_1b", "titanenv_debug_lora", "titanenv_1b_lora",
            "titanenv_debug_infini", "titanenv_1b_infini"]  # fmt: skip


def load_recipe(name: str) -> TitanenvConfig:
    """The config of recipe ``name``.

    Raises:
        ValueError: if there is no such recipe.
    """
    if name not in recipe_names():
        raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()}")
    # Read outside training (eval, export, finetune's checks), a recipe has no initial load path yet; TorchTitan
    # warns about that default on every build. Training itself builds the config through tyro, not here.
    quiet = _Without("initial_load_model_only=True has no effect")
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        config: TitanenvConfig = globals()[name]()
    finally:
        root.removeFilter(quiet)
    return config


class _Without(logging.Filter):
    """Drops log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
