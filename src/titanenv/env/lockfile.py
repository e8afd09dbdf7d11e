"""``env/requirements.lock``: every Python dependency of titanenv, pinned, with its hashes.

The lock is uv's universal output (Linux x86_64 and aarch64, every supported Python) for all of
``pyproject.toml``'s extras, under a header that records which packages each extra starts from.
One file serves every selection: :meth:`Lock.select` walks uv's ``# via`` annotations from the
roots of the chosen extras, so ``install`` without ``--dev`` leaves pytest out, and the image
takes ``train`` and ``eval``.

torch and triton are not in the lock: the NGC image provides them, built for its CUDA. Their
pins (the ``cpu`` extra for hosts without torch) are recorded in the header as the *base layer*.

Regenerate after editing ``pyproject.toml``: ``env/set_up.sh lock`` (needs uv).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from titanenv import atomic
from titanenv.digest import sha256_file
from titanenv.env.markers import evaluate

try:  # Python 3.11+; only lock generation reads pyproject.toml
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - login-node Pythons older than 3.11
    tomllib = None  # type: ignore[assignment]  # mypy checks for 3.11, where tomllib always exists

__all__ = [
    "BASE_PACKAGES",
    "LOCK_PYTHON",
    "Lock",
    "LockError",
    "Requirement",
    "generate",
    "normalize",
    "write_requirements",
]

BASE_PACKAGES = ("torch", "triton")
"""Provided by the container (NGC's CUDA builds); installed from their pins only where the base Python lacks torch."""
LOCK_PYTHON = "3.11"
"""Oldest Python the lock resolves for: numpy 2.4 needs 3.11. NGC's image runs 3.12."""
ALWAYS = ("core", "build")
"""Root groups every selection includes: titanenv's own dependencies and its build backend."""
_REQ = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)\s*(?:;(?P<marker>.*?))?\s*(?=--hash=|$)"
)
_HASH = re.compile(r"--hash=(sha256:[0-9a-f]{64})")


class LockError(ValueError):
    """The lock is missing, malformed or out of date; the message names the file, line and fix."""


def normalize(name: str) -> str:
    """PEP 503 name: ``Huggingface_Hub`` -> ``huggingface-hub``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    """One pinned line of the lock."""

    name: str
    version: str
    marker: str | None
    hashes: tuple[str, ...]
    line: int
    via: tuple[str, ...] = ()
    """Packages (normalized names) that require this one, from uv's annotations."""

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    def applies(self, environment: dict[str, str]) -> bool:
        """Whether the marker holds on the target described by ``environment``."""
        return self.marker is None or evaluate(self.marker, environment)


@dataclass(frozen=True)
class Lock:
    """The parsed lock: requirements, the root packages of each group, and the base-layer pins."""

    path: Path
    requirements: tuple[Requirement, ...]
    roots: dict[str, tuple[str, ...]]
    base: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Lock:
        """Parse ``path``.

        Raises:
            LockError: the file is missing or a line does not parse (the message names it).
        """
        path = Path(path)
        if not path.is_file():
            raise LockError(f"{path}: no lock file; create it with `env/set_up.sh lock`")
        roots: dict[str, tuple[str, ...]] = {}
        base: dict[str, str] = {}
        reqs: list[dict] = []
        pending_via = False
        for n, line in _logical_lines(path.read_text()):
            stripped = line.strip()
            if stripped.startswith("# titanenv:roots "):
                group, *names = stripped.split()[2:]
                roots[group] = tuple(normalize(x) for x in names)
            elif stripped.startswith("# titanenv:base"):
                for pin in stripped.split()[2:]:
                    name, _, version = pin.partition("==")
                    base[normalize(name)] = version
            elif stripped.startswith("# via"):
                rest = stripped[len("# via") :].strip()
                pending_via = not rest
                if rest and reqs:
                    reqs[-1]["via"].append(normalize(rest.split()[0]))
            elif stripped.startswith("#"):
                if pending_via and reqs and stripped[1:].strip():
                    reqs[-1]["via"].append(normalize(stripped[1:].split()[0]))
            elif stripped:
                pending_via = False
                m = _REQ.match(stripped)
                if not m:
                    raise LockError(
                        f"{path}:{n}: expected 'NAME==VERSION [; MARKER] --hash=...', got {stripped[:80]!r}"
                    )
                hashes = tuple(_HASH.findall(stripped))
                if not hashes:
                    raise LockError(
                        f"{path}:{n}: {m['name']}=={m['version']} has no --hash; regenerate with `env/set_up.sh lock`"
                    )
                marker = (m["marker"] or "").strip() or None
                reqs.append(
                    dict(name=normalize(m["name"]), version=m["version"], marker=marker, hashes=hashes, line=n, via=[])
                )
        if "core" not in roots:
            raise LockError(f"{path}: no '# titanenv:roots core ...' header; regenerate with `env/set_up.sh lock`")
        requirements = tuple(Requirement(**{**r, "via": tuple(r["via"])}) for r in reqs)
        return cls(path, requirements, roots, base)

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @property
    def extras(self) -> tuple[str, ...]:
        """Groups that can be chosen (everything but the always-included ones)."""
        return tuple(g for g in self.roots if g not in ALWAYS)

    def select(self, extras: tuple[str, ...] | list[str], environment: dict[str, str]) -> list[Requirement]:
        """The requirements a target needs for ``extras``, in lock order.

        Starts from the roots of ``core``, ``build`` and each extra and follows the dependency
        edges recorded in ``# via`` annotations; keeps only lines whose marker holds for
        ``environment``.

        Raises:
            LockError: an extra is unknown or a root is missing from the lock.
        """
        unknown = [e for e in extras if e not in self.roots and e != "cpu"]
        if unknown:
            raise LockError(
                f"{self.path}: unknown extra(s) {', '.join(unknown)}; the lock has {', '.join(self.extras)}"
            )
        applicable = [r for r in self.requirements if r.applies(environment)]
        by_name = {r.name for r in applicable}
        children: dict[str, set[str]] = {}
        for r in applicable:
            for parent in r.via:
                children.setdefault(parent, set()).add(r.name)
        wanted = [name for g in (*ALWAYS, *extras) for name in self.roots.get(g, ())]
        missing = [name for name in wanted if name not in by_name and name not in {r.name for r in self.requirements}]
        if missing:
            raise LockError(f"{self.path}: root(s) {', '.join(missing)} missing; regenerate with `env/set_up.sh lock`")
        seen: set[str] = set()
        queue = deque(n for n in wanted if n in by_name)
        while queue:
            name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            queue.extend(children.get(name, ()))
        return [r for r in applicable if r.name in seen]

    def base_pins(self) -> list[str]:
        """``name==version`` of the base layer (torch, triton) for hosts without the container."""
        return [f"{name}=={version}" for name, version in self.base.items()]

    def version_of(self, name: str) -> str:
        """The locked version of ``name`` (the first line if markers split it).

        Raises:
            LockError: ``name`` is not in the lock.
        """
        for r in self.requirements:
            if r.name == normalize(name):
                return r.version
        if normalize(name) in self.base:
            return self.base[normalize(name)]
        raise LockError(f"{self.path}: {name} is not locked")


