"""Offline assets end to end, with real parts: repositories built here, served by olah on loopback,
fetched online, locked, packed, unpacked into another HF_HOME and loaded with the network cut.

Network cut: ``unshare -n`` (root; required under CI=true). A planted HF_TOKEN must appear in no
output, lockfile, summary or archive.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

from conftest import require
from hub_fixture import DATASET, METRIC, MODEL, NLTK_PACKAGE, SCRIPTED, build_mirrors, nltk_index, olah_hub
from titanenv import offline

TOKEN = "hf_titanenvPlantedToken0123456789abcdefXYZ"
# The CLI as the lead registers it: `titanenv assets ...` and `titanenv doctor`.
HARNESS = """
import logging, typer
from titanenv.assets import cli
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
root = typer.Typer(pretty_exceptions_enable=False)
root.add_typer(cli.app, name="assets")
root.command("doctor")(cli.doctor)
root()
"""
OUTPUTS: list[str] = []
UNSHARE = (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
)

TASKS = f"""\
task: tiny_c4_overlap
dataset_path: {DATASET}
output_type: generate_until
test_split: test
doc_to_text: "{{{{text[:200]}}}}"
doc_to_target: "{{{{text[200:260]}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 4, do_sample: false}}
metric_list:
  - metric: {METRIC}
    aggregation: mean
    higher_is_better: true
metadata: {{version: 1.0}}
"""
GROUP = "group: tiny_suite\ntask: [tiny_c4_overlap]\nmetadata: {version: 1.0}\n"
ASSETS = f"""\
metrics = ["{METRIC}"]
nltk = ["{NLTK_PACKAGE}"]

[experiment]
tokenizer = "{MODEL}"
model = "{MODEL}"
eval_tasks = ["tiny_suite"]

[[datasets]]
repo = "{DATASET}"
split = "train"

[[files]]
repo = "{DATASET}"
repo_type = "dataset"
filename = "README.md"

[lm_eval]
include_path = ["tasks"]
"""

OFFLINE_JOB = """
import json, sys
from titanenv.offline import guard_sockets
attempts = guard_sockets()  # records any connection a library tries, on top of the cut network
import datasets, evaluate, lm_eval, nltk, torch
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer
from titanenv.data import tokenizer as titan_tokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
logits = model(**tok("Offline mode works", return_tensors="pt")).logits
train = datasets.load_dataset(sys.argv[2], split="train")
metric = evaluate.load(sys.argv[3]).compute(predictions=["a b c"], references=["a b d"])
words = nltk.data.find("corpora/" + sys.argv[4])
res = lm_eval.simple_evaluate(model="hf", model_args="pretrained=" + sys.argv[1], tasks=["tiny_suite"],
                              task_manager=TaskManager(include_path=sys.argv[5], include_defaults=False),
                              limit=2, device="cpu", batch_size=1)
