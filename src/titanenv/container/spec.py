"""The typed model of titanenv's Apptainer image: base, architecture, pinned versions.

An :class:`ImageSpec` holds every value the definition template needs; ``render`` turns it into
definition text. Python package versions come from the lock (``env/requirements.lock``, made
from ``pyproject.toml``), never typed here. What is pinned here is what is not a Python
dependency: the flash-attn wheel built for the NGC base image (``BASE_IMAGE``, pinned in
``titanenv.env.platforms`` and re-exported here).

Standard library only, so ``container/build_container.sh`` can use it on a fresh login node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from titanenv import __version__
from titanenv.env.lockfile import Lock
from titanenv.env.platforms import ARCHES, BASE_IMAGE, BaseImage

__all__ = ["BASE_IMAGE", "FLASH_ATTN_VERSION", "SOURCES", "BaseImage", "ImageSpec", "shipped_specs"]

# BaseImage and BASE_IMAGE (the NGC tag pin) live in env.platforms: env/ never imports container/.
FLASH_ATTN_VERSION = "2.8.3.post2"
"""flash-attn has no wheels on PyPI; its wheel must be built against the base image's torch, once,
on a login node (docs/container.md), and put into the wheelhouse. A compute node never compiles it."""
SOURCES = ("online", "offline")
MACHINES_BY_ARCH = {"x86_64": "JUWELS Booster/Cluster, JURECA-DC", "aarch64": "JUPITER Booster (GH200)"}
CUDA_ARCHS = {"x86_64": "7.0;8.0", "aarch64": "9.0"}
"""TORCH_CUDA_ARCH_LIST for just-in-time extension builds: V100 (7.0) and A100 (8.0); GH200 (9.0)."""
IMAGE_EXTRAS = ("train", "eval")
KEY_PACKAGES = ("torchtitan", "transformers", "datasets", "tokenizers", "lm-eval", "tensorboard")
"""Packages whose versions the image records in %labels and %arguments and checks in %test."""
MODULES = {"lm-eval": "lm_eval", "flash-attn": "flash_attn"}


@dataclass(frozen=True)
class ImageSpec:
    """Everything the definition template needs for one image variant.

    ``online`` bootstraps from the registry (``docker://``); ``offline`` from the ``.sif`` that
    ``build_container.sh download`` saved (``localimage``). Both install the same wheelhouse.
    """

    arch: str
    source: str = "online"
    versions: dict[str, str] = field(default_factory=dict)
    """Distribution name -> pinned version, recorded in %labels and checked by %test."""
    base: BaseImage = BASE_IMAGE
    flash_attn: str | None = FLASH_ATTN_VERSION
    """flash-attn version whose wheel the wheelhouse must hold; None leaves flash-attn out."""
    titanenv: str = __version__
    imports_torch: bool = True
    """Whether %test imports torch (False only for small test images without the train extra)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch {self.arch!r}: use one of {', '.join(ARCHES)}")
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r}: use one of {', '.join(SOURCES)}")
        for name, version in self.versions.items():
            if not re.fullmatch(r"[A-Za-z0-9.+!_-]+", version):
                raise ValueError(f"version of {name}: {version!r} is not a plain version string")

    @classmethod
    def from_lock(cls, lock: Lock, arch: str, source: str = "online", **kw) -> ImageSpec:
        """The shipped image: key package versions read from ``lock``."""
        return cls(arch, source, {name: lock.version_of(name) for name in KEY_PACKAGES}, **kw)

    @property
    def offline(self) -> bool:
        return self.source == "offline"

    @property
    def filename(self) -> str:
        """``titanenv-x86_64.def`` or ``titanenv-x86_64-offline.def``."""
        return f"titanenv-{self.arch}{'-offline' if self.offline else ''}.def"

    @property
    def bootstrap(self) -> str:
        return "localimage" if self.offline else "docker"

    @property
    def from_ref(self) -> str:
        """The ``From:`` value; a build argument so a site can move it without re-rendering."""
        return "{{ BASE_IMAGE }}" if self.offline else self.base.repository + ":{{ NGC_TAG }}"

    @property
    def machines(self) -> str:
        return MACHINES_BY_ARCH[self.arch]

    def packages(self) -> dict[str, str]:
        """Every recorded package -> version: the key packages, flash-attn and titanenv."""
        out = dict(self.versions)
        if self.flash_attn:
            out["flash-attn"] = self.flash_attn
        out["titanenv"] = self.titanenv
        return out

    def version_args(self) -> dict[str, str]:
        """Package -> its build argument, e.g. ``lm-eval`` -> ``LM_EVAL_VERSION``."""
        return {name: re.sub(r"\W", "_", name).upper() + "_VERSION" for name in self.packages()}

    def modules(self) -> list[str]:
        """Modules %test imports: torch first, then each recorded package."""
        names = [MODULES.get(n, n.replace("-", "_")) for n in self.packages()]
        return (["torch"] if self.imports_torch else []) + names

    def arguments(self) -> dict[str, str]:
        """The %arguments section: defaults for every ``{{ VAR }}`` of the definition."""
        args = {"ARCH": self.arch, "NGC_TAG": self.base.tag}
        if self.offline:
            args["BASE_IMAGE"] = f"pytorch_{self.base.tag}_{self.arch}.sif"
        args["WHEELHOUSE"] = f"wheelhouse/cp{self.base.python.replace('.', '')}-{self.arch}"
        args["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS[self.arch]
        for name, arg in self.version_args().items():
            args[arg] = self.packages()[name]
        return args


def shipped_specs(lock: Lock) -> list[ImageSpec]:
    """The definitions kept in ``container/``: each architecture, online and offline."""
    return [ImageSpec.from_lock(lock, arch, source) for arch in ARCHES for source in SOURCES]
