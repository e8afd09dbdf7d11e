"""``titanenv workflow``: raw text to an Infini-attention Llama beside its baseline, locally and on Slurm.

The end-to-end tests run the real chain on the bundled sample (preprocess, two CPU trainings at
once, eval, report); the Slurm one submits it to the suite's local Slurm and checks that each job
started only after the jobs it depends on ended. The rest check that bad input stops the workflow
before anything runs, naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import require

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TOKENIZER = SAMPLE / "torchtitan_test_tokenizer"
RAW = [SAMPLE / "wikitext2_valid_test_docs.jsonl", *sorted(SAMPLE.glob("c4-sample.*.json.gz"))]
SMALL = ["--steps", "4", "--seq-len", "256", "--batch-size", "2", "--passkey-lengths", "128,256",
         "--passkey-trials", "1", "--eval-windows", "4"]  # fmt: skip


def _flat(output: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def _cli(args: list[str], env: dict[str, str] | None = None):
    from titanenv.cli import app

    return CliRunner().invoke(app, ["workflow", *map(str, args)], env={"COLUMNS": "250", **(env or {})},
                              catch_exceptions=False)  # fmt: skip


# ------------------------------------------------------------------ settings and bad input


def test_config_file_keys_are_the_flags_and_flags_win(tmp_path):
    from titanenv.workflow import load_config

    toml = tmp_path / "wf.toml"
    toml.write_text('tokenizer = "tok"\noutput-dir = "out"\nraw_data = ["a.jsonl"]\nseq-len = 128\n'
                    'run-both-models = true\n[torchtitan]\n"lr-scheduler.warmup-steps" = 3\n')  # fmt: skip
    cfg = load_config(toml, {"seq_len": 256})
    assert cfg.seq_len == 256 and cfg.run_both_models and cfg.models == ("baseline", "infini")
    assert cfg.tokenizer == tmp_path / "tok" and cfg.raw_data == [tmp_path / "a.jsonl"]  # relative to the file
    assert cfg.torchtitan == {"lr-scheduler.warmup-steps": 3}
    yaml = tmp_path / "wf.yaml"
    yaml.write_text("tokenizer: tok\noutput_dir: out\npreprocessed_data: data/train\ndisable-infini-attn: true\n")
    assert load_config(yaml, {}).models == ("baseline",)


def test_unknown_config_key_is_named_with_the_nearest_one(tmp_path):
    toml = tmp_path / "wf.toml"
    toml.write_text(f'tokenizer = "{TOKENIZER}"\noutput-dir = "{tmp_path / "out"}"\nraw-data = ["{RAW[0]}"]\n'
                    "seq-lenght = 128\nlearning_rate = 1\n")  # fmt: skip
    result = _cli(["--config-file", toml, "--local"])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert "unknown setting 'seq-lenght' (did you mean 'seq-len'?)" in text and "'learning_rate'" in text
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_does_not_exist_stops_everything_with_the_fetch_command(tmp_path):
    result = _cli(["--raw-data", RAW[0], "--tokenizer", tmp_path / "no-such", "--output-dir", tmp_path / "out",
                   "--local"])  # fmt: skip
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert "no tokenizer.json there; titanenv never invents one" in text and "titanenv assets fetch" in text
    assert not (tmp_path / "out").exists()


def test_preprocessed_data_from_another_tokenizer_stops_before_any_job(tmp_path, sample):
    from titanenv.data import preprocess as pp

    prefix = tmp_path / "gpt2data" / "train"
    gpt2 = str(sample / "gpt2_tokenizer.json")
    pp.run(pp.PreprocessConfig(inputs=[RAW[1]], output_prefix=prefix, tokenizer_model=gpt2, append_eod=True))
    result = _cli(["--preprocessed-data", prefix, "--tokenizer", TOKENIZER, "--output-dir", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert "the data was tokenized with" in text and "--raw-data" in text
    assert not (tmp_path / "out").exists()


def test_exactly_one_data_source(tmp_path):
    result = _cli(["--tokenizer", TOKENIZER, "--output-dir", tmp_path / "out", "--local"])
    assert result.exit_code == 2 and "exactly one of raw_data" in _flat(result.output)


def test_dry_run_prints_the_chain_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = _cli(["--raw-data", RAW[0], "--tokenizer", TOKENIZER, "--output-dir", out, "--run-both-models", "--local",
                   "--dry-run", *SMALL])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    stages = [line.split("]")[0].lstrip("[") for line in lines if line.startswith("[")]
    assert stages == ["preprocess:data", "train:baseline", "train:infini", "eval:baseline-loss",
                      "eval:baseline-passkey", "eval:infini-loss", "eval:infini-passkey", "report:report"]  # fmt: skip
    assert "--recipe titanenv_debug_infini" in result.output and "--recipe titanenv_debug " in result.output
    assert not out.exists()


# ------------------------------------------------------------------ end to end, local


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("workflow") / "out"
    argv = [sys.executable, "-m", "titanenv.cli", "workflow", *[a for p in RAW for a in ("--raw-data", str(p))],
            "--tokenizer", str(TOKENIZER), "--output-dir", str(out), "--run-both-models", "--local", *SMALL,
            "--", "--debug.seed", "0"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-3000:]
    return out, p.stdout


def test_local_workflow_trains_both_models_and_writes_the_report(local_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, log = local_run
    for model in ("baseline", "infini"):
        run = out / "runs" / model
        assert (run / "checkpoint" / "step-4").is_dir(), log[-3000:]
        tags = set()
        for folder in (run / "tb").iterdir():
            acc = EventAccumulator(str(folder))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert "loss_metrics/global_avg_loss" in tags
        gates = {t for t in tags if t.startswith("infini/gate/")}
        assert bool(gates) == (model == "infini"), sorted(tags)[:20]
        passkey = json.loads((run / "eval" / "passkey" / "passkey.json").read_text())
        assert passkey["lengths"] == [128, 256] and len(passkey["accuracy"]) == len(passkey["depths"])
        assert (run / "eval" / "passkey" / "passkey.png").stat().st_size > 1000
    report = (out / "report" / "report.md").read_text()
    assert "baseline" in report and "infini" in report and "tensorboard --logdir_spec=" in report
    assert (out / "report" / "report.png").stat().st_size > 10_000
    for panel in ("loss", "gates", "passkey", "loss_by_position"):
        assert (out / "report" / f"{panel}.png").is_file(), panel
    assert "not available: no run has" not in report
    assert "compare: tensorboard --logdir_spec=baseline:" in log


def test_a_rerun_reuses_the_preprocessed_data(local_run):
    out, _ = local_run
    before = (out / "data" / "train.bin").stat().st_mtime_ns
    argv = [sys.executable, "-m", "titanenv.cli", "workflow", *[a for p in RAW for a in ("--raw-data", str(p))],
            "--tokenizer", str(TOKENIZER), "--output-dir", str(out), "--local", "--only", "preprocess"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (out / "data" / "train.bin").stat().st_mtime_ns == before
    assert "already complete, skipping" in (out / "logs" / "preprocess-data.log").read_text()


# ------------------------------------------------------------------ end to end, on Slurm


def _time(record, key: str) -> float:
    return datetime.strptime(record.fields[key], "%Y-%m-%dT%H:%M:%S").timestamp()


def test_the_chain_on_slurm_honours_the_dependencies(slurm_cluster, root, tmp_path):
    require(slurm_cluster is not None, "needs the local Slurm")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TITANENV_", "_TITANENV", "SLURM_"))}
    env.update(slurm_cluster.env, TITANENV_MACHINE="local", TITANENV_CONTAINER_RUNTIME="none",
               TITANENV_SCRATCH_DIR=str(tmp_path / "scratch"), TITANENV_VENV=sys.prefix, COLUMNS="200")  # fmt: skip
    argv = [sys.executable, "-m", "titanenv.cli", "workflow", "--raw-data", str(RAW[0]), "--tokenizer", str(TOKENIZER),
            "--output-dir", str(out), "--run-both-models", *SMALL, "--time", "00:20:00",
            "--", "--debug.seed", "0"]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    found = re.search(r"jobs: data (\d+), baseline (\d+), infini (\d+), report (\d+)", p.stdout)
    assert found, p.stdout
    jobs = dict(zip(("data", "baseline", "infini", "report"), found.groups(), strict=True))
    records = {}
    for name, job in jobs.items():  # in chain order: a failure is reported at once, not after a long wait
        records[name] = slurm_cluster.wait(job, timeout=600)
        log = "\n".join(f.read_text()[-3000:] for f in sorted((out / "logs").glob("*.out")))
        assert records[name].ok, (name, records[name], log, slurm_cluster.logs_tail())
    assert _time(records["baseline"], "StartTime") >= _time(records["data"], "EndTime")
    assert _time(records["infini"], "StartTime") >= _time(records["data"], "EndTime")
    assert _time(records["report"], "StartTime") >= max(_time(records[m], "EndTime") for m in ("baseline", "infini"))
    assert (out / "report" / "report.md").is_file() and (out / "report" / "passkey.png").is_file()
