"""Render an :class:`~titanenv.container.spec.ImageSpec` into Apptainer definition text.

The template uses ``@{ }@`` and ``@% %@`` as Jinja2 delimiters: ``{{ VAR }}`` belongs to
Apptainer (build arguments with defaults in ``%arguments``) and ``[[`` to bash.
"""

from __future__ import annotations

from pathlib import Path

from titanenv import atomic
from titanenv.container.spec import ImageSpec
from titanenv.templating import environment

__all__ = ["TEMPLATE", "render", "write"]

TEMPLATE = Path(__file__).with_name("templates") / "titanenv.def.j2"


def render(spec: ImageSpec) -> str:
    """The definition text of ``spec``."""
    return environment(TEMPLATE.parent).get_template(TEMPLATE.name).render(spec=spec)


def write(specs: list[ImageSpec], out_dir: Path) -> list[Path]:
    """Render each spec to ``out_dir/spec.filename`` (atomic writes); return the paths."""
    paths = []
    for spec in specs:
        path = Path(out_dir) / spec.filename
        atomic.write_text(path, render(spec))
        paths.append(path)
    return paths
