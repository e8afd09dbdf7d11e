"""TorchTitan llama3 state -> Hugging Face ``LlamaForCausalLM`` state and ``config.json``, refusing any loss.

:func:`load_state` reads the model weights of a complete DCP checkpoint of a titanenv run into
plain CPU tensors of the rebuilt model's shapes (no weight init, no optimizer state).
:func:`to_hf` renames them with TorchTitan's own ``Llama3StateDictAdapter.to_hf`` (which also
permutes Q/K from TorchTitan's interleaved complex RoPE to Hugging Face's half-split layout) one
key at a time, because that adapter silently skips a layer key it has no mapping for: here every
key must come out under exactly one new name, the tied ``lm_head.weight`` excepted, or
:class:`ExportRefused` names the keys. :func:`hf_config` writes ``config.json``'s model fields
from the built model's config and weight shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from titanenv.train import checkpoints
from titanenv.train.model import RunRecord, latest_checkpoint, read_run_record, run_config

__all__ = ["ExportRefused", "LoadedState", "hf_config", "load_state", "resolve_checkpoint", "to_hf"]

NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")
"""Top-level DCP keys of TorchTitan's checkpoint that are training state, not model weights."""
TIED = "lm_head.weight"


class ExportRefused(ValueError):
    """The export would drop state; ``keys`` lists the TorchTitan keys, also named in the message."""

    def __init__(self, keys: list[str], why: str) -> None:
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:20]) + (f" (and {len(self.keys) - 20} more)" if len(self.keys) > 20 else "")
        super().__init__(f"export refused: {why}: {shown}; nothing was written")


@dataclass(frozen=True)
class LoadedState:
    """Model weights of one checkpoint and what they belong to.

    Attributes:
        state: TorchTitan key -> float32 CPU tensor (tied keys share one tensor).
        model_config: the rebuilt ``Llama3Model.Config`` (RoPE sized to the run's ``seq_len``).
        adapter: TorchTitan's state dict adapter for that config.
        run: the run's record (recipe, vocabulary, seq_len, tokenizer folder).
        step: the checkpoint's step.
        checkpoint: its folder, ``RUN/checkpoint/step-N``.
    """

    state: dict[str, torch.Tensor]
    model_config: Any
    adapter: Any
    run: RunRecord
    step: int
    checkpoint: Path


def resolve_checkpoint(run_dir: str | os.PathLike[str], step: int | None = None) -> tuple[int, Path]:
    """``(step, RUN/checkpoint/step-N)``: the newest complete checkpoint, or ``step``'s.

    Raises:
        FileNotFoundError: no complete checkpoint (at ``step``); the reason is named.
    """
    if step is None:
        return latest_checkpoint(run_dir)
    ckpt = Path(run_dir) / "checkpoint" / f"step-{step}"
    found = next((s for s in checkpoints.scan(ckpt.parent) if s.step == step), None)
    if found is None or not found.complete:
        reason = found.reason if found else "no such folder"
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint ({reason})")
    return step, ckpt


def _model_config(run: RunRecord) -> tuple[Any, Any]:
    """The run's model config, built as :func:`titanenv.train.model.load_model` builds it, and its adapter."""
    config = run_config(run)
    model_config = config.model_spec.model
    adapter_cls = config.model_spec.state_dict_adapter
    if adapter_cls is None:
        raise ValueError(f"recipe {run.recipe}: model {config.model_spec.name} has no Hugging Face state dict adapter")
    return model_config, adapter_cls(model_config, None)


def _empty_state(model_config: Any) -> dict[str, torch.Tensor]:
    """CPU tensors of the model's state dict shapes (uninitialised); tied parameters share one."""
    with torch.device("meta"):
        model = model_config.build()
    shared: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, meta in model.state_dict(keep_vars=True).items():
        if id(meta) not in shared:
            shared[id(meta)] = torch.empty(meta.shape, dtype=meta.dtype, device="cpu")
        state[key] = shared[id(meta)]
    return state


def load_state(run_dir: str | os.PathLike[str], *, step: int | None = None) -> LoadedState:
    """Read the model weights of a complete checkpoint of ``run_dir`` (latest, or ``step``).

    Raises:
        FileNotFoundError: no training record or no complete checkpoint.
        ExportRefused: the checkpoint holds model keys the rebuilt model has no place for.
    """
    import torch.distributed.checkpoint as dcp  # imported here: see _model_config

    run = read_run_record(run_dir)
    if run.infini is not None:
        raise ExportRefused(
            ["layers.*.attention.gate"],
            f"{run_dir} is an Infini-attention run (--infini.segment-len {run.infini.segment_len}): Hugging Face's "
            "LlamaForCausalLM has no compressive memory or gates. Evaluate and sample the run folder itself "
            "(titanenv eval --output-dir RUN, --passkey --model RUN, titanenv generate RUN): it loads with its own "
            "model",
        )
    step, ckpt = resolve_checkpoint(run_dir, step)
    model_config, adapter = _model_config(run)
    state = _empty_state(model_config)
    stored = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    extra = [k for k in stored if not k.startswith(NON_MODEL_PREFIXES) and k not in state]
    if extra:
        raise ExportRefused(extra, f"{ckpt} holds model state that recipe {run.recipe} has no place for")
    dcp.load(state, checkpoint_id=str(ckpt))  # reads only these keys; DTensor shards are gathered
    return LoadedState(state, model_config, adapter, run, step, ckpt)


