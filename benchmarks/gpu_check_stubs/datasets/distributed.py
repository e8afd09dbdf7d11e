"""Stub of ``datasets.distributed`` (see the package docstring)."""


def split_dataset_by_node(*args, **kwargs):
    raise RuntimeError("datasets is a stub in the gpu_check venv (benchmarks/gpu_check_stubs)")