print("RESULT " + json.dumps({
    "vocab": len(tok), "logits": list(logits.shape), "titan_vocab": titan_tokenizer.load(sys.argv[1]).vocab_size,
    "rows": len(train), "metric": metric, "nltk": str(words), "attempts": attempts,
    "lm_eval": {k: v for k, v in res["results"]["tiny_c4_overlap"].items() if k.startswith("word_overlap")},
}))
"""


def titanenv(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-c", HARNESS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    OUTPUTS.extend([p.stdout, p.stderr])
    return p


def online_env(home: Path, hub: str, nltk_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in offline.OFFLINE_FLAGS}
    nltk_data = os.pathsep.join([str(home / "nltk_data"), nltk_url.removeprefix("file://").rsplit("/", 1)[0]])
    env.update(
        HF_HOME=str(home),
        HF_ENDPOINT=hub,
        HF_TOKEN=TOKEN,
        NLTK_DATA=nltk_data,
        NLTK_DOWNLOAD_URL=nltk_url,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample):
    base = tmp_path_factory.mktemp("assets")
    commits = build_mirrors(base / "mirrors", sample)
    (base / "tasks").mkdir()
    (base / "tasks" / "tiny_c4.yaml").write_text(TASKS)
    (base / "tasks" / "tiny_suite.yaml").write_text(GROUP)
    (base / "assets.toml").write_text(ASSETS)
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(olah_hub(base / "mirrors", base))
        nltk_url = nltk_index(base / "nltk-server", sample)
        env = online_env(base / "hf", hub, nltk_url)
        fetched = titanenv(["assets", "fetch", "assets.toml"], env, base)
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        yield SimpleNamespace(base=base, home=base / "hf", env=env, commits=commits, fetched=fetched)


def test_fetch_locks_commits_and_files(world):
    lock = json.loads((world.base / "assets.lock.json").read_text())
    by_key = {a["key"]: a for a in lock["assets"]}
    assert set(by_key) == {
        f"tokenizer:{MODEL}",
        f"model:{MODEL}",
        f"dataset:{DATASET}?split=train",
        f"dataset:{DATASET}",
        f"metric:{METRIC}",
        f"nltk:{NLTK_PACKAGE}",
        f"file:dataset:{DATASET}/README.md",
    }
    assert by_key[f"model:{MODEL}"]["commit"] == world.commits[MODEL]
    assert by_key[f"dataset:{DATASET}"]["commit"] == world.commits[DATASET]
    assert by_key[f"metric:{METRIC}"]["commit"] == world.commits[f"evaluate-metric/{METRIC}"]
    model_files = {Path(f["path"]).name for f in by_key[f"model:{MODEL}"]["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "main"} <= model_files
    assert not {"model.safetensors"} & {Path(f["path"]).name for f in by_key[f"tokenizer:{MODEL}"]["files"]}
    arrow = [f["path"] for f in by_key[f"dataset:{DATASET}"]["files"] if f["path"].endswith(".arrow")]
    assert len(arrow) == 2 and all(p.startswith("datasets/") for p in arrow)  # the processed cache, by name
    summary = json.loads((world.base / "assets.summary.json").read_text())
    assert summary["totals"]["fetched"] == 7 and summary["totals"]["failed"] == 0
    assert "tiny_suite" in " ".join(o for a in summary["assets"] for o in a["origins"])


def test_rerun_resumes_from_the_lock(world):
    p = titanenv(["assets", "fetch", "assets.toml"], world.env, world.base)
    assert p.returncode == 0, p.stderr
    summary = json.loads((world.base / "assets.summary.json").read_text())
    assert {a["status"] for a in summary["assets"]} == {"locked"}


def test_failures_and_unsupported_are_reported(world, tmp_path):
    p = titanenv(
        [
            "assets",
            "fetch",
            "--add",
            f"model:{MODEL}-missing",
            "--add",
            f"dataset:{SCRIPTED}",
            "--lock",
            str(tmp_path / "x.lock.json"),
        ],
        world.env,
        world.base,
    )
    assert p.returncode == 1
    rows = {a["key"]: a for a in json.loads((tmp_path / "x.summary.json").read_text())["assets"]}
    missing = rows[f"model:{MODEL}-missing"]
    assert missing["status"] == "failed" and missing["attempts"] == 1 and "RepositoryNotFound" in missing["error"]
    assert rows[f"dataset:{SCRIPTED}"]["status"] == "unsupported"
    assert "loading script" in rows[f"dataset:{SCRIPTED}"]["error"]
    assert f"UNSUPPORTED dataset:{SCRIPTED}" in p.stderr


def test_packed_cache_loads_offline_elsewhere(world, tmp_path):
    """pack -> unpack into another HF_HOME -> model, tokenizer, dataset, metric, nltk and lm-eval, network cut."""
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    p = titanenv(
        ["assets", "pack", "assets.toml", "--out", str(tmp_path / "pack"), "--part-size", "256K"], world.env, world.base
    )
    assert p.returncode == 0, p.stderr
    assert len(list((tmp_path / "pack").glob("assets.tar.zst.*"))) > 1
    other = tmp_path / "compute-hf"
    env = offline_env(world.env, other)
    for expected in ("unpacked into", "was already unpacked"):
        p = titanenv(["assets", "unpack", str(tmp_path / "pack")], env, tmp_path)
        assert p.returncode == 0 and expected in p.stdout, p.stdout + p.stderr
    job = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            "-c",
            OFFLINE_JOB,
            MODEL,
            DATASET,
            METRIC,
            NLTK_PACKAGE,
            str(world.base / "tasks"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    OUTPUTS.extend([job.stdout, job.stderr])
    line = next((x for x in job.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert job.returncode == 0 and line, job.stderr[-3000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["vocab"] == out["titan_vocab"] == 2020 and out["logits"][-1] == 2020
    assert out["rows"] == 20 and out["metric"] == {"word_overlap": pytest.approx(2 / 3)}
    assert out["nltk"].startswith(str(other)) and out["attempts"] == []
    assert set(out["lm_eval"]) == {"word_overlap,none", "word_overlap_stderr,none"}


def offline_env(online: dict[str, str], home: Path) -> dict[str, str]:
    """A compute node's environment: offline.env applied, HF_HOME elsewhere, no Hub endpoint."""
    env = {k: v for k, v in online.items() if k not in ("HF_ENDPOINT", "NLTK_DOWNLOAD_URL")}
    offline.apply(env)
    env.update(HF_HOME=str(home), NLTK_DATA=str(home / "nltk_data"))
    return env


