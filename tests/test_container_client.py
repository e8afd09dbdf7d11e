"""titanenv container verify and the runtime client (spython), against a stand-in runtime on PATH.

The stand-in is test_container_def's, extended: named ``apptainer`` and/or ``singularity``, it
records its argv, answers ``inspect --json`` from a file beside the image (what Apptainer would
read from the SIF) and runs ``exec`` with an exit status the test chooses.
"""

from __future__ import annotations

import json
import os
import platform
import re
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_container_def import FAKE_RUNTIME, SIF_HEADER
from titanenv.container import client
from titanenv.container.cli import app as container_app
from titanenv.container.render import render
from titanenv.container.spec import ImageSpec
from titanenv.container.validate import expand
from titanenv.env.lockfile import Lock

ARCH = platform.machine() if platform.machine() in ("x86_64", "aarch64") else "x86_64"
STAND_IN = FAKE_RUNTIME.replace("SIF", repr(SIF_HEADER)) + textwrap.dedent(
    """\
    if sys.argv[1] == "--version":
        print(os.path.basename(sys.argv[0]) + " version 1.4.5")
    elif sys.argv[1] == "inspect":
        with open(sys.argv[-1] + ".inspect.json") as f:
            print(f.read())
    elif sys.argv[1] == "exec":
        print("inside:", " ".join(sys.argv[2:]))
        sys.exit(int(os.environ.get("FAKE_EXEC_RC", "0")))
    """
)


@pytest.fixture(scope="module")
def lock(root):
    return Lock.read(root / "env" / "requirements.lock")


