"""A LoRA run's checkpoint as a merged TorchTitan state, or as a PEFT adapter of its base model.

A LoRA checkpoint (:mod:`titanenv.train.lora`) holds the frozen base weights and, for each
target ``Linear`` ``PREFIX`` (``W``: ``[out, in]``), ``PREFIX.lora_a.weight`` (``A``: ``[r, in]``)
and ``PREFIX.lora_b.weight`` (``B``: ``[out, r]``); the layer computes ``W x + (alpha / r) B A x``.

- :func:`split` separates base and adapter tensors.
- :func:`merge` folds ``(alpha / r) B A`` into ``W``: a plain TorchTitan state that
  :func:`titanenv.export.convert.to_hf` exports like any other run's (Q/K permuted by TorchTitan).
- :func:`peft_state` renames the adapters to the keys PEFT's ``save_pretrained`` writes for a
  ``LlamaForCausalLM`` (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, no
  adapter name) and :func:`write_adapter_config` writes ``adapter_config.json`` through
  ``peft.LoraConfig.save_pretrained``.

Fused ``wqkv``: its output rows are TorchTitan's grouped layout (per KV head: the query heads of
its group, then its key head, then its value head), so ``B`` is split into the q, k and v parts by
TorchTitan's own ``FusedQKVLinear`` state-dict split (the same one that writes ``wq``/``wk``/``wv``),
and one ``A`` serves all three (copied for each). Hugging Face's q/k rows are a permutation of
TorchTitan's (interleaved to half-split RoPE); ``lora_B`` gets the permutation that
``Llama3StateDictAdapter.to_hf`` applies to the base weight's rows, read off by passing row
numbers through it. Anything that does not fit these rules raises
:class:`~titanenv.export.convert.ExportRefused`: no adapter is dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from titanenv.export.convert import ExportRefused
from titanenv.train.lora import HF_MODULES, LoraOptions, is_adapter

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "hf_target_modules",
    "merge",
    "peft_config",
    "peft_state",
    "split",
    "write_adapter_config",
]

ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter config file (``peft.utils.CONFIG_NAME``)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""PEFT's adapter weights file (``peft.utils.SAFETENSORS_WEIGHTS_NAME``)."""
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a ``LlamaForCausalLM`` key (``PeftModelForCausalLM`` -> ``LoraModel`` -> model)."""

_ADAPTER_KEY = re.compile(r"(?P<prefix>.+)\.lora_(?P<part>[ab])\.weight")
_FUSED = "qkv_linear.wqkv"


def split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base, adapters)``: the tensors of ``state`` that are not LoRA adapters, and those that are."""
    base = {k: v for k, v in state.items() if not is_adapter(k)}
    return base, {k: v for k, v in state.items() if is_adapter(k)}


def _pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``PREFIX -> (A, B)`` for each target ``Linear``.

    Raises:
        ExportRefused: a key that is not ``PREFIX.lora_{a,b}.weight``, or an ``A`` without its ``B``.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for key, value in adapters.items():
        m = _ADAPTER_KEY.fullmatch(key)
        if m is None:
            odd.append(key)
            continue
        parts.setdefault(m["prefix"], {})[m["part"]] = value
    if odd:
        raise ExportRefused(odd, "LoRA state that is not PREFIX.lora_a.weight / PREFIX.lora_b.weight")
    lonely = [f"{p}.lora_{'b' if 'a' in ab else 'a'}.weight" for p, ab in parts.items() if len(ab) != 2]
    if lonely:
        raise ExportRefused(lonely, "these LoRA halves are missing from the checkpoint")
    return {p: (ab["a"], ab["b"]) for p, ab in sorted(parts.items())}


def _scale(options: LoraOptions, a: torch.Tensor, prefix: str) -> float:
    if a.shape[0] != options.rank:
        raise ExportRefused([f"{prefix}.lora_a.weight"], f"rank {a.shape[0]} differs from the run's --lora.rank "
                                                        f"{options.rank}")  # fmt: skip
    return float(options.alpha) / options.rank


def _layer(prefix: str) -> int:
    found = re.match(r"layers\.(\d+)\.", prefix)
    if found is None:
        raise ExportRefused([f"{prefix}.lora_a.weight"], "LoRA outside the transformer layers")
    return int(found[1])