def test_doctor_names_a_removed_asset_and_its_fetch_command(world, tmp_path):
    home = tmp_path / "hf"
    shutil.copytree(world.home, home, symlinks=True)
    env = dict(world.env, HF_HOME=str(home), NLTK_DATA=str(home / "nltk_data"))
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    args = ["doctor", "--offline", "assets.toml", "--isolation", "unshare"]
    p = titanenv([*args, "--verbose"], env, world.base)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "network cut with `unshare -n`" in p.stdout and "MISSING" not in p.stdout
    assert "Offline mode: HF_HUB_OFFLINE=1 [ok]" in p.stdout and "Offline mode: HTTPS_PROXY (unset) [ok]" in p.stdout
    shutil.rmtree(home / "datasets" / DATASET.replace("/", "___"))
    p = titanenv(args, env, world.base)
    assert p.returncode == 1
    assert f"MISSING dataset:{DATASET}?split=train:" in p.stdout
    command = (
        "TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch assets.toml "
        f"--only 'dataset:{DATASET}?split=train'"
    )
    assert f"fetch: {command}" in p.stdout, p.stdout
    # The printed command works: run it (online) and the dataset is back, as locked.
    fetched = titanenv(shlex.split(command)[3:], env, world.base)
    assert fetched.returncode == 0, fetched.stderr
    assert titanenv(["assets", "verify", "assets.toml"], env, world.base).returncode == 0


def test_doctor_socket_guard_fallback(world, tmp_path):
    env = dict(world.env, NLTK_DATA=str(world.home / "nltk_data"))
    p = titanenv(
        ["doctor", "--offline", "assets.toml", "--isolation", "guard", "--data", str(tmp_path / "nope")],
        env,
        world.base,
    )
    assert p.returncode == 1
    assert "socket guard" in p.stdout
    assert f"MISSING experiment.data {tmp_path / 'nope'}" in p.stdout and "titanenv preprocess" in p.stdout
    assert p.stdout.count("MISSING") == 1


def test_verify_catches_a_flipped_byte_and_a_missing_file(world, tmp_path):
    home = tmp_path / "hf"
    shutil.copytree(world.home, home, symlinks=True)
    env = dict(world.env, HF_HOME=str(home))
    assert titanenv(["assets", "verify", "assets.toml"], env, world.base).returncode == 0
    weights = next(home.glob("hub/models--*/snapshots/*/model.safetensors"))
    blob = weights.resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    arrow = next(home.glob("datasets/**/*-test.arrow"))
    arrow.unlink()
    p = titanenv(["assets", "verify", "assets.toml"], env, world.base)
    assert p.returncode == 1
    rel_weights = weights.relative_to(home).as_posix()
    assert f"BAD {rel_weights}: sha256" in p.stderr
    assert f"BAD {arrow.relative_to(home).as_posix()}: missing" in p.stderr


