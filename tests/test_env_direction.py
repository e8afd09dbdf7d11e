"""container → env, never env → container: the set-up package imports nothing from the image package."""

from __future__ import annotations

import ast
from pathlib import Path

ENV = Path(__file__).resolve().parents[1] / "src" / "titanenv" / "env"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_env_never_imports_container():
    upward = {
        f"{path.name}: {name}"
        for path in sorted(ENV.glob("*.py"))
        for name in imported_modules(path)
        if name == "titanenv.container" or name.startswith("titanenv.container.")
    }
    assert not upward


def test_base_image_is_one_object_seen_from_both_packages():
    from titanenv.container import spec
    from titanenv.env import platforms

    assert spec.BASE_IMAGE is platforms.BASE_IMAGE and spec.BaseImage is platforms.BaseImage