@pytest.fixture
def runtimes(tmp_path, monkeypatch):
    """Put stand-ins named as asked on PATH (and no real runtime); return the argv log reader."""

    def install(*names):
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        for name in names:
            exe = bindir / name
            exe.write_text(STAND_IN.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
            exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
        others = [p for p in os.environ["PATH"].split(":") if not any((Path(p) / n).exists() for n in client.RUNTIMES)]
        monkeypatch.setenv("PATH", ":".join([str(bindir), *others]))
        monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
        monkeypatch.delenv("TITANENV_CONTAINER_RUNTIME", raising=False)

    return install


def calls(tmp_path):
    log = tmp_path / "calls.jsonl"
    return [json.loads(line)["argv"] for line in log.read_text().splitlines()] if log.exists() else []


def labels_of(definition: str) -> dict[str, str]:
    """The %labels of a definition as the runtime records them: build arguments filled in."""
    body = expand(definition).split("%labels\n", 1)[1].split("\n%", 1)[0]
    return dict(line.strip().split(" ", 1) for line in body.splitlines() if line.strip())


def image(tmp_path, deffile: str, labels: dict[str, str] | None = None) -> Path:
    """A .sif with what ``inspect --json`` reports for it (Apptainer's layout: data.attributes)."""
    sif = tmp_path / "titanenv.sif"
    sif.write_bytes(SIF_HEADER)
    attrs = {"deffile": deffile, "labels": labels_of(deffile) if labels is None else labels, "test": "", "helpfile": ""}
    (tmp_path / "titanenv.sif.inspect.json").write_text(
        json.dumps({"data": {"attributes": attrs}, "type": "container"})
    )
    return sif


def verify(*args):
    return CliRunner().invoke(container_app, ["verify", *map(str, args)])


@pytest.fixture
def shipped(lock):
    return render(ImageSpec.from_lock(lock, ARCH))


def test_verify_passes_for_an_image_of_the_rendered_definition(tmp_path, runtimes, shipped):
    runtimes("apptainer", "singularity")
    sif = image(tmp_path, shipped)
    r = verify(sif)
    assert r.exit_code == 0, r.output
    assert f"definition titanenv-{ARCH}.def" in r.output and "labels match the pins" in r.output
    # spython's inspect goes to apptainer, though spython names `singularity`; its own
    # install check (`singularity --version`, result unused) is the one call that keeps the name.
    assert calls(tmp_path) == [
        ["singularity", "--version"],
        ["apptainer", "inspect", "-e", "-d", "-l", "-r", "-H", "-t", "--json", str(sif)],
    ]


def test_an_embedded_definition_with_build_arguments_filled_in_matches_too(tmp_path, runtimes, lock):
    runtimes("apptainer")
    offline = render(ImageSpec.from_lock(lock, ARCH, "offline"))
    sif = image(tmp_path, expand(offline, {"BASE_IMAGE": "/scratch/base.sif"}))
    sif.with_suffix(".json").write_text(json.dumps({"build_args": {"BASE_IMAGE": "/scratch/base.sif"}}))
    r = verify(sif)
    assert r.exit_code == 0, r.output
    assert f"definition titanenv-{ARCH}-offline.def" in r.output


def test_another_definition_is_named_with_both_hashes(tmp_path, runtimes, shipped):
    runtimes("apptainer")
    sif = image(tmp_path, shipped.replace("export PYTHONNOUSERSITE=1", "export PYTHONNOUSERSITE=0"))
    r = verify(sif)
    assert r.exit_code == 1
    assert "is none of the rendered definitions" in r.output and f"titanenv-{ARCH}.def " in r.output


def test_labels_that_differ_from_the_pins_are_named(tmp_path, runtimes, shipped, lock):
    runtimes("apptainer")
    labels = labels_of(shipped)
    labels["org.titanenv.version.torchtitan"] = "0.2.0"
    del labels["org.titanenv.version.tokenizers"]
    r = verify(image(tmp_path, shipped, labels))
    assert r.exit_code == 1
    pin = lock.version_of("torchtitan")
    assert f"label org.titanenv.version.torchtitan: the image has '0.2.0', the pin is '{pin}'" in r.output
    assert "label org.titanenv.version.tokenizers: no such label" in r.output


def test_apptainer_without_the_singularity_name_works(tmp_path, runtimes, shipped):
    runtimes("apptainer")
    assert verify(image(tmp_path, shipped)).exit_code == 0
    assert [c[:2] for c in calls(tmp_path)] == [["apptainer", "inspect"]]


def test_singularity_alone_is_used_under_its_own_name(tmp_path, runtimes, shipped):
    runtimes("singularity")
    assert verify(image(tmp_path, shipped)).exit_code == 0
    assert [c[:2] for c in calls(tmp_path)] == [["singularity", "--version"], ["singularity", "inspect"]]


def test_the_chosen_runtime_is_the_one_run(tmp_path, runtimes, shipped):
    runtimes("apptainer", "singularity")
    assert verify(image(tmp_path, shipped), "--runtime", "singularity").exit_code == 0
    assert [c[:2] for c in calls(tmp_path)] == [["singularity", "--version"], ["singularity", "inspect"]]


def test_smoke_runs_the_imports_inside_with_nv_and_the_repository_bound(tmp_path, runtimes, shipped, root):
    runtimes("apptainer", "singularity")
    sif = image(tmp_path, shipped)
    r = verify(sif, "--smoke")
    assert r.exit_code == 0, r.output
    exec_argv = calls(tmp_path)[-1]
    assert exec_argv[:5] == ["apptainer", "exec", "--nv", "--bind", str(root)]
    assert exec_argv[5:8] == [str(sif), "python", "-c"] and "import_module" in exec_argv[8]
    assert "inside: --nv" in r.output


def test_a_failing_smoke_check_fails_with_its_exit_status(tmp_path, runtimes, shipped, monkeypatch):
    runtimes("apptainer")
    monkeypatch.setenv("FAKE_EXEC_RC", "3")
    r = verify(image(tmp_path, shipped), "--smoke")
    assert r.exit_code == 1 and re.search(r"exec .* exited 3", r.output)


def test_no_runtime_on_path_is_a_clear_error(tmp_path, runtimes, shipped):
    runtimes()
    r = verify(image(tmp_path, shipped))
    assert r.exit_code == 1 and "no apptainer or singularity on PATH" in r.output


def test_without_spython_the_client_says_how_to_install_it(runtimes, monkeypatch):
    runtimes("apptainer")
    monkeypatch.setitem(sys.modules, "spython.main", None)
    with pytest.raises(client.ClientError, match="spython is not installed.*env/set_up.sh install"):
        client.spython_client("apptainer")


def test_runtime_none_names_the_setting(tmp_path, runtimes, shipped, monkeypatch):
    runtimes("apptainer")
    monkeypatch.setenv("TITANENV_CONTAINER_RUNTIME", "none")
    r = verify(image(tmp_path, shipped))
    assert r.exit_code == 1 and "TITANENV_CONTAINER_RUNTIME=none" in r.output and calls(tmp_path) == []
