"""LoRA (Hu et al., 2021, arXiv 2106.09685) on TorchTitan's llama3, with the base checked frozen.

The adapters are TorchTitan's own (``torchtitan.components.lora.LoRAConverter``): each target
``Linear`` of width ``in -> out`` gains ``lora_a`` (``[r, in]``, Kaiming-uniform) and ``lora_b``
(``[out, r]``, zeros) and computes ``W x + (alpha / r) * B (A x)``; every other parameter is
built with ``requires_grad=False``. titanenv adds three things:

- **Dropout** on the adapter's input (``B (A dropout(x))``), as PEFT's ``lora_dropout``.
- **The base stays frozen whatever the SPMD backend.** TorchTitan 0.3.0's default
  ``spmd_types`` backend re-creates parameters in ``parallelize`` and loses
  ``requires_grad=False`` (measured: the optimizer got 69 tensors instead of 24 and trained
  every base weight). :func:`freeze` runs right after ``parallelize``, before the optimizer is
  built, and sets ``requires_grad`` from the parameter names again; :func:`check_optimizer`
  then fails the run at start-up if the optimizer holds anything but adapter parameters.
- **Counts** of trainable and frozen parameters (:func:`parameter_counts`) for the log and the
  run's ``status.json`` (and so its provenance).

Names (the module names TorchTitan's llama3 uses; the Hugging Face ``LlamaForCausalLM`` names
they export to are :data:`HF_MODULES`)::

    wqkv -> q_proj, k_proj, v_proj   (fused: one A, B split by rows)
    wo -> o_proj    w1 -> gate_proj    w2 -> down_proj    w3 -> up_proj
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "HF_MODULES",
    "LORA_TARGETS",
    "FrozenBaseError",
    "LoraOptions",
    "check_optimizer",
    "convert",
    "freeze",
    "is_adapter",
    "parameter_counts",
]

LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
"""Default targets: attention and MLP (every ``Linear`` of a llama3 block)."""

HF_MODULES: dict[str, tuple[str, ...]] = {
    "wqkv": ("q_proj", "k_proj", "v_proj"),
    "wo": ("o_proj",),
    "w1": ("gate_proj",),
    "w2": ("down_proj",),
    "w3": ("up_proj",),
}
"""TorchTitan llama3 module name -> Hugging Face Llama module names (PEFT's ``target_modules``)."""

ADAPTER_PARTS = ("lora_a", "lora_b")


@dataclass(kw_only=True, slots=True)
class LoraOptions:
    """LoRA adapters (``--lora.*``); ``rank`` 0 is no LoRA (full training)."""

    rank: int = 0
    """Rank r of the adapters (PEFT's ``r``). 0: no adapters, every weight trains."""

    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank (PEFT's ``lora_alpha``)."""

    dropout: float = 0.0
    """Dropout probability on the adapter's input during training (PEFT's ``lora_dropout``)."""

    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """TorchTitan module names that get adapters: any of wqkv, wo, w1, w2, w3."""

    def validate(self) -> None:
        """Raises ValueError naming the field when a value is out of range."""
        if self.rank < 0:
            raise ValueError(f"--lora.rank {self.rank}: must be >= 0 (0: no LoRA)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora.dropout {self.dropout}: must be in [0, 1)")
        if self.rank and not self.target_modules:
            raise ValueError("--lora.target-modules is empty; name at least one of " + ", ".join(LORA_TARGETS))
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(
                f"--lora.target-modules {', '.join(unknown)}: not a llama3 Linear; choose from "
                f"{', '.join(LORA_TARGETS)} (q/k/v are fused as wqkv)"
            )


def convert(model_config: Any, options: LoraOptions) -> Any:
    """``model_config`` (a TorchTitan module config tree) with LoRA adapters on the target Linears.

    Raises:
        ValueError: bad options (see :meth:`LoraOptions.validate`).
    """
    from torchtitan.components.lora import LoRAConverter

    options.validate()
    converter = LoRAConverter.Config(
        rank=options.rank, alpha=float(options.alpha), target_modules=list(options.target_modules)
    ).build()
    return converter.convert(model_config)


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` (an FQN) belongs to a LoRA adapter."""
    parts = name.split(".")
    return any(p in ADAPTER_PARTS for p in parts)


def _named(model: torch.nn.Module | Iterable[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    parts = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [(n, p) for part in parts for n, p in part.named_parameters()]


def freeze(model: torch.nn.Module | Iterable[torch.nn.Module], dropout: float = 0.0) -> None:
    """Make exactly the adapter parameters trainable and add the adapter input dropout, in place.

    ``model`` is the model (or its pipeline parts) after ``parallelize``. Names are read
    through FSDP/compile wrappers (their prefixes do not matter: adapters are found by the
    ``lora_a``/``lora_b`` segments).
    """
    for name, param in _named(model):
        param.requires_grad_(is_adapter(name))
    if dropout > 0:
        parts = [model] if isinstance(model, torch.nn.Module) else list(model)
        for part in parts:
            for name, module in part.named_modules():
                if name.split(".")[-1] == "lora_a":
                    module.register_forward_pre_hook(_dropout_hook(dropout))


def _dropout_hook(p: float) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (torch.nn.functional.dropout(args[0], p=p, training=module.training), *args[1:])

    return hook


def parameter_counts(model: torch.nn.Module | Iterable[torch.nn.Module]) -> dict[str, int]:
    """``{"trainable": n, "frozen": m, "trainable_tensors": k, "frozen_tensors": j}``, counting elements.

    Sharded (DTensor) parameters count their global size.
    """
    out = {"trainable": 0, "frozen": 0, "trainable_tensors": 0, "frozen_tensors": 0}
    for _, p in _named(model):
        kind = "trainable" if p.requires_grad else "frozen"
        out[kind] += p.numel()
        out[f"{kind}_tensors"] += 1
    return out


class FrozenBaseError(RuntimeError):
    """The optimizer would update parameters that are not LoRA adapters (or misses adapters)."""


def check_optimizer(model: torch.nn.Module | Iterable[torch.nn.Module], optimizers: Iterable[Any]) -> int:
    """Check that the optimizers hold every adapter parameter and nothing else.

    Args:
        model: the model (or its pipeline parts) the optimizers were built for.
        optimizers: ``torch.optim.Optimizer`` objects (TorchTitan's ``OptimizersContainer``
            iterates over its optimizers).

    Returns:
        The number of parameter tensors the optimizers hold.

    Raises:
        FrozenBaseError: naming up to five offending parameters, and the fix.
    """
    names = {id(p): n for n, p in _named(model)}
    held = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    base = [names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in held if not is_adapter(names.get(id(p), ""))]
    if base:
        shown = ", ".join(base[:5]) + (f" (and {len(base) - 5} more)" if len(base) > 5 else "")
        raise FrozenBaseError(
            f"LoRA: the optimizer holds {len(base)} base parameter tensors that must stay frozen: {shown}. "
            "Nothing was trained. This happens with --parallelism.spmd-backend spmd_types in TorchTitan 0.3.0; "
            "use --parallelism.spmd-backend partial_dtensor (the titanenv recipes' default)"
        )
    held_ids = {id(p) for p in held}
    missing = [n for n, p in _named(model) if is_adapter(n) and id(p) not in held_ids]
    if missing:
        raise FrozenBaseError(f"LoRA: {len(missing)} adapter tensors are not in the optimizer, e.g. {missing[0]}")
    return len(held)
