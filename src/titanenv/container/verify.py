"""``titanenv container verify IMAGE``: is this image what the repository's definition and pins say?

Through ``RUNTIME inspect`` (spython's Client) it reads the definition embedded in the image and
its labels. The definition must have the sha256 of a freshly rendered ``container/*.def`` (or of
the file given), either as written or with its ``{{ VAR }}`` build arguments filled in (from the
image's build manifest ``IMAGE.json`` where there is one, else the ``%arguments`` defaults). The
labels must carry the pins: architecture, base image, Python and every recorded package version.
``--smoke`` also runs an import check inside the image (``exec --nv``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from titanenv.container import client
from titanenv.container.render import render
from titanenv.container.spec import ImageSpec, shipped_specs
from titanenv.container.validate import expand
from titanenv.env.lockfile import Lock
from titanenv.env.platforms import ARCHES

__all__ = ["Verdict", "expected_labels", "smoke", "verify"]


@dataclass
class Verdict:
    """What ``verify`` found: the definition the image matches (if any) and every problem."""

    image: Path
    arch: str | None = None
    """The image's ``org.titanenv.arch`` label."""
    definition: str | None = None
    """Name of the rendered definition (or the file given) whose sha256 the embedded one has."""
    sha256: str = ""
    """sha256 of the embedded definition."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def expected_labels(spec: ImageSpec) -> dict[str, str]:
    """The ``%labels`` an image of ``spec`` must carry, with the pinned values."""
    labels = {
        "org.titanenv.arch": spec.arch,
        "org.titanenv.base": spec.base.ref,
        "org.titanenv.python": spec.base.python,
    }
    labels.update({f"org.titanenv.version.{name}": version for name, version in spec.packages().items()})
    return labels


def verify(image: Path, lock: Lock, runtime: str, definition: Path | None = None) -> Verdict:
    """Check ``image``'s embedded definition and labels against the rendered definitions and the pins.

    Args:
        definition: compare with this file instead of the shipped definitions rendered from ``lock``.

    Raises:
        client.ClientError: spython or the runtime is missing, or inspect failed.
    """
    attrs = client.inspect(runtime, image)
    labels = attrs.get("labels") or {}
    embedded = attrs.get("deffile") or ""
    arch = labels.get("org.titanenv.arch")
    verdict = Verdict(Path(image), arch, sha256=_sha256(embedded.rstrip("\n") + "\n"))
    if definition is not None:
        candidates = {str(definition): Path(definition).read_text()}
    else:
        candidates = {s.filename: render(s) for s in shipped_specs(lock) if arch not in ARCHES or s.arch == arch}
    build_args = _build_args(Path(image))
    if not embedded.strip():
        verdict.problems.append(f"{image}: no definition is embedded in the image ({runtime} inspect --deffile)")
    else:
        for name, text in candidates.items():
            if verdict.sha256 in {_sha256(form) for form in _forms(text, build_args)}:
                verdict.definition = name
                break
        else:
            rendered = ", ".join(f"{name} {_sha256(text)[:12]}" for name, text in candidates.items())
            verdict.problems.append(
                f"{image}: its embedded definition (sha256 {verdict.sha256[:12]}) is none of the rendered definitions "
                f"({rendered}): it was built from another definition or older pins; rebuild it "
                "(container/build_container.sh), or re-render (`titanenv container render`) if the pins moved"
            )
    if arch not in ARCHES:
        verdict.problems.append(f"{image}: label org.titanenv.arch is {arch!r}, not one of {', '.join(ARCHES)}")
        return verdict
    for key, want in expected_labels(ImageSpec.from_lock(lock, arch)).items():
        got = labels.get(key)
        if got != want:
            got_text = "no such label" if got is None else f"the image has {got!r}"
            verdict.problems.append(f"{image}: label {key}: {got_text}, the pin is {want!r}")
    return verdict


def smoke(image: Path, lock: Lock, runtime: str, root: Path, arch: str) -> str:
    """Import every recorded package inside ``image`` (``exec --nv``, the repository bound); return the output.

    Raises:
        client.ClientError: the runtime is missing or the check failed inside the image.
    """
    modules = ImageSpec.from_lock(lock, arch).modules()
    code = (
        "import importlib, os, sys; "
        f"[importlib.import_module(m) for m in {modules!r}]; "
        f"assert os.path.isdir({str(root)!r}), 'the repository is not bound'; "
        "print('smoke: imports ok, python', sys.version.split()[0])"
    )
    return client.execute(runtime, image, ["python", "-c", code], bind=[str(root)], nv=True)


def _build_args(image: Path) -> dict[str, str]:
    """The ``--build-arg`` values of the build, from ``IMAGE.json`` (written by build_container.sh)."""
    manifest = image.with_suffix(".json")
    try:
        return dict(json.loads(manifest.read_text()).get("build_args") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _forms(text: str, build_args: dict[str, str]) -> list[str]:
    """The definition as written, and with its build arguments filled in; each with one final newline."""
    return [form.rstrip("\n") + "\n" for form in (text, expand(text, build_args))]
