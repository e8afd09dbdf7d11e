"""Names of a package that import their module on first use (PEP 562 module ``__getattr__``).

For packages the CLI imports at start-up whose modules load torch: ``titanenv --help`` and the
core install (no torch) must not pay for, or fail on, that import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["attributes"]


def attributes(
    package: str, where: Mapping[str, Sequence[str]], namespace: MutableMapping[str, Any]
) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``, whose names live in the modules of ``where``.

    Args:
        package: the package's ``__name__`` (for the error message).
        where: ``{module: (name, ...)}``.
        namespace: the package's ``globals()``; a name is stored there once loaded, so later
            lookups skip ``__getattr__``.

    Returns:
        The sorted names, and the module-level ``__getattr__``, which raises ``AttributeError``
        for any other name.
    """
    module_of = {name: module for module, names in where.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return sorted(module_of), __getattr__
