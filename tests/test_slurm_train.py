"""Training at scale on a real local Slurm with two emulated nodes: FSDP across nodes, time-limit stop,
requeue and resume, preflight failure, provenance, and ``sbatch --test-only``.

Every job is ``jsc/run_training_jwb.sbatch`` unchanged, with ``TITANENV_MACHINE=local`` (gloo on CPU,
one process per node, rendezvous on loopback since both "nodes" share this host).

Timing facts (tests/slurm_harness.py): slurmctld checks time limits every 30 s, so with
``--time=1 --signal=B:USR1@45`` the signal comes 15-45 s after the start and the hard kill at
60-90 s. The requeue test therefore plans enough steps for about 40 s of training on *this*
machine (measured by the first job), so the first run is always interrupted mid-training.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from titanenv.data import preprocess as pp
from titanenv.slurm.render import job_files
from titanenv.train import checkpoints

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - root - INFO - step:\s*(\d+)\s+loss:\s*([0-9.]+)")
SECRET = "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123"
SHAPE = ["--seq-len", "64", "--batch-size", "2", "--checkpoint-interval", "25"]
SEED = ["--", "--debug.seed", "0"]


@pytest.fixture(scope="module")
def site(tmp_path_factory, slurm_cluster):
    """A scratch root and the environment a user's shell submits from (with a token that must not leak)."""
    scratch = tmp_path_factory.mktemp("scratch")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TITANENV_", "_TITANENV", "SLURM_"))}
    env.update(
        TITANENV_MACHINE="local",
        TITANENV_CONTAINER_RUNTIME="none",
        TITANENV_SCRATCH_DIR=str(scratch),
        TITANENV_VENV=sys.prefix,
        HF_HOME=str(scratch / "hf"),
        HF_TOKEN=SECRET,
    )
    return scratch, env


@pytest.fixture(scope="module")
def data(sample, site):
    prefix = site[0] / "data" / "train"
    inputs = [sample / "wikitext2_valid_test_docs.jsonl", *sorted(sample.glob("c4-sample.*.json.gz"))]
    pp.run(
        pp.PreprocessConfig(
            inputs=inputs,
            output_prefix=prefix,
            tokenizer_model=str(sample / "torchtitan_test_tokenizer"),
            append_eod=True,
        )
    )
    return prefix


def submit(cluster, root, site, *sbatch_args, script_args=(), env=None):
    scratch, base_env = site
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    job = cluster.sbatch(root / "jsc" / "run_training_jwb.sbatch", f"--output={logs}/%x-%j.out", *sbatch_args,
                         env={**base_env, **(env or {})}, cwd=root, script_args=script_args)  # fmt: skip
    return job, logs / f"titanenv-train-{job}.out"


def train_args(data, sample, run_dir, steps, *extra):
    return ["--data", str(data), "--tokenizer", str(sample / "torchtitan_test_tokenizer"), "--output-dir", str(run_dir),
            "--steps", str(steps), *SHAPE, *extra, *SEED]  # fmt: skip


def losses(text: str) -> dict[int, float]:
    return {int(s): float(v) for _, s, v in STEP.findall(ANSI.sub("", text))}


def step_times(text: str) -> dict[int, float]:
    stamp = "%Y-%m-%d %H:%M:%S,%f"
    return {int(s): datetime.strptime(t, stamp).timestamp() for t, s, _ in STEP.findall(ANSI.sub("", text))}


TB_LOSS = "loss_metrics/global_avg_loss"


def tb_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for folder in sorted((run_dir / "tb").iterdir()):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if TB_LOSS in acc.Tags()["scalars"]:  # an attempt stopped during start-up logged no step
            out.update({e.step: e.value for e in acc.Scalars(TB_LOSS)})
    return out


def rank_logs(run_dir: Path, attempt: str) -> dict[str, str]:
    """Each node's rank-0 stdout (one process per node: global ranks 0 and 1)."""
    return {
        node.name: next(node.glob("*/attempt_0/0/stdout.log")).read_text()
        for node in sorted((run_dir / "logs" / attempt).iterdir())
    }


# ------------------------------------------------------------------------------ 2 nodes, FSDP


@pytest.fixture(scope="module")
def reference(slurm_cluster, root, site, data, sample):
    """A 2-node run of 24 steps: the basic checks, and the speed of this machine."""
    run_dir = site[0] / "runs" / "two-nodes"
    job, log_file = submit(slurm_cluster, root, site, script_args=train_args(data, sample, run_dir, 24))
    rec = slurm_cluster.wait(job, timeout=300)
    log = log_file.read_text()
    assert rec.ok, log[-5000:] + slurm_cluster.logs_tail()
    return job, run_dir, log


