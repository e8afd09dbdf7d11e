"""Lets TorchTitan 0.3.0 import under a torch older than 2.13, for measuring on such a machine only.

Used by ``benchmarks/gpu_check.sh`` (never by titanenv itself) when its ``compat`` step finds that
importing the train stage fails on a name listed in :data:`NAMES`, and ``GPU_CHECK_SHIM`` is
``auto`` (the default) or ``1``. Everything measured with it is labelled as such.

``torch.distributed.fsdp.DataParallelMeshDims`` (new in torch 2.13)
    TorchTitan 0.3.0 imports it at module level (``torchtitan/distributed/fsdp.py``,
    ``torchtitan/distributed/full_dtensor.py``) and passes it to ``fully_shard(dp_mesh_dims=...)``
    only with ``parallelism.spmd_backend = "full_dtensor"``. titanenv's recipes use
    ``partial_dtensor``, which never passes it, so a copy of the dataclass (torch 2.13's
    ``torch/distributed/fsdp/_fully_shard/_fsdp_api.py``) is enough to import. A run that does
    reach ``full_dtensor`` fails in ``fully_shard`` with an unexpected keyword, not silently.
``create_block_mask(..., separate_full_blocks=...)`` (the keyword is new in torch 2.13)
    TorchTitan 0.3.0 passes it on every batch when it builds FlexAttention's document mask
    (``torchtitan/models/common/decoder.py``, ``_create_flex_attention_mask``), True unless in
    batch-invariant mode. Older ``create_block_mask`` always separates full blocks, which is what
    True asks for, so the wrapper drops ``separate_full_blocks=True`` and refuses False.

Found by ``benchmarks/gpu_check.sh --cpu-check`` on torch 2.11.0+cu130 (the GPU machine's): with
both in place, TorchTitan imports, the recipes build and the attention check runs; CPU training
still failed in the first backward there (see the issue-14 notes), so the GPU run is the test.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMES = ("torch.distributed.fsdp.DataParallelMeshDims", "torch.nn.attention.flex_attention.create_block_mask")
PROVIDED: list[str] = []


@dataclass
class DataParallelMeshDims:
    """Copy of torch 2.13's ``torch.distributed.fsdp.DataParallelMeshDims`` (see the module docstring)."""

    shard: str | tuple[str, ...] | None = None
    replicate: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.shard is None and self.replicate is None:
            raise ValueError("At least one of shard or replicate must be set in DataParallelMeshDims")

    @property
    def shard_names(self) -> tuple[str, ...]:
        if self.shard is None:
            return ()
        return (self.shard,) if isinstance(self.shard, str) else tuple(self.shard)

    @property
    def replicate_names(self) -> tuple[str, ...]:
        if self.replicate is None:
            return ()
        return (self.replicate,) if isinstance(self.replicate, str) else tuple(self.replicate)


def apply() -> list[str]:
    """Install what this torch lacks of :data:`NAMES`; returns (and keeps in :data:`PROVIDED`) what was installed."""
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "DataParallelMeshDims"):
        DataParallelMeshDims.__module__ = "torch.distributed.fsdp"
        fsdp.DataParallelMeshDims = DataParallelMeshDims
        PROVIDED.append(NAMES[0])
    import inspect

    import torch.nn.attention.flex_attention as fa

    original = fa.create_block_mask
    if "separate_full_blocks" not in inspect.signature(original).parameters:

        def create_block_mask(*args, separate_full_blocks: bool = True, **kwargs):
            if not separate_full_blocks:
                raise NotImplementedError("this torch's create_block_mask always separates full blocks")
            return original(*args, **kwargs)

        create_block_mask.__doc__ = original.__doc__
        fa.create_block_mask = create_block_mask
        PROVIDED.append(f"{NAMES[1]}(separate_full_blocks=True)")
    return PROVIDED
