"""The Slurm environment, parsed once (titanenv.slurmenv), and the one sbatch call (titanenv.sbatch)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from titanenv import sbatch
from titanenv.slurmenv import SlurmEnv, node_name


def test_outside_slurm_everything_is_unset():
    env = SlurmEnv.from_env({})
    assert not env.in_job and env.job_id is None and env.array_index == 0 and env.job_record() == {}


def test_a_step_inside_a_job_array():
    env = SlurmEnv.from_env({
        "SLURM_JOB_ID": "12", "SLURM_JOB_NAME": "tok", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_PARTITION": "batch",
        "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3",
        "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_JOB_NODELIST": "jwb[0001-0004]", "SLURM_STEP_NODELIST": "jwb[0001-0002]",
        "SLURM_JOB_NUM_NODES": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURMD_NODENAME": "jwb0002",
        "SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_ACCOUNT": "",
    })  # fmt: skip
    assert env.in_job and env.array_index == 2 and env.array_task_count == 4
    assert (env.nodelist, env.num_nodes, env.node_id, env.nodename) == ("jwb[0001-0002]", 2, 1, "jwb0002")
    assert env.gpus_on_node == 0 and env.account is None  # 0 is a value; empty is unset
    assert env.job_record() == {"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2", "SLURM_JOB_PARTITION": "batch",
                                "SLURM_JOB_NAME": "tok"}  # fmt: skip


def test_job_values_when_there_is_no_step():
    env = SlurmEnv.from_env({"SLURM_JOB_ID": "5", "SLURM_NNODES": "2", "SLURM_NODELIST": "jpbo-[001-002]"})
    assert (env.nodelist, env.num_nodes) == ("jpbo-[001-002]", 2)


def test_a_malformed_integer_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_NODEID='x' is not an integer"):
        SlurmEnv.from_env({"SLURM_NODEID": "x"})


def test_node_name():
    assert node_name({"SLURMD_NODENAME": "jwb0001"}) == "jwb0001"
    assert node_name({}) == os.uname().nodename


@pytest.fixture
def fake_sbatch(tmp_path: Path) -> Path:
    """An sbatch that records its arguments and environment, and answers like ``--parsable``."""
    script = tmp_path / "sbatch"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {tmp_path}/argv\n'
        f'echo "inside=${{_TITANENV_INSIDE:-unset}} pwd=$PWD" > {tmp_path}/env\n'
        'case "$*" in *refuse*) echo "sbatch: error: Batch job submission failed: Invalid account" >&2; exit 1;; esac\n'
        'case "$1" in --test-only) echo "sbatch: Job 7 to start at 2026-01-01T00:00:00" >&2;;\n'
        '  *) echo "4242;jureca";; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_submit_builds_one_command_and_parses_the_job_id(fake_sbatch: Path, tmp_path: Path):
    env = {"PATH": os.environ["PATH"], "_TITANENV_INSIDE": "1"}
    job = sbatch.submit(["--wrap=true"], dependency="afterok:41", sbatch=str(fake_sbatch), cwd=tmp_path, env=env)
    assert job == "4242"
    assert (tmp_path / "argv").read_text().split() == [
        "--parsable",
        "--dependency=afterok:41",
        "--kill-on-invalid-dep=yes",
        "--wrap=true",
    ]
    assert (tmp_path / "env").read_text().split() == ["inside=unset", f"pwd={tmp_path}"]


def test_a_refused_job_says_what_sbatch_said(fake_sbatch: Path):
    with pytest.raises(RuntimeError, match="sbatch refused job.sh: sbatch: error: .*Invalid account"):
        sbatch.submit(["job.sh", "refuse"], sbatch=str(fake_sbatch), what="job.sh")


def test_test_only_and_a_missing_sbatch(fake_sbatch: Path, monkeypatch: pytest.MonkeyPatch):
    rc, message = sbatch.test_only(["job.sh"], sbatch=str(fake_sbatch))
    assert rc == 0 and "to start at" in message
    assert sbatch.command(["job.sh"], test_only=True) == ["sbatch", "--test-only", "job.sh"]
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="login node"):
        sbatch.submit(["job.sh"])


def test_parsable_output():
    assert sbatch.parse_parsable("123\n") == "123"
    assert sbatch.parse_parsable("123;jureca\n") == "123"
    with pytest.raises(RuntimeError, match="no job id"):
        sbatch.parse_parsable("")
