"""Workarounds that let TorchTitan 0.3.0 + torch 2.13 train on CPU (gloo), in one place.

Each entry says what it changes and what it costs. :func:`apply` installs the
process-level ones; it runs when :mod:`titanenv.train.recipes` is imported, which
``torchtitan.train`` does in every torchrun worker (``--module
titanenv.train.recipes``) after importing TorchTitan and before building the trainer.
It is idempotent. The model-level ones are settings the recipes choose on CPU.

Always (torch/TorchTitan version skew, not CPU-specific):

``torch.distributed.set_timeout`` (installed by :func:`apply`)
    TorchTitan calls it after the first step to shorten collective timeouts;
    torch 2.13 has no such function. Installed, only when missing, as
    ``torch.distributed.distributed_c10d._set_pg_timeout`` (same signature: sets the
    default timeout of the group's gloo/NCCL backend). Side effect: none beyond the
    intended timeout change.
SPMD backend (recipes: ``parallelism.spmd_backend = "partial_dtensor"``)
    TorchTitan 0.3.0's default ``spmd_types`` hands torch 2.13's ``fully_shard``
    plain-tensor parameters, which it rejects with 2+ data-parallel ranks ("all
    parameters must be DTensors on the full SPMD mesh"). ``partial_dtensor`` is the
    classic FSDP2 path. Side effect: none for FSDP/DDP; TP/CP untested.

Only without CUDA (``torch.cuda.is_available()`` is False):

Device selection (installed by :func:`apply`)
    ``torchtitan.tools.utils`` picks ``cuda`` when no accelerator is found, and
    several TorchTitan modules copy that choice at import. Every loaded
    ``torchtitan.*`` module whose ``device_type == "cuda"`` gets ``"cpu"``, and whose
    ``device_module`` is ``torch.cuda`` gets :data:`CPU_DEVICE_MODULE` (``torch.cpu``
    plus the memory calls TorchTitan makes). torch.distributed then uses gloo
    (TorchTitan maps device ``cpu`` to gloo). Side effects: the ``memory:`` figure in
    the step log is the process's peak resident set size as a share of physical RAM,
    not an allocator statistic, and never resets; MFU is computed against an A100's
    peak FLOPS, so it means nothing on CPU.
FSDP gradient reduction (recipes wrap ``parallelize_fn`` with :func:`parallelize_for_cpu`)
    TorchTitan sets the FSDP gradient divide factor to 1.0, which FSDP turns into
    ``ReduceOp.PREMUL_SUM(1.0)``; gloo rejects it ("Cannot use ReduceOp.PREMUL_SUM
    with Gloo"). Each FSDP module additionally gets
    ``set_force_sum_reduction_for_comms(True)``: a plain SUM, then a division by the
    factor 1.0, which is skipped. Side effect: none; gradients are identical.
Attention (recipes: causal SDPA by :func:`use_causal_sdpa`; ``dataloader.document_positions = False``)
    FlexAttention has no backward on CPU (``--attn-backend sdpa`` chooses the same on GPU).
    Side effect: attention crosses document boundaries inside a window (GPT-2/Megatron style) and RoPE positions run
    0..seq_len-1 per window instead of restarting at each document.
CUDA graphs and torch.compile (recipes: off)
    Both are GPU features here. Side effect: eager execution.
"""

from __future__ import annotations

import os
import resource
import sys
import types
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.protocols.model_spec import ModelSpec

__all__ = ["CPU_DEVICE_MODULE", "apply", "cpu_only", "parallelize_for_cpu", "force_sum_reduction", "use_causal_sdpa"]


def cpu_only() -> bool:
    """True when this process has no CUDA device (the CPU workarounds apply)."""
    return not torch.cuda.is_available()


def _memory_stats(*_: Any, **__: Any) -> dict[str, int]:
    # Peak resident set size of this process (Linux reports KiB); there is no allocator pool on CPU.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak, "num_alloc_retries": 0, "num_ooms": 0}


class _CpuProperties:
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # bytes of RAM


def _make_cpu_device_module() -> types.ModuleType:
    mod: Any = types.ModuleType("titanenv_cpu_device_module", "torch.cpu plus process-level memory statistics")
    for name in (
        "device_count",
        "is_available",
        "set_device",
        "synchronize",
        "stream",
        "current_stream",
        "Stream",
        "Event",
    ):
        setattr(mod, name, getattr(torch.cpu, name))
    # An index, like torch.cuda's: TorchTitan passes it to barrier(device_ids=[...]).
    mod.current_device = lambda: 0
    mod.get_device_name = lambda *_, **__: "cpu"
    mod.get_device_properties = lambda *_, **__: _CpuProperties()
    mod.memory_stats = _memory_stats
    mod.reset_peak_memory_stats = lambda *_, **__: None
    mod.empty_cache = lambda *_, **__: None
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    return cast(types.ModuleType, mod)


CPU_DEVICE_MODULE = _make_cpu_device_module()
"""Stand-in for ``torch.cuda`` in TorchTitan modules on CPU: ``torch.cpu`` + peak-RSS memory statistics."""


def _install_set_timeout() -> None:
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = c10d._set_pg_timeout  # type: ignore[attr-defined]


def _force_cpu_device() -> list[str]:
    patched: list[str] = []
    mod: Any  # set attributes that the module type does not declare
    for name, mod in list(sys.modules.items()):
        if not name.startswith("torchtitan") or mod is None:
            continue
        if getattr(mod, "device_type", None) == "cuda":
            mod.device_type = "cpu"
            patched.append(name)
        if getattr(mod, "device_module", None) is torch.cuda:
            mod.device_module = CPU_DEVICE_MODULE
    return patched


def apply() -> None:
    """Install the process-level workarounds above (CPU ones only without CUDA)."""
    _install_set_timeout()
    if cpu_only():
        import torchtitan.trainer  # noqa: F401  (load every module that copies device_type)

        _force_cpu_device()


def force_sum_reduction(model: torch.nn.Module) -> None:
    """Make every FSDP module reduce gradients with SUM (gloo has no PREMUL_SUM)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def use_causal_sdpa(spec: ModelSpec) -> None:
    """Replace every FlexAttention in ``spec.model`` with causal SDPA, in place."""
    for _, _, parent, attr in list(spec.model.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())


def parallelize_for_cpu(parallelize_fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """Wrap a ModelSpec ``parallelize_fn`` so FSDP uses plain SUM reductions (see module docs)."""

    def parallelize(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        model = parallelize_fn(model, **kwargs)
        force_sum_reduction(model)
        return model

    parallelize.__name__ = f"{getattr(parallelize_fn, '__name__', 'parallelize')}_cpu"
    return parallelize