def to_hf(adapter: Any, state: dict[str, torch.Tensor], *, tied: bool) -> dict[str, torch.Tensor]:
    """TorchTitan state -> Hugging Face state through ``adapter.to_hf``, one key at a time.

    Args:
        adapter: a TorchTitan ``StateDictAdapter`` (``Llama3StateDictAdapter``).
        state: TorchTitan key -> tensor.
        tied: the model ties ``lm_head.weight`` to the embedding (then that key is expected to
            vanish, and must be the embedding's tensor).

    Returns:
        Hugging Face key -> tensor (Q/K permuted copies; the rest are the same tensors).

    Raises:
        ExportRefused: a key has no mapping (dropped), or two keys map onto one name.
    """
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    dropped, clashing = [], []
    for key, value in state.items():
        try:
            converted = adapter.to_hf({key: value})
        except KeyError:  # non-layer keys without a mapping raise instead of vanishing
            converted = {}
        if not converted:
            if tied and key == TIED and state.get("tok_embeddings.weight") is value:
                continue
            dropped.append(key)
        for name, tensor in converted.items():
            if name in out:
                clashing += [key, source[name]]
            out[name], source[name] = tensor, key
    if dropped:
        raise ExportRefused(dropped, "TorchTitan's Llama3StateDictAdapter has no Hugging Face name for these keys")
    if clashing:
        raise ExportRefused(clashing, "these keys map onto the same Hugging Face name")
    return out


def hf_config(model_config: Any, state: dict[str, torch.Tensor], seq_len: int) -> dict[str, Any]:
    """``config.json``'s architecture fields for ``LlamaForCausalLM`` (token ids and dtype are added by the caller).

    Sizes come from the weights (vocabulary and hidden size from the embedding, intermediate
    size from ``w1``, layers by count); heads, RoPE and norm epsilon from the config.
    ``max_position_embeddings`` is the training ``seq_len``. RoPE scaling is written both the
    transformers 5 way (``rope_parameters``) and the 4.x way (``rope_theta``, ``rope_scaling``).

    Raises:
        ValueError: a feature ``LlamaForCausalLM`` cannot express (non-complex RoPE, YaRN,
            layers of different shapes).
    """
    from torchtitan.models.common.rope import ComplexRoPE  # imported here: see _model_config

    layers = model_config.layers
    attn = layers[0].attention
    rope = attn.rope
    if not isinstance(rope, ComplexRoPE.Config):  # LoRA runs: the frozen subclass LoRAConverter builds
        raise ValueError(f"RoPE {type(rope).__qualname__}: the export handles TorchTitan's ComplexRoPE only")
    shapes = [[tuple(t.shape) for k, t in state.items() if k.startswith(f"layers.{i}.")] for i in range(len(layers))]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("layers differ in shape; LlamaForCausalLM needs identical layers")
    vocab, dim = state["tok_embeddings.weight"].shape
    n_heads = attn.n_heads
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(rope.theta)}
    if rope.scaling == "llama":
        params = {"rope_type": "llama3", "rope_theta": float(rope.theta), "factor": float(rope.scaling_factor),
                  "low_freq_factor": float(rope.low_freq_factor), "high_freq_factor": float(rope.high_freq_factor),
                  "original_max_position_embeddings": int(rope.original_max_position_embeddings)}  # fmt: skip
    elif rope.scaling != "none":
        raise ValueError(f"RoPE scaling {rope.scaling!r}: the export handles 'none' and 'llama' only")
    legacy = {k: v for k, v in params.items() if k != "rope_theta"} if rope.scaling == "llama" else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": int(dim),
        "intermediate_size": int(state["layers.0.feed_forward.w1.weight"].shape[0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": int(n_heads),
        "num_key_value_heads": int(attn.n_kv_heads or n_heads),
        "head_dim": int(attn.head_dim or dim // n_heads),
        "hidden_act": "silu",
        "max_position_embeddings": int(seq_len),
        "rms_norm_eps": float(model_config.norm.eps),
        "rope_parameters": params,
        "rope_theta": float(rope.theta),
        "rope_scaling": legacy,
        "tie_word_embeddings": bool(model_config.enable_weight_tying),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