def _fused_parts(model_config: Any, prefix: str, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{BASE_PREFIX.wq: Bq, .wk: Bk, .wv: Bv}``: ``B`` of a fused ``wqkv`` split by TorchTitan's rule."""
    from torchtitan.models.common.attention import FusedQKVLinear  # imported here: seconds to import

    qkv = model_config.layers[_layer(prefix)].attention.qkv_linear
    hpk = qkv.n_heads // qkv.n_kv_heads
    layout = SimpleNamespace(head_dim=qkv.head_dim, heads_per_kv=hpk, r_dim=hpk + 2)
    parts = {"wqkv.weight": b}
    FusedQKVLinear._split_qkv_on_save(layout, parts, "", None)
    base = prefix.removesuffix(".wqkv")
    return {f"{base}.{name.removesuffix('.weight')}": t for name, t in parts.items()}


def _targets(state: dict[str, torch.Tensor], model_config: Any) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """``(adapter prefix, base weight key, A, B rows of that weight)`` per adapted base weight.

    Raises:
        ExportRefused: malformed adapters, or adapters whose base weight is not in ``state``.
    """
    base, adapters = split(state)
    out, orphans = [], []
    for prefix, (a, b) in _pairs(adapters).items():
        parts = _fused_parts(model_config, prefix, b) if prefix.endswith(_FUSED) else {prefix: b}
        for weight_prefix, rows in parts.items():
            key = f"{weight_prefix}.weight"
            if key not in base or base[key].shape != (rows.shape[0], a.shape[1]):
                orphans.append(f"{prefix}.lora_b.weight")
                continue
            out.append((prefix, key, a, rows))
    if orphans:
        raise ExportRefused(orphans, "no base weight of matching shape for these LoRA adapters")
    return out


def merge(state: dict[str, torch.Tensor], model_config: Any, options: LoraOptions) -> dict[str, torch.Tensor]:
    """The base weights of ``state`` with each adapter folded in: ``W + (alpha / r) B A``, in float32.

    Args:
        state: a LoRA run's TorchTitan state (:attr:`~titanenv.export.convert.LoadedState.state`).
        model_config: its model config (for the fused ``wqkv`` layout).
        options: the run's LoRA options (rank, alpha).

    Returns:
        TorchTitan key -> tensor, no adapter keys; untouched tensors are ``state``'s own (tied ones stay shared).

    Raises:
        ExportRefused: an adapter that cannot be placed (named).
    """
    merged, _ = split(state)
    for prefix, key, a, rows in _targets(state, model_config):
        w = merged[key]
        delta = _scale(options, a, prefix) * (rows.double() @ a.double())
        merged[key] = (w.double() + delta).to(w.dtype)
    return merged


def _hf_name_and_rows(adapter: Any, key: str, shape: torch.Size) -> tuple[str, torch.Tensor]:
    """The Hugging Face name of TorchTitan weight ``key``, and the row order ``adapter.to_hf`` gives it.

    Row numbers pass through ``to_hf`` in place of the weight, so Q/K get exactly TorchTitan's permutation.
    """
    probe = torch.arange(shape[0]).unsqueeze(1).expand(shape).contiguous()
    converted = adapter.to_hf({key: probe})
    if len(converted) != 1:
        raise ExportRefused([key], "TorchTitan's Llama3StateDictAdapter has no single Hugging Face name for it")
    ((name, moved),) = converted.items()
    rows = moved[:, 0].clone()
    if (
        moved.shape != shape
        or not torch.equal(moved, rows.unsqueeze(1).expand(shape))
        or not torch.equal(rows.sort().values, torch.arange(shape[0]))
    ):
        raise ExportRefused([key], "Llama3StateDictAdapter.to_hf changes this weight beyond reordering its rows")
    return name, rows


def peft_state(
    state: dict[str, torch.Tensor], model_config: Any, adapter: Any, options: LoraOptions
) -> dict[str, torch.Tensor]:
    """The adapters of ``state`` under PEFT's names for ``LlamaForCausalLM``, ready for ``adapter_model.safetensors``.

    Args:
        state: a LoRA run's TorchTitan state.
        model_config: its model config.
        adapter: TorchTitan's ``Llama3StateDictAdapter`` for that config (names and Q/K row order).
        options: the run's LoRA options (the rank is checked against the tensors).

    Returns:
        ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` -> tensor; each its own
        contiguous copy (safetensors refuses shared storage).

    Raises:
        ExportRefused: an adapter that cannot be placed or named.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, key, a, rows in _targets(state, model_config):
        _scale(options, a, prefix)
        name, order = _hf_name_and_rows(adapter, key, state[key].shape)
        module = PEFT_PREFIX + name.removesuffix(".weight")
        out[f"{module}.lora_A.weight"] = a.clone().contiguous()
        out[f"{module}.lora_B.weight"] = rows[order].contiguous()
    return out


def hf_target_modules(options: LoraOptions) -> list[str]:
    """PEFT's ``target_modules``: the Hugging Face names of the run's targets (:data:`HF_MODULES`), sorted."""
    return sorted({name for target in options.target_modules for name in HF_MODULES[target]})


def peft_config(options: LoraOptions, base_model: str | os.PathLike[str]) -> Any:
    """The ``peft.LoraConfig`` of the adapters: r, alpha, dropout, targets, ``CAUSAL_LM``, the base model.

    ``inference_mode=True``, as ``PeftModel.save_pretrained`` writes it; a whole-number alpha as an int.
    """
    from peft import LoraConfig  # imported here: peft imports transformers, which the core install lacks

    alpha: Any = float(options.alpha)  # PEFT annotates int; a float alpha scales as PEFT's own arithmetic does
    return LoraConfig(
        r=options.rank,
        lora_alpha=int(alpha) if alpha.is_integer() else alpha,
        lora_dropout=options.dropout,
        target_modules=hf_target_modules(options),
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_model),
        bias="none",
        inference_mode=True,
    )


def write_adapter_config(folder: str | os.PathLike[str], options: LoraOptions, base_model: Path) -> dict[str, Any]:
    """Write ``folder/adapter_config.json`` with PEFT's own serialisation; returns its contents."""
    peft_config(options, base_model).save_pretrained(str(folder))
    path = Path(folder) / ADAPTER_CONFIG
    found: dict[str, Any] = json.loads(path.read_text())
    # PEFT writes target_modules as list(set): sorted, a rerun writes the same bytes.
    if isinstance(found.get("target_modules"), list):
        found["target_modules"] = sorted(found["target_modules"])
        path.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    return found
