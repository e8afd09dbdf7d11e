"""The jsc/ sbatch files, submitted unchanged to a real local Slurm with the `local` profile."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from titanenv import offline
from titanenv.data import indexed
from titanenv.data import preprocess as pp

TRAIN_INPUTS = [
    "wikitext2_valid_test_docs.jsonl",
    "c4-sample.01.json.gz",
    "c4-sample.02.json.gz",
    "c4-sample.03.json.gz",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory, slurm_cluster, root):
    """A scratch root and the environment a user's shell would submit from."""
    scratch = tmp_path_factory.mktemp("scratch")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TITANENV_", "_TITANENV", "SLURM_"))}
    env.update(
        TITANENV_MACHINE="local",
        TITANENV_CONTAINER_RUNTIME="none",
        TITANENV_SCRATCH_DIR=str(scratch),
        TITANENV_VENV=sys.prefix,
        HF_HOME=str(scratch / "hf"),
    )
    return scratch, env


def submit(cluster, root, site, script, *args, script_args=()):
    scratch, env = site
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    job = cluster.sbatch(
        root / "jsc" / script, f"--output={logs}/%x-%A_%a.out", *args, env=env, cwd=root, script_args=script_args
    )
    return job, logs


def job_log(logs: Path, job: int) -> str:
    return "\n".join(p.read_text() for p in sorted(logs.glob(f"*-{job}_*.out")))


def read_texts(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def val_split(slurm_cluster, root, site):
    job, logs = submit(slurm_cluster, root, site, "preprocess_data_jwc.sbatch")
    rec = slurm_cluster.wait(job, timeout=180)
    assert rec.ok, job_log(logs, job) + slurm_cluster.logs_tail()
    return site[0] / "data" / "sample" / "val"


@pytest.fixture(scope="module")
def train_split(slurm_cluster, root, site):
    job, logs = submit(slurm_cluster, root, site, "preprocess_data_parallel_jwc.sbatch")
    records = slurm_cluster.wait_all(job, timeout=300)
    out = job_log(logs, job)
    assert len(records) == 4 and all(r.ok for r in records), out + slurm_cluster.logs_tail()
    merge_job = int(re.search(r"submitted merge job (\d+)", out).group(1))
    rec = slurm_cluster.wait(merge_job, timeout=180)
    assert rec.ok, slurm_cluster.logs_tail()
    return site[0] / "data" / "sample" / "train"


def test_validation_job_writes_the_tokenizers_ids(val_split, sample):
    tok = Tokenizer.from_file(str(sample / "torchtitan_test_tokenizer" / "tokenizer.json"))
    eod = tok.token_to_id("<|end_of_text|>")
    texts = read_texts(sample / "c4-guardian-val.jsonl.gz")
    ds = indexed.IndexedDataset(val_split)
    assert len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text, add_special_tokens=False).ids + [eod]
    manifest = json.loads(Path(f"{val_split}.manifest.json").read_text())
    assert manifest["documents_in"] == manifest["documents_written"] == len(texts)


def test_array_job_equals_a_single_process_run(train_split, sample, tmp_path):
    single = tmp_path / "single"
    pp.run(
        pp.PreprocessConfig(
            inputs=[sample / f for f in TRAIN_INPUTS],
            output_prefix=single,
            tokenizer_model=str(sample / "torchtitan_test_tokenizer"),
            append_eod=True,
        )
    )
    for ext in ("bin", "idx"):
        assert Path(f"{train_split}.{ext}").read_bytes() == Path(f"{single}.{ext}").read_bytes()
    shards = sorted(train_split.parent.glob("train-0000?-of-00004.idx"))
    assert len(shards) == 4


ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)")


def losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in STEP_LOSS.findall(ANSI.sub("", log))}


def train_job(cluster, root, site, data, sample, run_dir, steps):
    args = [
        "--data",
        str(data),
        "--tokenizer",
        str(sample / "torchtitan_test_tokenizer"),
        "--output-dir",
        str(run_dir),
        "--steps",
        str(steps),
        "--checkpoint-interval",
        "6",
        "--seq-len",
        "256",
    ]
    job, logs = submit(cluster, root, site, "run_training_jwb.sbatch", script_args=args)
    rec = cluster.wait(job, timeout=420)
    log = job_log(logs, job)
    assert rec.ok, log[-5000:] + cluster.logs_tail()
    return log


