"""configuration.sh is read into one validated object; every value can come from the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from titanenv import config

CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("TITANENV_") and k not in ("HF_HOME", "SYSTEMNAME")}


def test_defaults_and_origins(root):
    r = config.load(root / "configuration.sh", environ=dict(CLEAN))
    c = r.config
    assert c.root == root
    assert c.machine == "local"
    assert (c.cpu_partition, c.gpu_partition) == ("batch", "booster")
    assert r.origins["TITANENV_CPU_PARTITION"] == "machine profile local"
    assert c.data_dir == root / "scratch" / "data"
    assert r.origins["TITANENV_DATA_DIR"].startswith("configuration.sh:")
    assert c.container_runtime == "auto"


def test_environment_overrides(root, tmp_path):
    env = dict(CLEAN, TITANENV_MACHINE="jwb", TITANENV_DATA_DIR=str(tmp_path), HF_HOME=str(tmp_path / "hf"))
    r = config.load(root / "configuration.sh", environ=env)
    assert r.config.machine == "jwb"
    assert r.config.gpu_partition == "booster"
    assert r.config.profile.rdzv_host == "{node}i"
    assert r.config.data_dir == tmp_path
    assert r.origins["TITANENV_DATA_DIR"] == "environment"
    assert r.config.hf_home == tmp_path / "hf"


@pytest.mark.parametrize(
    "sysname,machine", [("juwelsbooster", "jwb"), ("jurecadc", "jrc"), ("jupiter", "jpb"), ("", "local")]
)
def test_auto_machine_from_systemname(root, sysname, machine):
    r = config.load(root / "configuration.sh", environ=dict(CLEAN, SYSTEMNAME=sysname))
    assert r.config.machine == machine


def test_misspelled_machine_names_the_variable(root):
    with pytest.raises(config.ConfigError) as e:
        config.load(root / "configuration.sh", environ=dict(CLEAN, TITANENV_MACHINE="jwbb"))
    msg = str(e.value)
    assert "TITANENV_MACHINE='jwbb' (from environment)" in msg
    assert "did you mean 'jwb'" in msg


@pytest.mark.parametrize("var,value", [("TITANENV_CONTAINER_RUNTIME", "docker"), ("TITANENV_VENV", "relative/venv")])
def test_invalid_value_names_the_variable(root, var, value):
    with pytest.raises(config.ConfigError, match=var):
        config.load(root / "configuration.sh", environ=dict(CLEAN, **{var: value}))


def test_broken_file_names_the_file(tmp_path):
    bad = tmp_path / "configuration.sh"
    bad.write_text('TITANENV_MACHINE="local\n')
    with pytest.raises(config.ConfigError, match="configuration.sh: sourcing failed"):
        config.load(bad, environ=dict(CLEAN))


def test_config_show_cli(root):
    env = dict(CLEAN, TITANENV_ACCOUNT="myproject", COLUMNS="200")
    out = subprocess.run(
        [sys.executable, "-m", "titanenv.cli", "config", "show"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "TITANENV_ACCOUNT" in out and "myproject" in out and "environment" in out
    assert "machine profile local" in out
    bad = subprocess.run(
        [sys.executable, "-m", "titanenv.cli", "config", "show"],
        env=dict(env, TITANENV_MACHINE="jwbb"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "TITANENV_MACHINE" in bad.stderr
