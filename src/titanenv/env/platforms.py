"""The platform a venv or an image is built for: CPython version, CPU architecture, glibc.

A wheelhouse is made for one platform. Its folder is named by Python version and architecture
(``cp312-x86_64``) so that ``offline`` finds the wheelhouse ``download`` made for it; the glibc
version only caps which manylinux wheels ``download`` may choose.
"""

from __future__ import annotations

import os
import platform as _platform
import sys
from dataclasses import dataclass

__all__ = ["ARCHES", "BASE_IMAGE", "BaseImage", "Platform"]

ARCHES = ("x86_64", "aarch64")
# The oldest glibc each architecture has manylinux wheels for (manylinux1 = 2.5, manylinux2014 = 2.17).
_FIRST_GLIBC_MINOR = {"x86_64": 5, "aarch64": 17}
_LEGACY_ALIASES = {
    "x86_64": {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"},
    "aarch64": {17: "manylinux2014"},
}


@dataclass(frozen=True)
class Platform:
    """A CPython-on-glibc-Linux target, e.g. ``Platform("aarch64", "3.12", "2.39")``."""

    arch: str
    """``x86_64`` (JUWELS, JURECA) or ``aarch64`` (JUPITER's GH200)."""
    python: str
    """``MAJOR.MINOR``, e.g. ``3.12``."""
    glibc: str
    """``MAJOR.MINOR`` of the target's glibc; manylinux wheels newer than this are refused."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"architecture {self.arch!r} is not supported; use one of {', '.join(ARCHES)}")
        for name in ("python", "glibc"):
            parts = getattr(self, name).split(".")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"{name} version {getattr(self, name)!r} must look like MAJOR.MINOR, e.g. 3.12")

    @classmethod
    def host(cls) -> Platform:
        """The running interpreter on this machine."""
        libc, version = _platform.libc_ver()
        if libc != "glibc":
            raise ValueError(
                f"this Python is not linked against glibc ({libc or 'unknown libc'}); manylinux wheels need glibc"
            )
        glibc = ".".join(version.split(".")[:2])
        return cls(_platform.machine(), f"{sys.version_info[0]}.{sys.version_info[1]}", glibc)

    @property
    def cp(self) -> str:
        """The CPython tag, e.g. ``cp312``."""
        return "cp" + self.python.replace(".", "")

    @property
    def tag(self) -> str:
        """The wheelhouse folder name, e.g. ``cp312-x86_64``."""
        return f"{self.cp}-{self.arch}"

    def manylinux_tags(self) -> list[str]:
        """Every manylinux platform tag this target accepts, newest first.

        pip's ``--platform`` takes tags literally (it does not widen ``manylinux_2_39`` to
        older glibc versions), so all of them are passed.
        """
        major, minor = (int(p) for p in self.glibc.split("."))
        tags = []
        for m in range(minor, _FIRST_GLIBC_MINOR[self.arch] - 1, -1):
            tags.append(f"manylinux_{major}_{m}_{self.arch}")
            if alias := _LEGACY_ALIASES[self.arch].get(m):
                tags.append(f"{alias}_{self.arch}")
        return tags

    def pip_download_flags(self) -> list[str]:
        """Flags that make ``pip download`` choose wheels for this target and only wheels."""
        flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python]
        for abi in (self.cp, "abi3", "none"):
            flags += ["--abi", abi]
        for tag in self.manylinux_tags():
            flags += ["--platform", tag]
        return flags

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker variables of the target."""
        full = f"{self.python}.0"
        if (f"{sys.version_info[0]}.{sys.version_info[1]}") == self.python:
            full = ".".join(str(p) for p in sys.version_info[:3])
        return {
            "python_version": self.python,
            "python_full_version": full,
            "implementation_name": "cpython",
            "implementation_version": full,
            "platform_python_implementation": "CPython",
            "platform_machine": self.arch,
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "platform_release": os.uname().release if self.arch == _platform.machine() else "",
            "platform_version": "",
            "extra": "",
        }


@dataclass(frozen=True)
class BaseImage:
    """An NGC PyTorch image: the CUDA, NCCL, torch and triton every titanenv job runs on.

    It lives here, not in ``titanenv.container``, because its Python and glibc are the platform
    the environment set-up targets (container → env, never back); ``container.spec`` re-exports it.
    """

    repository: str = "nvcr.io/nvidia/pytorch"
    tag: str = "26.09-py3"
    """NGC 26.09 (September 2026), the newest monthly release when this was pinned: Ubuntu 24.04,
    Python 3.12, CUDA 13, PyTorch 2.14 (NVIDIA build; titanenv's train stage needs torch >= 2.13,
    measured by benchmarks/gpu_check.sh: 2.11 and 2.12 lack APIs TorchTitan 0.3.0 uses, and the
    first backward fails there even with them shimmed). One multi-arch tag serves x86_64 (A100, V100) and
    aarch64 (GH200). Move it with the lock and re-run the image's %test."""
    python: str = "3.12"
    """The image's Python; wheelhouses for the image are made for it."""
    glibc: str = "2.39"
    """Ubuntu 24.04's glibc: the newest manylinux tag the image's wheels may carry."""

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


BASE_IMAGE = BaseImage()
