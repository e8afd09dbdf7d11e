"""Imports run one way between stages (docs/architecture.md, "Import rules").

Each package or top-level module of ``titanenv`` sits on a layer; a module may import only from
its own package or from a lower layer. A stage's ``cli.py`` (and the top-level ``cli``) is the
command-line layer: it wires stages together and may import any of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "titanenv"

# Lower number = lower layer. Same number = siblings that must not import each other.
LAYERS: dict[str, int] = {
    "__init__": 0,
    "atomic": 0,
    "digest": 0,
    "redaction": 0,
    "offline": 0,
    "templating": 0,
    "bootstrap": 0,
    "lazy": 0,
    "slurmenv": 0,
    "sbatch": 0,
    "config": 1,
    "env": 2,
    "container": 3,
    "data": 2,
    "assets": 3,
    "train": 4,
    "export": 5,
    "eval": 6,
    "finetune": 6,
    "slurm": 7,
    "api": 8,
    "workflow": 8,
    "cli": 9,
    "__main__": 10,  # python -m titanenv: above the CLI it runs
}
CLI_LAYER = 9


def _unit(module: str) -> str:
    """``titanenv.data.merge`` -> ``data``; ``titanenv.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported titanenv module) for every import in one file, lazy imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "titanenv":
                found += [(node.lineno, f"titanenv.{a.name}") for a in node.names if a.name != "__version__"]
            elif node.module.startswith("titanenv."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("titanenv.")]
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        unit = _unit(module)
        layer = max(CLI_LAYER, LAYERS[unit]) if path.name in ("cli.py", "__main__.py") else LAYERS[unit]
        for line, target in _imports(path):
            other = _unit(target)
            if other == unit:
                continue
            if LAYERS[other] >= layer:
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: {module} ({unit}, layer {layer}) imports {target} "
                           f"({other}, layer {LAYERS[other]})")  # fmt: skip
    return bad


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in SRC.rglob("*.py")}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_no_upward_or_sideways_imports():
    bad = upward_imports()
    assert not bad, "imports against the stage direction:\n" + "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk finds lazy imports inside functions, so the test above can fail."""
    planted = tmp_path / "titanenv" / "data"
    planted.mkdir(parents=True)
    (planted / "oops.py").write_text("def f():\n    from titanenv.train import recipes\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "titanenv")
    assert any("titanenv.data.oops" in line for line in upward_imports())