def write_requirements(reqs: list[Requirement], path: Path, extra_hashes: dict[str, list[str]] | None = None) -> Path:
    """Write ``reqs`` as a hash-checked requirements file (markers already evaluated), atomically.

    Args:
        extra_hashes: more accepted hashes per name, e.g. of a wheel built from the locked sdist.
    """
    extra_hashes = extra_hashes or {}
    lines = []
    for r in reqs:
        hashes = [*r.hashes, *extra_hashes.get(r.name, [])]
        lines.append(f"{r.pin} \\\n" + " \\\n".join(f"    --hash={h}" for h in hashes))
    atomic.write_text(path, "\n".join(lines) + "\n")
    return path


def generate(root: Path, out: Path, uv: list[str], dry_run: bool = False) -> list[str]:
    """Resolve ``root/pyproject.toml`` with uv into the lock at ``out``.

    Args:
        uv: the command that runs uv, e.g. ``["uv"]`` or ``[python, "-m", "uv"]``.
        dry_run: only return the uv command.

    Returns:
        The uv command line that was (or would be) run; ``EXCLUDES`` stands for a file listing
        the base layer, and ``-`` (stdin) carries the build requirements.

    Raises:
        LockError: pyproject.toml cannot be read, or uv fails (its message is included).
    """
    if tomllib is None:
        raise LockError("generating the lock reads pyproject.toml with tomllib: use Python 3.11 or newer")
    groups, base, build = _pyproject_groups(root / "pyproject.toml")
    cmd = [
        *uv,
        "pip",
        "compile",
        "pyproject.toml",
        "-",
        "--universal",
        "--python-version",
        LOCK_PYTHON,
        "--generate-hashes",
        "--excludes",
        "EXCLUDES",
        "--no-header",
        "--quiet",
    ]
    cmd += [arg for g in groups if g != "core" for arg in ("--extra", g)]
    if dry_run:
        return cmd
    with tempfile.TemporaryDirectory() as tmp:
        excludes = Path(tmp, "excludes.txt")
        excludes.write_text("\n".join(BASE_PACKAGES) + "\n")
        run = [str(excludes) if a == "EXCLUDES" else a for a in cmd]
        proc = subprocess.run(run, cwd=root, input="\n".join(build) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise LockError(f"uv could not resolve {root / 'pyproject.toml'}:\n{proc.stderr.strip()}")
    header = [
        "# titanenv lock: every Python dependency, pinned with hashes, for Linux x86_64 and aarch64,",
        f"# Python >= {LOCK_PYTHON}. Generated from pyproject.toml by `env/set_up.sh lock`; do not edit.",
        "# torch and triton are the base layer: the container provides them; hosts without torch get",
        "# the pins below (installed from pip's configured index, e.g. the PyTorch CPU index).",
        "# titanenv:base " + " ".join(f"{n}=={v}" for n, v in base.items()),
        "# titanenv:roots build " + " ".join(normalize(_name(b)) for b in build),
    ]
    header += [f"# titanenv:roots {g} " + " ".join(names) for g, names in groups.items()]
    atomic.write_text(out, "\n".join(header) + "\n" + proc.stdout)
    return cmd


def _pyproject_groups(pyproject: Path) -> tuple[dict[str, tuple[str, ...]], dict[str, str], list[str]]:
    """Root names per group (``core`` plus each extra but ``cpu``), base-layer pins, build requirements."""
    data = tomllib.loads(pyproject.read_text())
    project = data["project"]
    raw = {"core": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    base: dict[str, str] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for group, specs in raw.items():
        names = []
        for spec in specs:
            name = normalize(_name(spec))
            if name in BASE_PACKAGES:
                pin = re.search(r"==\s*([^\s;,]+)", spec)
                if not pin:
                    raise LockError(f"{pyproject}: {name} in [{group}] must be pinned with == (it is the base layer)")
                base[name] = pin.group(1)
            elif name != "titanenv":
                names.append(name)
        if group != "cpu":
            groups[group] = tuple(names)
    return groups, base, list(data.get("build-system", {}).get("requires", []))


def _name(spec: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not m:
        raise LockError(f"cannot read a package name from {spec!r}")
    return m.group(1)


def _logical_lines(text: str):
    """Lines with backslash continuations joined, each with the number of its first line."""
    buf, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""
    if buf:
        yield start, buf
