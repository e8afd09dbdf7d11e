"""Configuration mistakes are caught and named before a job starts (issue 9, items 14-21)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from titanenv import config, offline

CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("TITANENV_", "_TITANENV")) and k not in ("HF_HOME", "SYSTEMNAME")
}


def site_copy(root: Path, tmp_path: Path, extra: str = "", folder: str = "site") -> Path:
    """configuration.sh copied outside the repository, with ``extra`` lines appended."""
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    path = d / "configuration.sh"
    path.write_text((root / "configuration.sh").read_text() + extra)
    return path


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def container_run(root: Path, args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    env = dict(env)
    env.setdefault("TITANENV_CONTAINER_RUNTIME", "none")
    env.setdefault("TITANENV_VENV", str(root / ".venv"))
    return subprocess.run(["./container_run.sh", *args], cwd=root, env=env, capture_output=True, text=True, **kw)


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titanenv.cli", *args], env=dict(env, COLUMNS="300"),
                          capture_output=True, text=True)  # fmt: skip


# 14: a runtime error in configuration.sh fails `config show` with the line, as it fails the sbatch files.


def test_runtime_error_in_configuration_names_the_line(root, tmp_path):
    path = site_copy(root, tmp_path)  # the mistake in the middle: bash goes on after it, the scripts' set -e does not
    path.write_text(path.read_text().replace('TITANENV_ACCOUNT="${TITANENV_ACCOUNT:-}"', "TITANENV_ACCOUNT = myproj"))
    n = line_of(path, "TITANENV_ACCOUNT = myproj")
    with pytest.raises(config.ConfigError) as e:
        config.load(path, environ=dict(CLEAN))
    msg = str(e.value)
    assert f"{path}: line {n}: TITANENV_ACCOUNT: command not found" in msg
    assert "no spaces around" in msg  # the fix
    p = cli(["config", "show", "--file", str(path)], CLEAN)
    assert p.returncode == 2, p.stdout
    assert f"line {n}" in p.stderr


def test_sbatch_style_sourcing_agrees(root, tmp_path):
    """The sbatch files source the file under `set -euo pipefail`; what kills them fails Python too."""
    path = site_copy(root, tmp_path)
    path.write_text(path.read_text().replace("# Caches.", 'echo "$UNSET_BY_ANYONE"\n# Caches.'))
    shell = subprocess.run(
        ["bash", "-c", 'set -euo pipefail; source "$1"', "x", str(path)],
        env=dict(CLEAN, TITANENV_ROOT=str(root)),
        capture_output=True,
        text=True,
    )
    assert shell.returncode != 0 and "UNSET_BY_ANYONE" in shell.stderr
    with pytest.raises(config.ConfigError, match="UNSET_BY_ANYONE: unbound variable"):
        config.load(path, environ=dict(CLEAN))


# 15: misspelt TITANENV_* names warn with the nearest known name; --strict (used by --submit) refuses them.


def test_misspelt_name_in_file_warns_with_suggestion(root, tmp_path):
    path = site_copy(root, tmp_path, 'TITANENV_ACCOUNTT="myproj"\n')
    r = config.load(path, environ=dict(CLEAN))
    (w,) = r.warnings
    assert "TITANENV_ACCOUNTT" in w and "did you mean TITANENV_ACCOUNT?" in w
    assert f"configuration.sh:{line_of(path, 'TITANENV_ACCOUNTT')}" in w
    with pytest.raises(config.ConfigError, match="TITANENV_ACCOUNTT"):
        config.load(path, environ=dict(CLEAN), strict=True)


def test_misspelt_name_in_environment_warns(root):
    r = config.load(root / "configuration.sh", environ=dict(CLEAN, TITANENV_GPU_PARTITON="develbooster"))
    (w,) = r.warnings
    assert "TITANENV_GPU_PARTITON" in w and "environment" in w and "did you mean TITANENV_GPU_PARTITION?" in w


def test_config_show_warns_and_strict_fails(root):
    env = dict(CLEAN, TITANENV_GPU_PARTITON="develbooster")
    p = cli(["config", "show"], env)
    assert p.returncode == 0 and "TITANENV_GPU_PARTITON" in p.stderr and "TITANENV_GPU_PARTITION" in p.stderr
    p = cli(["config", "show", "--strict"], env)
    assert p.returncode == 2 and "TITANENV_GPU_PARTITON" in p.stderr


def test_submit_is_strict(root, sample, tmp_path):
    from titanenv.data import preprocess as pp

    data = tmp_path / "train"
    pp.run(pp.PreprocessConfig(inputs=[sample / "c4-sample.01.json.gz"], output_prefix=data,
                               tokenizer_model=str(sample / "torchtitan_test_tokenizer"), append_eod=True))  # fmt: skip
    args = [
        "train",
        "--submit",
        "--dry-run",
        "--data",
        str(data),
        "--tokenizer",
        str(sample / "torchtitan_test_tokenizer"),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    bin_dir = tmp_path / "bin"  # bash but no sbatch: the dry run skips `sbatch --test-only`
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    env = dict(CLEAN, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}")
    assert cli(args, env).returncode == 0
    p = cli(args, dict(env, TITANENV_ACCOUNTT="myproj"))
    assert p.returncode == 2 and "TITANENV_ACCOUNTT" in p.stderr and "TITANENV_ACCOUNT" in p.stderr


def test_no_warnings_for_the_shipped_configuration_or_the_scripts(root):
    assert config.load(root / "configuration.sh", environ=dict(CLEAN)).warnings == ()
    code = "from titanenv import config; print(json.dumps(config.load().warnings))"
    env = dict(
        CLEAN, TITANENV_OFFLINE="1", TITANENV_BIND="/tmp", TITANENV_MAX_REQUEUES="3", TITANENV_STOP_FILE="/tmp/s"
    )
    p = container_run(root, ["python", "-c", "import json; " + code], env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == []


def test_every_titanenv_name_in_the_code_is_known(root):
    """Names titanenv itself sets or reads (scripts, templates, tests) must never be reported as misspelt."""
    used: set[str] = set()
    files = [root / "configuration.sh", root / "container_run.sh", *root.glob("jsc/*.sbatch"), *root.glob("env/*.sh"),
             *root.glob("container/*.sh"), *(root / "src").rglob("*.py"), *(root / "src").rglob("*.j2"),
             *(root / "tests").glob("*.py")]  # fmt: skip
    for f in files:
        used |= set(re.findall(r"(?<![A-Za-z0-9_])TITANENV_[A-Z0-9_]*[A-Z0-9]", f.read_text()))
    used -= {"TITANENV_SECRET_KEY", "TITANENV_ACCOUNTT", "TITANENV_GPU_PARTITON"}  # made up by tests on purpose
    assert used - set(config.known_names()) == set()


# 16: TITANENV_CONFIG outside the repository: Python and container_run.sh resolve the same root (the repository).


def test_config_outside_repository_same_root_in_python_and_shell(root, tmp_path, monkeypatch):
    path = site_copy(root, tmp_path)
    env = dict(CLEAN, TITANENV_CONFIG=str(path))
    shell = container_run(root, ["python", "-c", "import os; print(os.environ['TITANENV_ROOT'])"], env)
    assert shell.returncode == 0, shell.stderr
    assert Path(shell.stdout.strip()) == root
    # Python, started without container_run.sh
    monkeypatch.delenv("TITANENV_ROOT", raising=False)
    monkeypatch.setenv("TITANENV_CONFIG", str(path))
    r = config.load()
    assert (r.config.root, r.origins["TITANENV_ROOT"]) == (root, "repository")
    assert config.load(environ=env).config.root == root
    p = cli(["config", "show"], env)
    assert p.returncode == 0, p.stderr
    assert re.search(rf"TITANENV_ROOT[\s│]+{re.escape(str(root))}\s", p.stdout)


# 17: origins stay true through container_run.sh, which exports every value.


def test_origins_through_container_run(root):
    env = dict(CLEAN, TITANENV_ACCOUNT="myproject", COLUMNS="300")
    code = "import json; from titanenv import config; print(json.dumps(config.load().origins))"
    p = container_run(root, ["python", "-c", code], env)
    assert p.returncode == 0, p.stderr
    origins = json.loads(p.stdout)
    assert origins["TITANENV_ACCOUNT"] == "environment"
    assert origins["TITANENV_DATA_DIR"].startswith("configuration.sh:")
    assert origins["HF_HOME"].startswith("configuration.sh:")
    assert origins["TITANENV_CPU_PARTITION"] == "machine profile local"
    p = container_run(root, ["titanenv", "config", "show"], env)  # the README's path
    assert p.returncode == 0, p.stderr
    assert re.search(r"TITANENV_DATA_DIR\s.*\sconfiguration\.sh:\d+", p.stdout)
    assert re.search(r"TITANENV_ACCOUNT[\s│]+myproject[\s│]+environment", p.stdout)


# 18: commands printed for copying are shell-quoted.


def test_demo_prints_quoted_commands(tmp_path):
    from titanenv.cli import _output_lines

    run_dir = tmp_path / "my runs" / "sample"
    lines = _output_lines(tmp_path / "my data", run_dir)
    (tb,) = [line for line in lines if "tensorboard --logdir" in line]
    command = tb.split("(", 1)[1].rsplit(")", 1)[0]
    assert shlex.split(command) == ["tensorboard", "--logdir", str(run_dir / "tb")]


def test_preprocess_merge_hint_is_quoted(tmp_path, sample, capsys):
    from titanenv.data import preprocess as pp

    prefix = tmp_path / "my data" / "train"
    pp.dry_run(
        pp.PreprocessConfig(
            inputs=[sample / "c4-sample.01.json.gz"],
            output_prefix=prefix,
            tokenizer_model=str(sample / "torchtitan_test_tokenizer"),
            num_shards=2,
        )
    )
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "--merge" in x]
    assert shlex.split(line.split("`")[1])[4] == str(prefix)


# 19: a wrong runtime is named with the valid values; a venv without titanenv says how to fix it.


def test_wrong_runtime_in_container_run(root):
    p = container_run(root, ["true"], dict(CLEAN, TITANENV_CONTAINER_RUNTIME="podman"))
    assert p.returncode == 2
    assert "TITANENV_CONTAINER_RUNTIME=podman" in p.stderr and "auto, apptainer, singularity, none" in p.stderr


def test_wrong_runtime_in_python(root):
    p = cli(["config", "show"], dict(CLEAN, TITANENV_CONTAINER_RUNTIME="podman"))
    assert p.returncode == 2
    assert "TITANENV_CONTAINER_RUNTIME='podman'" in p.stderr and "auto, apptainer, singularity, none" in p.stderr


def test_venv_without_titanenv_says_reinstall(root, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    p = container_run(root, ["titanenv", "config", "show"], dict(CLEAN, TITANENV_VENV=str(venv)))
    assert p.returncode == 1
    assert "reinstall with env/set_up.sh install" in p.stderr and str(venv) in p.stderr


# 20: the wheel carries every template; installed alone it renders sbatch scripts and definitions.


def test_wheel_installed_alone_renders_templates(root, tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("titanenv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "titanenv/slurm/templates/train.sbatch.j2" in names and "titanenv/offline.env" in names
    data = {str(f.relative_to(root / "src")) for f in (root / "src" / "titanenv").rglob("*")
            if f.is_file() and f.suffix not in (".py", ".pyc")}  # fmt: skip
    assert data - set(names) == set(), "package data missing from the wheel (pyproject.toml, package-data)"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # The dependencies come from this venv (and the image's Python under it); plain path lines do not
    # run the editable install's .pth, so the wheel's copy is the one imported.
    Path(purelib, "dev-deps.pth").write_text("".join(p + "\n" for p in site.getsitepackages()))
    env = dict(CLEAN, TITANENV_ROOT=str(root), PATH=f"{venv / 'bin'}:/usr/bin:/bin")
    where = subprocess.run([str(py), "-c", "import titanenv; print(titanenv.__file__)"], env=env, check=True,
                           capture_output=True, text=True, cwd=tmp_path).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv), where
    sbatch = subprocess.run([str(venv / "bin" / "titanenv"), "slurm", "render", "--machine", "jwb"], env=env,
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert sbatch.returncode == 0, sbatch.stderr
    assert sbatch.stdout == (root / "jsc" / "run_training_jwb.sbatch").read_text()
    out = tmp_path / "defs"
    defs = subprocess.run([str(venv / "bin" / "titanenv"), "container", "render", "--out", str(out)], env=env,
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert defs.returncode == 0, defs.stderr
    assert sorted(p.name for p in out.glob("*.def"))


# 21: the offline environment sends no token, waits briefly, and bypasses every proxy.

OFFLINE_ADDED = {
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
    "no_proxy": "*",
    "NO_PROXY": "*",
}


def test_offline_env_additions_parse():
    to_set, to_unset = offline.offline_environment()
    for key, value in OFFLINE_ADDED.items():
        assert to_set[key] == value, key
    for key in ("HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_ETAG_TIMEOUT"):
        assert 0 < int(to_set[key]) < 10, key  # shorter than huggingface_hub's default of 10 s
    assert "no_proxy" not in to_unset and "NO_PROXY" not in to_unset


def test_offline_env_same_in_bash_and_python(root):
    code = "import os, json; print(json.dumps(dict(os.environ)))"
    p = container_run(root, ["python", "-c", code], dict(CLEAN, no_proxy="localhost", HTTPS_PROXY="http://p:3128"))
    assert p.returncode == 0, p.stderr
    env = json.loads(p.stdout)
    to_set, to_unset = offline.offline_environment()
    assert {k: env.get(k) for k in to_set} == to_set
    assert not [k for k in to_unset if k in env]
