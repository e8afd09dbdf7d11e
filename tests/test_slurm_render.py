"""The sbatch scripts: templates plus site data, rendered; renderings and dry-run output golden-tested per site."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from titanenv.config import MACHINES
from titanenv.data import preprocess as pp
from titanenv.slurm.render import (
    CHECKED_IN,
    EVAL_TEMPLATE,
    PREPROCESS_TEMPLATE,
    TEMPLATE,
    EvalSpec,
    JobSpec,
    PreprocessSpec,
    render,
)
from titanenv.train import exitcodes
from titanenv.train.exitcodes import ExitCode

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TITANENV_UPDATE_GOLDEN") == "1"  # read before the tests clear TITANENV_*


def test_checked_in_jwb_script_is_the_rendering(root):
    """A user edits #SBATCH lines in the checked-in file; a template change must be re-rendered into it."""
    assert (root / "jsc" / "run_training_jwb.sbatch").read_text() == render(JobSpec(machine="jwb")), (
        "jsc/run_training_jwb.sbatch differs from the template: "
        "python -m titanenv.slurm render --machine jwb > jsc/run_training_jwb.sbatch"
    )


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_every_site_renders_valid_bash_with_its_facts(machine):
    text = render(JobSpec(machine=machine, account="proj1", nodes=4, time="1-00:00:00"))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    m = MACHINES[machine]
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(.*)$", text, re.MULTILINE))
    assert sbatch["partition"] == m.gpu_partition and sbatch["account"] == "proj1" and sbatch["nodes"] == "4"
    assert sbatch["time"] == "1-00:00:00" and sbatch["signal"] == "B:USR1@600" and "requeue" in sbatch
    assert sbatch.get("gres") == (f"gpu:{m.gpus_per_node}" if m.gpus_per_node else None)
    assert sbatch["cpus-per-task"] == str(m.cpus_per_node or 1)
    # Interconnect settings live in the machine profile and reach torchrun through titanenv train, not bash.
    assert "NCCL_" not in text and "UCX_" not in text and "MASTER_PORT" not in text


def test_template_is_a_file_and_values_are_validated():
    assert TEMPLATE.is_file()
    for bad in (dict(nodes=0), dict(time="two hours"), dict(account="has space"), dict(machine="jwx")):
        with pytest.raises(ValueError):
            JobSpec(**{"machine": "jwb", **bad})


# ------------------------------------------------------------------ dry run, golden per site