def test_doctor_check_tasks_builds_fetched_tasks_and_names_the_fix(world, tmp_path):
    """--check-tasks: lm-eval builds the fetched Hub task offline; one never fetched fails with its fix, which works."""
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    home = tmp_path / "hf"
    shutil.copytree(world.home, home, symlinks=True)
    env = dict(world.env, HF_HOME=str(home), NLTK_DATA=str(home / "nltk_data"))
    args = ["doctor", "--offline", "assets.toml", "--isolation", "unshare", "--check-tasks"]
    p = titanenv(args, env, world.base)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 of 1 lm-eval tasks build offline" in p.stdout and "do not build" not in p.stdout
    # This HF_HOME never got the task's dataset: lm-eval cannot build the task.
    shutil.rmtree(home / "datasets" / DATASET.replace("/", "___"))
    p = titanenv(args, env, world.base)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "lm-eval tasks that do not build offline" in p.stdout and "0 of 1 lm-eval tasks build offline" in p.stdout
    row = next(line for line in p.stdout.splitlines() if line.startswith("│ tiny_c4_overlap "))  # the table's row
    fix = (
        "TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch --add task:tiny_c4_overlap "
        f"--task-path {world.base / 'tasks'}"
    )
    assert fix in row and DATASET in row, p.stdout
    fetched = titanenv(shlex.split(fix)[3:], env, world.base)  # the printed command, online
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    p = titanenv(args, env, world.base)
    assert p.returncode == 0 and "1 of 1 lm-eval tasks build offline" in p.stdout, p.stdout + p.stderr


# Few-shot needs a split to draw examples from: the fetched dataset's train split, scored on test.
FEWSHOT_TASK = f"""\
task: tiny_c4_continuation
dataset_path: {DATASET}
output_type: loglikelihood
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{{{{text[:160]}}}}"
doc_to_target: "{{{{text[160:200]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata: {{version: 1.0}}
"""


def test_eval_matrix_runs_a_fetched_hub_task_offline(world, tmp_path, sample):
    """`titanenv eval` in `unshare -n`, offline flags, the fetched HF_HOME: a Hub task at 0 and 1 shots."""
    from runs import tiny_llama

    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    home = tmp_path / "hf"
    shutil.copytree(world.home, home, symlinks=True)
    tasks = tmp_path / "tasks"
    shutil.copytree(world.base / "tasks", tasks)
    (tasks / "tiny_c4_continuation.yaml").write_text(FEWSHOT_TASK)
    model = tiny_llama(tmp_path / "tiny", 0, sample / "gpt2_tokenizer.json")
    env = dict(offline_env(world.env, home), COLUMNS="200")
    out = tmp_path / "out"
    args = ["--model", model, "--tasks", "tiny_c4_continuation", "--include-path", tasks,
            "--num-fewshot", "0,1", "--limit", "4", "--out", out]  # fmt: skip
    p = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "titanenv", "eval", *map(str, args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    OUTPUTS.extend([p.stdout, p.stderr])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["task"], r["shots"]) for r in rows} == {
        ("tiny", "tiny_c4_continuation", "0"),
        ("tiny", "tiny_c4_continuation", "1"),
    }
    assert {r["metric"] for r in rows} >= {"perplexity", "acc"}
    cell = json.loads((out / "lm_eval" / "tiny" / "hf" / "tiny_c4_continuation" / "1shot.json").read_text())
    assert cell["n-shot"]["tiny_c4_continuation"] == 1 and cell["titanenv"]["limit"] == 4
    assert (out / "results.md").read_text().startswith("| model |")
    assert (out / "plot_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_output_holds_the_token(world, tmp_path):
    """Every output of this module: command output, lockfile, summary, archives (decompressed), caches."""
    p = titanenv(["assets", "pack", "assets.toml", "--out", str(tmp_path / "pack")], world.env, world.base)
    assert p.returncode == 0, p.stderr
    assert OUTPUTS and not [o for o in OUTPUTS if TOKEN in o]
    needle = TOKEN.encode()
    hub_side = {"mirrors", "repos", "olah.log", "logs"}  # the fake Hub's own files, which may see the token
    for path in world.base.rglob("*"):
        if path.is_file() and not path.is_symlink() and not hub_side & set(path.relative_to(world.base).parts):
            assert needle not in path.read_bytes(), path
    parts = sorted((tmp_path / "pack").glob("assets.tar.zst.*"))
    archive = zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(p.read_bytes() for p in parts))
    assert archive and needle not in archive
    for path in (tmp_path / "pack").iterdir():
        assert needle not in path.read_bytes(), path
