"""The run's model, rebuilt on one CPU process from its recipe and a complete DCP checkpoint.

Single process, no torch.distributed: the model is rebuilt from the same recipe
(:mod:`titanenv.train.recipes`) with the vocabulary and sequence length the run recorded in
``OUTPUT/trainer_config.json``, and its weights are read from a complete DCP checkpoint
``OUTPUT/checkpoint/step-N`` (complete = titanenv's completion marker, see
:mod:`titanenv.train.checkpoints`). Attention is plain causal SDPA here, as in CPU training;
a run with LoRA adapters or Infini-attention (``--infini.segment-len`` > 0) gets them back.
Used by evaluation, export and generation, so that all three read the model the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from titanenv.train import checkpoints
from titanenv.train.infini import InfiniConfig, InfiniOptions, infini_model_config
from titanenv.train.lora import LoraOptions

__all__ = ["RunRecord", "latest_checkpoint", "load_model", "read_run_record", "run_config"]


@dataclass(frozen=True)
class RunRecord:
    """What evaluation needs to know about a training run.

    Attributes:
        recipe: config function name in :mod:`titanenv.train.recipes`.
        vocab_size: model vocabulary (rows of the embedding).
        seq_len: training sequence length in tokens (RoPE cache size).
        tokenizer_dir: folder with ``tokenizer.json``.
        lora: the LoRA adapters of a fine-tune (None: no adapters).
        base_model: the Hugging Face folder a fine-tune started from (``--checkpoint.initial-load-path``).
        infini: the Infini-attention settings of the run (None: the baseline's attention).
    """

    recipe: str
    vocab_size: int
    seq_len: int
    tokenizer_dir: Path
    lora: LoraOptions | None = None
    base_model: Path | None = None
    infini: InfiniConfig | None = None


def read_run_record(output_dir: str | os.PathLike[str]) -> RunRecord:
    """Read ``OUTPUT/trainer_config.json`` (written by rank 0 of a titanenv recipe run).

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it lacks the recipe name (not a titanenv recipe run).
    """
    from titanenv.train.recipes import CONFIG_RECORD

    path = Path(output_dir) / CONFIG_RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no training record; is {output_dir} the --output-dir of `titanenv train`? "
            f"(plain torchtitan runs need --debug.save-config-file {CONFIG_RECORD})"
        )
    cfg = json.loads(path.read_text())
    if not cfg.get("recipe"):
        raise ValueError(f"{path}: no 'recipe' entry; the run did not use a titanenv.train.recipes config")
    lora = cfg.get("lora") or {}
    infini = InfiniOptions(**(cfg.get("infini") or {}))
    base = (cfg.get("checkpoint") or {}).get("initial_load_path")
    return RunRecord(
        recipe=cfg["recipe"],
        vocab_size=int(cfg["vocab_size"]),
        seq_len=int(cfg["training"]["seq_len"]),
        tokenizer_dir=Path(cfg["hf_assets_path"]),
        lora=LoraOptions(**lora) if int(lora.get("rank", 0)) > 0 else None,
        base_model=Path(base) if base else None,
        infini=infini.config() if infini.enabled else None,
    )


def run_config(run: RunRecord) -> Any:
    """The run's recipe config as it trained (vocabulary, ``seq_len``, LoRA, Infini-attention), with causal SDPA.

    ``config.model_spec.model`` is ready to build on one CPU process.
    """
    from titanenv.train import lora
    from titanenv.train.recipes import load_recipe, set_vocab_size, use_causal_sdpa

    config = load_recipe(run.recipe)
    set_vocab_size(config, run.vocab_size)
    config.training.seq_len = run.seq_len
    use_causal_sdpa(config.model_spec)  # FlexAttention has no CPU path worth using here
    if run.lora is not None:
        config.lora = run.lora
        config.model_spec.model = lora.convert(config.model_spec.model, run.lora)
    if run.infini is not None:
        config.infini = InfiniOptions(**asdict(run.infini))
        infini_model_config(config.model_spec.model, run.infini)
    config.model_spec.model.update_from_config(config=config)
    return config


def latest_checkpoint(output_dir: str | os.PathLike[str], folder: str = "checkpoint") -> tuple[int, Path]:
    """Newest ``step-N`` under ``OUTPUT/folder`` that is complete (has titanenv's completion marker).

    Returns:
        ``(N, path)``.

    Raises:
        FileNotFoundError: if there is none.
    """
    root = Path(output_dir) / folder
    decision = checkpoints.choose_resume(root)
    if decision.path is None:
        raise FileNotFoundError(
            f"{root}: no complete checkpoint (step-N/{checkpoints.MARKER}); train first with `titanenv train`"
        )
    return decision.step, decision.path


def load_model(
    output_dir: str | os.PathLike[str], *, step: int | None = None
) -> tuple[torch.nn.Module, RunRecord, int, Path]:
    """Rebuild the run's model on CPU and load checkpoint weights (latest, or ``step``).

    Returns:
        ``(model in eval mode, run record, step, checkpoint path)``. The model maps
        ``int64[B, L]`` token ids to ``float32[B, L, vocab_size]`` logits, ``L <= seq_len``.

    Raises:
        FileNotFoundError: if the record or the checkpoint is missing.
    """
    import torch.distributed.checkpoint as dcp

    run = read_run_record(output_dir)
    if step is None:
        step, ckpt = latest_checkpoint(output_dir)
    else:
        ckpt = Path(output_dir) / "checkpoint" / f"step-{step}"
        state = next((s for s in checkpoints.scan(ckpt.parent) if s.step == step), None)
        if state is None or not state.complete:
            reason = state.reason if state else "no such folder"
            raise FileNotFoundError(f"{ckpt}: not a complete checkpoint ({reason})")
    model_config = run_config(run).model_spec.model
    with torch.device("meta"):
        model = model_config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)  # buffers (RoPE cache) are not in the checkpoint
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(ckpt))  # reads only the model keys; DTensor shards are gathered
    model.load_state_dict(state)
    model.eval()
    return model, run, step, ckpt
