"""container_run.sh: the venv is active, the offline environment is set, arguments pass byte for byte."""

from __future__ import annotations

import json
import os
import subprocess

HOSTILE = [
    "a b",
    "'single'",
    '"double"',
    "$HOME",
    "$(touch /tmp/pwned)",
    "*",
    "line1\nline2",
    "",
    "  ",
    "-c",
    "--help",
    "\\",
    "ünï€ode",
    "`id`",
    ";exit 3",
]
PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def run(root, args, env=None, **kw):
    env = dict(os.environ if env is None else env, TITANENV_CONTAINER_RUNTIME="none")
    env.pop("_TITANENV_INSIDE", None)
    return subprocess.run([str(root / "container_run.sh"), *args], env=env, capture_output=True, text=True, **kw)


def test_arguments_arrive_byte_for_byte(root, tmp_path):
    p = run(root, ["python", "-c", PRINT_ARGV, *HOSTILE], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == HOSTILE
    assert not os.path.exists("/tmp/pwned")


def test_venv_and_offline_environment(root):
    env = dict(os.environ, HTTPS_PROXY="http://proxy.example:3128", HF_HUB_OFFLINE="0")
    code = "import os, sys, json; print(json.dumps({'prefix': sys.prefix, 'env': dict(os.environ)}))"
    p = run(root, ["python", "-c", code], env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    venv = out["env"]["TITANENV_VENV"]
    assert out["prefix"] == venv
    for flag in (
        "HF_HUB_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_EVALUATE_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
    ):
        assert out["env"][flag] == "1", flag
    assert "HTTPS_PROXY" not in out["env"]
    assert out["env"]["HF_HOME"]


def test_online_mode_keeps_proxy(root):
    env = dict(os.environ, HTTPS_PROXY="http://proxy.example:3128", TITANENV_OFFLINE="0")
    env.pop("HF_HUB_OFFLINE", None)
    p = run(
        root,
        ["python", "-c", "import os; print(os.environ.get('HTTPS_PROXY'), os.environ.get('HF_HUB_OFFLINE'))"],
        env=env,
    )
    assert p.stdout.split() == ["http://proxy.example:3128", "None"]


def test_documented_call_from_repo_root(root):
    p = subprocess.run(
        ["./container_run.sh", "python", "-c", "import titanenv; print(titanenv.__version__)"],
        cwd=root,
        env=dict(os.environ, TITANENV_CONTAINER_RUNTIME="none"),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == __import__("titanenv").__version__


def test_no_arguments_opens_a_shell(root):
    p = run(root, [], input='echo "inside=$_TITANENV_INSIDE offline=$HF_HUB_OFFLINE"; exit 7\n')
    assert p.returncode == 7
    assert "inside=1 offline=1" in p.stdout


def test_exit_code_passes_through(root):
    assert run(root, ["python", "-c", "raise SystemExit(42)"]).returncode == 42


def test_missing_venv_is_a_clear_error(root, tmp_path):
    p = run(root, ["python", "-V"], env=dict(os.environ, TITANENV_VENV=str(tmp_path / "nope")))
    assert p.returncode == 1
    assert "env/set_up.sh install" in p.stderr
