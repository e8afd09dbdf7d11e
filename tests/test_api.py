"""titanenv.api end to end on the sample data: examples/api_example.py trains, evaluates, generates.

Real TorchTitan training (CPU), a real lm-eval run on the bundled WikiText-2 task through an
on-the-fly export, and generation; then the API's results are checked against the files the
stages wrote and against the CLI.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from titanenv import api


@pytest.fixture(scope="module")
def example(root: Path, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("api")
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "api_example.py"), "--out", str(out), "--steps", "2",
         "--seq-len", "32", "--limit", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_example_trains_evaluates_and_generates(example):
    out, stdout = example
    run = out / "run"
    assert f"trained to step 2: {run / 'checkpoint' / 'step-2'}" in stdout
    assert (run / "export" / "step-2" / "config.json").is_file()  # exported on the fly for lm-eval
    with open(run / "eval" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"titanenv_wikitext2"} and {r["step"] for r in rows} == {"2"}
    assert "titanenv_wikitext2 0-shot word_perplexity:" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("The history of")


def test_train_resumes_and_generate_matches_the_cli(example, root):
    out, stdout = example
    run = api.train(out / "data" / "train", root / "sample_data" / "gpt2_tokenizer.json", out / "run", steps=2,
                    seq_len=32, batch_size=4)  # fmt: skip
    assert (run.exit_code, run.state, run.step) == (0, "completed", 2)  # nothing left to train: resumed at the end
    text = api.generate(out / "run", ["The history of"], max_new_tokens=16, greedy=True)[0]
    assert stdout.rstrip().splitlines()[-1] == f"The history of{text}"
    cli = subprocess.run(
        [sys.executable, "-m", "titanenv", "generate", str(out / "run"), "--prompt", "The history of",
         "--max-new-tokens", "16", "--greedy"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert text in cli.stdout


def test_train_refuses_missing_data_and_unknown_flags(tmp_path, root):
    tokenizer = root / "sample_data" / "gpt2_tokenizer.json"
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin: no such file.*titanenv preprocess"):
        api.train(tmp_path / "nothing", tokenizer, tmp_path / "run", steps=1)
    with pytest.raises(TypeError, match="no_such_flag"):
        api.train(tmp_path / "nothing", tokenizer, tmp_path / "run", no_such_flag=1)
