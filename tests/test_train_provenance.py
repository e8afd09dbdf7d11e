"""Provenance: what a run records about its launch, and that no credential ends up in it."""

from __future__ import annotations

import json
import re

from titanenv import config as configlib
from titanenv.train import provenance
from titanenv.train.launch import LaunchPlan
from titanenv.train.rundir import RunDir, attempt_id

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123"


def test_secrets_are_never_recorded():
    env = {"HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN, "WANDB_API_KEY": "k", "TITANENV_SECRET_KEY": "s",
           "SLURM_JOB_ID": "7", "NCCL_IB_TIMEOUT": "50", "HOME": "/root", "AWS_SECRET_ACCESS_KEY": "a"}  # fmt: skip
    assert provenance.safe_env(env) == {"NCCL_IB_TIMEOUT": "50", "SLURM_JOB_ID": "7"}
    script = f"#SBATCH --nodes=2\nexport HF_TOKEN={TOKEN}\nWANDB_API_KEY=abc titanenv train --x {TOKEN}\n"
    assert provenance.redact(script) == "#SBATCH --nodes=2\nexport HF_TOKEN=<redacted>\nWANDB_API_KEY=<redacted>\n"


def test_attempt_ids():
    assert attempt_id({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}) == "job-42.2"
    assert attempt_id({"SLURM_JOB_ID": "42"}) == "job-42.0"
    assert re.fullmatch(r"local-\d{8}-\d{6}-\d+", attempt_id({}))


def test_recorder_writes_the_launch(tmp_path, root, monkeypatch):
    for name in ("TITANENV_MACHINE", "TITANENV_CONTAINER_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    run = RunDir(tmp_path / "run", "job-9.1")
    image = tmp_path / "titanenv.sif"
    image.write_bytes(b"SIF" * 1000)
    (tmp_path / "titanenv.json").write_text(json.dumps({"lock_sha256": "abc"}))
    script = tmp_path / "batch.sh"
    script.write_text(f"export HF_TOKEN={TOKEN}\nsrun titanenv train\n")
    env = {
        "APPTAINER_CONTAINER": str(image),
        "SLURM_JOB_ID": "9",
        "TITANENV_BATCH_SCRIPT": str(script),
        "HF_TOKEN": TOKEN,
    }
    recorder = provenance.Recorder(run, env)
    plan = LaunchPlan(
        nnodes=2, nproc_per_node=4, rdzv_endpoint="n1i:30000", rdzv_id="9", device="cuda", nodes=("n1", "n2")
    )
    folder = recorder.start(
        command=["torchrun", "-m", "torchtitan.train"],
        plan=plan,
        data=[tmp_path / "none"],
        site=configlib.load(root / "configuration.sh"),
        worker_env={**env, "NCCL_IB_TIMEOUT": "50"},
    )
    (run.root / "trainer_config.json").write_text('{"training": {"steps": 3}}')
    recorder.finish(exit_code=75, status={"state": "stopped", "step": 2})
    record = json.loads((folder / "provenance.json").read_text())
    assert record["attempt"] == "job-9.1" and record["launch"]["nodes"] == ["n1", "n2"] and record["exit_code"] == 75
    assert record["image"]["build"] == {"lock_sha256": "abc"} and len(record["image"]["sha256"]) == 64
    assert record["environment"]["NCCL_IB_TIMEOUT"] == "50" and record["titanenv"]["version"]
    assert record["data"] == [{"prefix": str(tmp_path / "none"), "manifest": None}]
    assert json.loads((folder / "config.json").read_text()) == {"training": {"steps": 3}}
    assert (folder / "sbatch.sh").read_text() == "export HF_TOKEN=<redacted>\nsrun titanenv train\n"
    assert "torch==" in (folder / "pip-freeze.txt").read_text()
    for path in folder.rglob("*"):
        assert TOKEN not in path.read_text(), path
