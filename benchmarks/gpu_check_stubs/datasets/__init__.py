"""Stand-in for Hugging Face ``datasets`` in the gpu_check venv only (benchmarks/gpu_check.sh).

TorchTitan 0.3.0 imports ``datasets`` when ``torchtitan.train`` is imported (its own HF text
loader, ``torchtitan/hf_datasets/text_datasets.py``), but titanenv trains from Megatron
``.bin/.idx`` files and never calls it. The real package needs pyarrow (55 MB) and pandas
(12 MB), more than the GPU machine's carry budget, so gpu_check.sh puts this stub in the check
venv when the machine's Python has no ``datasets``. Any use raises.
"""

STUB = True


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("datasets is a stub in the gpu_check venv (benchmarks/gpu_check_stubs)")


class Dataset(_Unavailable):
    pass


class IterableDataset(_Unavailable):
    pass


def load_dataset(*args, **kwargs):
    raise RuntimeError("datasets is a stub in the gpu_check venv (benchmarks/gpu_check_stubs)")