@pytest.fixture(scope="module")
def trained(slurm_cluster, root, site, train_split, sample):
    run_dir = site[0] / "runs" / "sample"
    return run_dir, train_job(slurm_cluster, root, site, train_split, sample, run_dir, 12)


def test_training_job_runs_on_two_nodes_and_learns(trained):
    run_dir, log = trained
    assert "--nnodes 2" in log and "--rdzv-backend c10d" in log
    steps = losses(log)
    assert sorted(steps) == list(range(1, 13)), log[-3000:]
    assert steps[12] < steps[1] - 0.5
    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))
    assert (run_dir / "checkpoint" / "step-12" / ".metadata").is_file()


def test_resubmitted_training_resumes_from_the_checkpoint(trained, slurm_cluster, root, site, train_split, sample):
    run_dir, _ = trained
    log = train_job(slurm_cluster, root, site, train_split, sample, run_dir, 18)
    assert "Training starts at step 13" in ANSI.sub("", log)
    assert sorted(losses(log)) == list(range(13, 19))
    assert (run_dir / "checkpoint" / "step-18" / ".metadata").is_file()


# Run by every Python process of the job, before its own code: its environment and command line, so
# the test sees what the sbatch file and container_run.sh set, not what `titanenv eval` sets itself.
ENV_DUMP = """\
import json, os
_dir = os.environ.get("JOB_ENV_DUMP")
if _dir:
    with open(os.path.join(_dir, f"{os.getpid()}.json"), "w") as f:
        argv = open("/proc/self/cmdline", "rb").read().decode().rstrip("\\0").split("\\0")
        json.dump({"argv": argv, "env": dict(os.environ)}, f)
"""


def test_eval_job_scores_a_trained_run_offline_on_cpu(slurm_cluster, root, site, tiny_run, tmp_path):
    trained = tiny_run("gpt2")
    run = tmp_path / "run"  # the job writes run/export/step-N and run/eval: a copy, the fixture's run stays as it is
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export", "eval"))
    hook, dumps = tmp_path / "hook", tmp_path / "env"
    hook.mkdir()
    dumps.mkdir()
    (hook / "sitecustomize.py").write_text(ENV_DUMP)
    # Submitted from a login-node shell that is online (TITANENV_OFFLINE=0, a proxy, no offline flags):
    # the job must go offline by itself.
    to_set, to_unset = offline.offline_environment()
    scratch, env = site
    env = {k: v for k, v in env.items() if k not in to_set and k not in to_unset}
    env.update(
        TITANENV_OFFLINE="0",
        https_proxy="http://127.0.0.1:9",
        PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [env.get("PYTHONPATH")])]),
        JOB_ENV_DUMP=str(dumps),
    )
    args = ["--model", str(run), "--tasks", "titanenv_wikitext2", "--limit", "2", "--device", "cpu"]
    job, logs = submit(slurm_cluster, root, (scratch, env), "run_eval_jwb.sbatch", script_args=args)
    rec = slurm_cluster.wait(job, timeout=420)
    log = job_log(logs, job)
    assert rec.ok, log[-5000:] + slurm_cluster.logs_tail()

    with (run / "eval" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["step"], r["task"], r["shots"]) for r in rows} == {
        ("run", str(trained.step), "titanenv_wikitext2", "0")
    }
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= {r["metric"] for r in rows}
    assert all(float(r["value"]) > 0 for r in rows)
    md = (run / "eval" / "results.md").read_text()
    assert md.startswith("| model | step | task | shots | metric | value | stderr |")
    assert "titanenv_wikitext2" in md and "word_perplexity" in md
    assert (run / "export" / f"step-{trained.step}" / "config.json").is_file()
    assert "Offline mode:" in log  # `titanenv eval` applied offline.env itself too

    seen = [json.loads(p.read_text()) for p in dumps.glob("*.json")]
    evals = [d for d in seen if "eval" in d["argv"]]
    assert len(evals) == 1, [d["argv"] for d in seen]
    argv, job_env = evals[0]["argv"], evals[0]["env"]
    assert argv[argv.index("eval") + 1 :][:2] == ["--device", "cuda"] and argv[-2:] == ["--device", "cpu"]
    assert job_env["TITANENV_OFFLINE"] == "1" and job_env["SLURM_JOB_ID"] == str(job)
    assert {k: job_env.get(k) for k in to_set} == to_set  # HF_HUB_OFFLINE=1 and the rest of offline.env
    assert not [k for k in to_unset if k in job_env]  # the proxy is cleared