@pytest.fixture(scope="module")
def tiny_data(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "train"
    pp.run(pp.PreprocessConfig(inputs=[sample / "c4-sample.01.json.gz"], output_prefix=out,
                               tokenizer_model=str(sample / "torchtitan_test_tokenizer"), append_eod=True))  # fmt: skip
    return out


def dry_run_env(monkeypatch, machine: str) -> dict[str, str]:
    """No sbatch on PATH, no site or Slurm variables from this machine; the env of a dry run on ``machine``."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "sbatch" else real_which(name, *a, **k))
    for name in list(os.environ):
        if name.startswith(
            ("TITANENV_", "SLURM_", "NCCL_", "UCX_", "GLOO_", "HF_", "PIP_", "TRITON_", "TORCHINDUCTOR_", "NLTK_")
        ):
            monkeypatch.delenv(name)
    return dict(TITANENV_MACHINE=machine, TITANENV_ACCOUNT="myproject", TITANENV_VENV="/opt/titanenv/venv",
                TITANENV_SCRATCH_DIR="/p/scratch/myproject", TITANENV_PROJECT_DIR="/p/project/myproject")  # fmt: skip


def dry_run(machine: str, data: Path, sample: Path, monkeypatch, extra=()) -> str:
    from titanenv.cli import app

    env = dry_run_env(monkeypatch, machine)
    args = [
        "train",
        "--submit",
        "--dry-run",
        "--data",
        str(data),
        "--tokenizer",
        str(sample / "torchtitan_test_tokenizer"),
        "--output-dir",
        "/p/scratch/myproject/runs/llama1b",
        "--recipe",
        "titanenv_1b",
        "--steps",
        "10000",
        "--nodes",
        "4",
        "--time",
        "1-00:00:00",
        *extra,
    ]
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    root = str(Path(__file__).resolve().parents[1])
    return result.stdout.replace(str(data.parent), "<DATA>").replace(root, "<ROOT>")


@pytest.mark.parametrize("machine", ["jwb", "jrc", "jpb"])
def test_dry_run_matches_golden(machine, tiny_data, sample, monkeypatch):
    text = dry_run(machine, tiny_data, sample, monkeypatch)
    golden = GOLDEN / f"dry_run_{machine}.txt"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"dry run for {machine} changed; TITANENV_UPDATE_GOLDEN=1 rewrites {golden}"


def test_dry_run_shows_the_site_rendezvous_and_interconnect(tiny_data, sample, monkeypatch):
    jwb = dry_run("jwb", tiny_data, sample, monkeypatch)
    assert "--rdzv-endpoint jwb0001i:" in jwb and "--nnodes 4 --nproc-per-node 4" in jwb
    assert "NCCL_SOCKET_IFNAME=ib0" in jwb and "GLOO_SOCKET_IFNAME=ib0" in jwb and "NCCL_IB_TIMEOUT=50" in jwb
    jpb = dry_run("jpb", tiny_data, sample, monkeypatch)
    assert "--rdzv-endpoint jpb0001-interconnect-1.jupiter.internal:" in jpb and "SOCKET_IFNAME" not in jpb
    assert "#SBATCH --cpus-per-task=288" in jpb


# ------------------------------------------------------------------ the preprocessing scripts


def test_checked_in_jsc_files_are_the_renderings(root):
    assert sorted(p.name for p in (root / "jsc").glob("*.sbatch")) == sorted(spec.filename for spec in CHECKED_IN)
    for spec in CHECKED_IN:
        assert (root / "jsc" / spec.filename).read_text() == render(spec), (
            f"jsc/{spec.filename} differs from its template: "
            f"python -m titanenv.slurm render --job {spec.job} --machine {spec.machine} > jsc/{spec.filename}"
        )


@pytest.mark.parametrize("parallel", [False, True], ids=["one-node", "array"])
@pytest.mark.parametrize("machine", ["jwc", "jrc", "jpb"])
def test_preprocess_rendering_matches_golden(machine, parallel):
    spec = PreprocessSpec(machine=machine, parallel=parallel)
    text = render(spec)
    golden = GOLDEN / spec.filename
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering for {machine} changed; TITANENV_UPDATE_GOLDEN=1 rewrites {golden}"


@pytest.mark.parametrize("parallel", [False, True], ids=["one-node", "array"])
@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_preprocess_renders_valid_bash_on_the_cpu_partition(machine, parallel):
    text = render(PreprocessSpec(machine=machine, parallel=parallel, account="proj1", time="30", shards=8))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(.*)$", text, re.MULTILINE))
    assert sbatch["partition"] == MACHINES[machine].cpu_partition != ""
    assert (sbatch["account"], sbatch["time"], sbatch["nodes"], sbatch["ntasks"]) == ("proj1", "30", "1", "1")
    assert sbatch.get("array") == ("0-7" if parallel else None)
    assert ("--submit-merge" in text) == parallel and '--workers "$SLURM_CPUS_PER_TASK" "$@"' in text


def test_preprocess_template_and_values_are_validated():
    assert PREPROCESS_TEMPLATE.is_file()
    for bad in (dict(shards=0), dict(cpus_per_task=0), dict(time="soon"), dict(account=""), dict(machine="jwx")):
        with pytest.raises(ValueError):
            PreprocessSpec(**{"machine": "jwc", **bad})


def test_render_cli_chooses_the_job(root):
    from titanenv.cli import app

    for spec in CHECKED_IN:
        result = CliRunner().invoke(app, ["slurm", "render", "--job", spec.job])  # default machine: the jsc/ file's
        assert result.exit_code == 0, result.output
        assert result.stdout == (root / "jsc" / spec.filename).read_text()
    result = CliRunner().invoke(
        app, ["slurm", "render", "--job", "preprocess-parallel", "--machine", "jrc", "--shards", "2"]
    )
    assert (
        result.exit_code == 0
        and "#SBATCH --partition=dc-cpu\n" in result.stdout
        and "#SBATCH --array=0-1\n" in result.stdout
    )
    assert CliRunner().invoke(app, ["slurm", "render", "--job", "export"]).exit_code == 2


# ------------------------------------------------------------------ the evaluation script


@pytest.mark.parametrize("machine", ["jwb", "jwc", "jrc", "jpb"])
def test_eval_rendering_matches_golden(machine):
    spec = EvalSpec(machine=machine)
    text = render(spec)
    golden = GOLDEN / spec.filename
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering for {machine} changed; TITANENV_UPDATE_GOLDEN=1 rewrites {golden}"


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_eval_renders_valid_bash_on_one_gpu(machine):
    text = render(EvalSpec(machine=machine, account="proj1", time="30"))
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    m = MACHINES[machine]
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(.*)$", text, re.MULTILINE))
    assert (sbatch["partition"], sbatch["account"], sbatch["time"]) == (m.gpu_partition, "proj1", "30")
    assert (sbatch["nodes"], sbatch["ntasks"]) == ("1", "1") and "requeue" not in sbatch
    assert sbatch.get("gres") == ("gpu:1" if m.gpus_per_node else None)
    assert f'titanenv eval --device {"cuda" if m.gpus_per_node else "cpu"} "$@"' in text
    assert "export TITANENV_OFFLINE=1" in text and "titanenv doctor --offline --check-tasks" in text


def test_eval_template_and_values_are_validated():
    assert EVAL_TEMPLATE.is_file()
    for bad in (dict(gpus=-1), dict(time="later"), dict(account="a b"), dict(machine="jwx")):
        with pytest.raises(ValueError):
            EvalSpec(**{"machine": "jwb", **bad})
    assert "#SBATCH --gres=gpu:2\n" in render(EvalSpec(machine="jwb", gpus=2))


def test_eval_script_runs_titanenv_eval_offline_in_the_container(tmp_path):
    """Run as a batch script with srun faked: the command line, the defaults, offline, TITANENV_CONFIG honoured."""
    script = tmp_path / "job.sbatch"
    script.write_text(render(EvalSpec(machine="jwb")))
    env = fake_slurm(tmp_path)
    env["FAKE_LOG"] = str(tmp_path / "log")
    bin_srun = tmp_path / "bin" / "srun"  # also record the offline switch srun passes on
    bin_srun.write_text('#!/usr/bin/env bash\necho "srun $* [TITANENV_OFFLINE=$TITANENV_OFFLINE]" >> "$FAKE_LOG"\n')
    env["TITANENV_OFFLINE"] = "0"  # left over from a fetch in the submitting shell: the job still runs offline
    assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    args = ["--model", "/p/runs/a b", "--tasks", "arc_easy", "--num-fewshot", "0,5", "--limit", "8"]
    assert subprocess.run(["bash", str(script), *args], env=env).returncode == 0
    head = "srun --ntasks=1 --cpu-bind=none /repo/container_run.sh titanenv eval --device cuda"
    assert (tmp_path / "log").read_text().splitlines() == [
        f"{head} --model {tmp_path}/runs/sample --num-fewshot 0,5 --limit 20 [TITANENV_OFFLINE=1]",
        f"{head} {' '.join(args)} [TITANENV_OFFLINE=1]",
    ]


# ------------------------------------------------------------------ one exit-code table, one configuration file


def test_exit_codes_come_from_the_python_table(monkeypatch):
    from titanenv.train import runner

    assert (ExitCode.DONE, ExitCode.PREFLIGHT_FAILED, ExitCode.STOPPED) == (0, 3, 75) and runner.STOPPED == 75
    assert runner.exit_code(0, {"state": "stopped"}) == ExitCode.STOPPED
    assert not re.search(r"\b(75|3)\b", TEMPLATE.read_text()), "exit codes belong in titanenv.train.exitcodes"
    text = render(JobSpec(machine="jwb"))
    assert "if ((rc == 75)); then" in text and "exits 0: done, 3: preflight failed, 75: stopped" in text
    monkeypatch.setattr(exitcodes, "table", lambda: {"DONE": 0, "PREFLIGHT_FAILED": 3, "STOPPED": 99})
    assert "if ((rc == 99)); then" in render(JobSpec(machine="jwb"))


SOURCE_CONFIG = 'source "${TITANENV_CONFIG:-$TITANENV_ROOT/configuration.sh}"'


def test_every_script_reads_the_configuration_container_run_reads(root):
    assert SOURCE_CONFIG in (root / "container_run.sh").read_text()
    for spec in (*CHECKED_IN, PreprocessSpec(machine="jrc"), JobSpec(machine="jpb")):
        text = render(spec)
        assert text.count(SOURCE_CONFIG) == 1 and text.count("configuration.sh") == 1, spec


def fake_slurm(tmp_path: Path, srun_rc: int = 0) -> dict[str, str]:
    """srun and scontrol on PATH that record their argv (one line each), and a site file elsewhere."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, rc in (("srun", srun_rc), ("scontrol", 0)):
        (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$FAKE_LOG"\nexit {rc}\n')
        (bin_dir / name).chmod(0o755)
    site = tmp_path / "site.sh"
    site.write_text(f"TITANENV_DATA_DIR={tmp_path}/data\nTITANENV_CHECKPOINT_DIR={tmp_path}/runs\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TITANENV_", "SLURM_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "log"), TITANENV_CONFIG=str(site),
               SLURM_SUBMIT_DIR="/repo", SLURM_CPUS_PER_TASK="8", SLURM_JOB_ID="42")  # fmt: skip
    return env


@pytest.mark.parametrize("spec", [s for s in CHECKED_IN if isinstance(s, PreprocessSpec)], ids=lambda s: s.filename)
def test_preprocess_script_runs_the_same_command_from_the_site_file(spec, tmp_path):
    """Run as a batch script with srun faked: the command line, the defaults, and TITANENV_CONFIG honoured."""
    script = tmp_path / "job.sbatch"
    script.write_text(render(spec))
    env = fake_slurm(tmp_path)
    assert subprocess.run(["bash", str(script)], env=env).returncode == 0
    assert subprocess.run(["bash", str(script), "--input", "a b.jsonl"], env=env).returncode == 0
    merge = "--submit-merge " if spec.parallel else ""
    split, inputs = ("train", TRAIN_SAMPLE) if spec.parallel else ("val", ["c4-guardian-val.jsonl.gz"])
    defaults = " ".join(f"--input /repo/sample_data/{f}" for f in inputs)
    assert (tmp_path / "log").read_text().splitlines() == [
        f"srun --cpu-bind=none /repo/container_run.sh titanenv preprocess {merge}--workers 8 {defaults} "
        f"--output-prefix {tmp_path}/data/sample/{split} "
        "--tokenizer-model /repo/sample_data/torchtitan_test_tokenizer --append-eod",
        f"srun --cpu-bind=none /repo/container_run.sh titanenv preprocess {merge}--workers 8 --input a b.jsonl",
    ]


TRAIN_SAMPLE = [
    "wikitext2_valid_test_docs.jsonl",
    "c4-sample.01.json.gz",
    "c4-sample.02.json.gz",
    "c4-sample.03.json.gz",
]


@pytest.mark.parametrize("rc", [0, int(ExitCode.PREFLIGHT_FAILED), int(ExitCode.STOPPED)])
def test_training_script_requeues_only_on_stopped(rc, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render(JobSpec(machine="local")))
    env = fake_slurm(tmp_path, srun_rc=rc)
    p = subprocess.run(["bash", str(script), "--steps", "3"], env=env, capture_output=True, text=True)
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0].startswith("srun ") and log[0].endswith("/repo/container_run.sh titanenv train --steps 3")
    assert (tmp_path / "runs" / ".titanenv-jobs" / "42").is_dir() == (rc != 0)  # the site file's checkpoint dir
    if rc == ExitCode.STOPPED:
        assert (p.returncode, log[1:]) == (0, ["scontrol requeue 42"]), p.stderr
    else:
        assert (p.returncode, log[1:]) == (rc, []), p.stderr