def test_two_nodes_train_fsdp_with_the_same_loss_on_both_ranks(reference, site):
    job, run_dir, log = reference
    attempt = f"job-{job}.0"
    per_node = rank_logs(run_dir, attempt)
    assert sorted(per_node) == ["node1", "node2"]
    assert "dp_shard=2" in per_node["node1"]
    node1, node2 = losses(per_node["node1"]), losses(per_node["node2"])
    assert sorted(node1) == list(range(1, 25)) and node1 == node2  # global rank 0 on node1, rank 1 on node2
    assert node1[24] < node1[1] - 1.0
    final = run_dir / "checkpoint" / "step-24"
    assert sorted(p.name for p in final.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per node
    assert checkpoints.read_marker(final)["world_size"] == 2 and checkpoints.complete_steps(run_dir / "checkpoint") == [
        24
    ]
    # Preflight ran on both nodes before torchrun, and the all-reduce inside training.
    assert "preflight ok on node1: rendezvous: all 2 nodes reported to 127.0.0.1:" in log
    assert "preflight ok on node2: rendezvous: reached 127.0.0.1:" in log
    assert "preflight ok on node1: all-reduce over 2 ranks (gloo)" in ANSI.sub("", log)
    # The stop file the workers poll is the one the batch script creates on USR1.
    stop = job_files(site[0] / "runs", str(job))["TITANENV_STOP_FILE"]
    assert f"--control.stop-file {stop} " in log


def test_provenance_records_the_launch_and_no_secret(reference, root):
    job, run_dir, _ = reference
    folder = run_dir / "provenance" / f"job-{job}.0"
    record = json.loads((folder / "provenance.json").read_text())
    assert record["launch"]["nodes"] == ["node1", "node2"] and record["launch"]["nnodes"] == 2
    assert record["exit_code"] == 0 and record["status"]["state"] == "completed"
    assert record["start"] < record["end"] and record["titanenv"]["sha"]
    assert record["data"][0]["manifest_sha256"] and record["data"][0]["idx_sha256"]
    assert record["command"][0].endswith("torchrun") and record["job"]["SLURM_JOB_ID"] == str(job)
    assert (folder / "sbatch.sh").read_text() == (root / "jsc" / "run_training_jwb.sbatch").read_text()
    assert re.search(r"^torch==2\.13\.0", (folder / "pip-freeze.txt").read_text(), re.MULTILINE)
    assert json.loads((folder / "config.json").read_text())["training"]["steps"] == 24
    assert json.loads((folder / "site.json").read_text())["values"]["TITANENV_MACHINE"] == "local"
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


# ------------------------------------------------------------------------------ time limit, requeue, resume


def timing(record, log: str) -> tuple[float, float]:
    """(seconds from the job's start to its first step, seconds per step) of a finished job."""
    times = step_times(log)
    first, last = min(times), max(times)
    start = datetime.strptime(record.fields["StartTime"], "%Y-%m-%dT%H:%M:%S").timestamp()
    return times[first] - start, (times[last] - times[first + 3]) / (last - first - 3)


def extend_after_first_requeue(cluster, job: int, run_dir: Path, timeout: float) -> None:
    """Once the job requeued itself after a checkpoint, give the next run time to finish (bounds the test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (rec,) = cluster.jobs(job)
        if rec.finished:
            return
        if int(rec.fields.get("Restarts", 0)) >= 1 and checkpoints.complete_steps(run_dir / "checkpoint"):
            cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
            return
        time.sleep(0.5)


def test_time_limit_stops_checkpoints_requeues_and_resumes_exactly(reference, slurm_cluster, root, site, data, sample):
    ref_job, _, ref_log = reference
    startup, per_step = timing(slurm_cluster.wait(ref_job), ref_log)
    # The USR1 must come after training started (--signal @N: 60-N to 90-N s after the start, slurmctld's
    # 30 s grid) and before it ends: N leaves 15 s of training (an attempt's start-up varies by several
    # seconds from the reference's on a loaded machine), and the steps last 5 s past the latest signal.
    lead = int(max(5, min(45, 60 - startup - 15)))
    # Twice that: the reference job's timing is only an estimate, and on an idle machine the run
    # must still be training when the latest possible signal comes.
    steps = max(40, 2 * math.ceil((90 - lead - startup + 5) / per_step))
    straight_dir = site[0] / "runs" / "straight"
    job, log_file = submit(slurm_cluster, root, site, script_args=train_args(data, sample, straight_dir, steps))
    assert slurm_cluster.wait(job, timeout=400).ok, log_file.read_text()[-4000:]
    straight = losses(log_file.read_text())

    run_dir = site[0] / "runs" / "requeued"
    t0 = time.monotonic()
    job, log_file = submit(
        slurm_cluster,
        root,
        site,
        "--time=1",
        f"--signal=B:USR1@{lead}",
        script_args=train_args(data, sample, run_dir, steps),
        env={"TITANENV_MAX_REQUEUES": "3"},
    )
    extend_after_first_requeue(slurm_cluster, job, run_dir, timeout=400)
    rec = slurm_cluster.wait(job, timeout=400)
    log = ANSI.sub("", log_file.read_text())
    assert rec.ok, log[-6000:] + slurm_cluster.logs_tail()
    restarts = int(rec.fields["Restarts"])
    assert restarts >= 1, log[-4000:]
    # Each interrupted run: Slurm's USR1, a checkpoint at the next step boundary, exit 75, requeue.
    assert log.count("titanenv: USR1: time limit near") == restarts
    assert log.count("titanenv: requeueing job") == restarts
    stopped = sorted({int(k) for k in re.findall(r"stop requested: checkpointing step (\d+) and stopping", log)})
    resumed = sorted({int(k) for k in re.findall(r"resume: step-(\d+) is complete", log)})
    # (A run whose USR1 came during start-up stops before its first step, saves nothing, and is requeued too.)
    assert stopped and resumed == stopped, log[-4000:]
    assert f"Training starts at step {stopped[-1] + 1}" in log
    # The loss curve is the uninterrupted run's, bit for bit (printed values and TensorBoard's float32s).
    got = losses(log)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == straight
    assert tb_losses(run_dir) == tb_losses(straight_dir)
    assert checkpoints.complete_steps(run_dir / "checkpoint")[0] == steps
    last = json.loads((run_dir / "provenance" / f"job-{job}.{restarts}" / "status.json").read_text())
    assert last["state"] == "completed" and last["step"] == steps
    print(f"\nrequeue: {steps} steps at {per_step:.2f} s/step, start-up {startup:.0f} s, --signal=B:USR1@{lead}, "
          f"{restarts} requeue(s), stopped at steps {stopped}, {time.monotonic() - t0:.0f} s")  # fmt: skip


# ------------------------------------------------------------------------------ preflight, dry run


def test_preflight_fails_fast_naming_node_and_check_when_the_rendezvous_port_is_taken(
    slurm_cluster, root, site, data, sample
):
    with socket.socket() as squatter:  # another program holds the port on the first node and never answers
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        run_dir = site[0] / "runs" / "blocked"
        args = train_args(data, sample, run_dir, 4, "--rdzv-port", str(port), "--preflight-timeout", "5")
        job, log_file = submit(slurm_cluster, root, site, script_args=args)
        rec = slurm_cluster.wait(job, timeout=120)
    log = log_file.read_text()
    assert rec.state == "FAILED" and rec.exit_code == 3, log
    assert f"preflight FAILED on node1: rendezvous: port {port} on 127.0.0.1 is already in use on node1" in log
    assert f"preflight FAILED on node2: rendezvous: reached 127.0.0.1:{port} but got no preflight answer" in log
    assert "-- fix: another job or service holds it; pass a free --rdzv-port" in log
    assert "torchrun" not in log.split("preflight FAILED", 1)[1]  # training never started
    assert not (run_dir / "checkpoint").exists()


def test_submit_dry_run_asks_sbatch_test_only(slurm_cluster, root, site, data, sample):
    import subprocess

    scratch, env = site
    cmd = [sys.executable, "-m", "titanenv.cli", "train", "--submit", "--dry-run", "--nodes", "2", "--time", "10",
           *train_args(data, sample, scratch / "runs" / "dry", 8)]  # fmt: skip
    proc = subprocess.run(cmd, env={**slurm_cluster.env, **env}, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2" in proc.stdout and "#SBATCH --time=10" in proc.stdout
    assert re.search(r"sbatch --test-only \(exit 0\): .*to start at .* on nodes node\[1-2\]", proc.stderr), proc.stderr
    assert not (scratch / "runs" / "dry").exists()  # a dry run writes nothing


# ------------------------------------------------------------------------------ LoRA fine-tune, same script


def test_finetune_runs_through_the_training_script(reference, slurm_cluster, root, site, data):
    """`sbatch jsc/run_training_jwb.sbatch finetune FLAGS`: the same script runs `titanenv finetune`."""
    from titanenv import export

    _, pretrained, _ = reference
    base = export.cached_export(pretrained)
    run_dir = site[0] / "runs" / "lora"
    args = ["finetune", "--from", str(base), "--data", str(data), "--output-dir", str(run_dir), "--steps", "3",
            *SHAPE, *SEED]  # fmt: skip
    job, log_file = submit(slurm_cluster, root, site, "--nodes=1", script_args=args)
    rec = slurm_cluster.wait(job, timeout=300)
    log = log_file.read_text()
    assert rec.ok, log[-5000:] + slurm_cluster.logs_tail()
    assert "titanenv finetune" in log or "fine-tune: base" in log, log[-3000:]
    assert "preflight ok" in log and "experiment.model" in log  # the base is proven to load offline on the node
    worker = next((run_dir / "logs").glob("*/*/*/attempt_0/0/stdout.log")).read_text()
    assert "LoRA r=8 alpha=16 on wqkv,wo,w1,w2,w3" in worker and "60 tensors in the optimizer" in worker
    assert sorted(losses(worker)) == [1, 2, 3]
    assert SECRET not in log + worker
