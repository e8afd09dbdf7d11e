"""``lmeval.check_tasks`` and ``tasks = ["all"]``: lm-eval tasks built from the local caches only.

The tasks are real lm-eval YAML configs in an include path: one reads a local JSON file (a
packaged builder, so it builds offline), one names a Hub dataset that was never fetched. They run
in a child process with the offline environment, inside ``unshare -n`` (root; required under
CI=true) and with the socket guard, which records any connection a library tries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require
from titanenv import offline
from titanenv.assets import lmeval

UNSHARE = (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
)
ROWS = [
    {"question": "How many legs has a spider?", "choices": ["six", "eight"], "label": 1},
    {"question": "What colour is a clear daytime sky?", "choices": ["blue", "green"], "label": 0},
]
TASK = """\
task: {name}
dataset_path: {path}
{extra}test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""
CHECK = """
import json, sys
from pathlib import Path
from titanenv.offline import guard_sockets
attempts = guard_sockets()
from titanenv.assets.lmeval import check_tasks
checks = check_tasks(sys.argv[2:], [Path(sys.argv[1])])
print("RESULT " + json.dumps({"checks": [c.__dict__ for c in checks], "attempts": attempts}))
"""


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    local = f"dataset_kwargs: {{data_files: {{test: {data}}}}}\n"
    (folder / "local_qa.yaml").write_text(TASK.format(name="local_qa", path="json", extra=local))
    (folder / "remote_qa.yaml").write_text(TASK.format(name="remote_qa", path="titanenv-test/never-fetched", extra=""))
    (folder / "qa_suite.yaml").write_text("group: qa_suite\ntask: [local_qa, remote_qa]\nmetadata: {version: 1.0}\n")
    return folder


@pytest.fixture(scope="module")
def shared_tasks(tmp_path_factory) -> Path:
    """One include path for the tests that index all of lm-eval: the index (seconds) is built once."""
    return write_tasks(tmp_path_factory.mktemp("shared") / "tasks")


def run_offline(tasks: Path, names: list[str], home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in offline.OFFLINE_FLAGS}
    offline.apply(env)
    env.update(HF_HOME=str(home), NLTK_DATA=str(home / "nltk_data"))
    p = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", CHECK, str(tasks), *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


def test_check_tasks_builds_cached_tasks_and_names_the_fix_for_missing_ones(tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    tasks = write_tasks(tmp_path / "tasks")
    out = run_offline(tasks, ["qa_suite"], tmp_path / "hf")
    by_name = {c["name"]: c for c in out["checks"]}
    assert list(by_name) == ["local_qa", "remote_qa"]
    assert by_name["local_qa"] == {"name": "local_qa", "ok": True, "reason": "", "fix": ""}
    remote = by_name["remote_qa"]
    assert not remote["ok"] and "titanenv-test/never-fetched" in remote["reason"] and "\n" not in remote["reason"]
    assert "Traceback" not in remote["reason"]
    assert remote["fix"] == f"{lmeval.FETCH_TASK} task:remote_qa --task-path {tasks}"
    assert out["attempts"] == []  # nothing tried the network, not even to fail


def test_check_tasks_refuses_to_run_online(monkeypatch):
    for flag in offline.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    with pytest.raises(RuntimeError, match="must run offline.*HF_HUB_OFFLINE"):
        lmeval.check_tasks(["arc_easy"])


def test_all_means_every_leaf_task_and_is_quick(shared_tasks):
    tasks = shared_tasks
    manager = lmeval._manager((str(tasks),), include_defaults=True)  # the index: lm-eval's own cost
    started = time.monotonic()
    leaves = {t.name: t for t in lmeval.expand(["all"], [tasks])["all"]}
    assert time.monotonic() - started < 30  # about 1 s: no task module is imported, each folder read once
    subtasks = set(manager.all_subtasks)
    assert set(leaves) == subtasks and len(leaves) > 10_000
    assert {"local_qa", "remote_qa", "arc_easy", "mmlu_anatomy"} <= set(leaves)
    assert leaves["scrolls_qasper"].dataset_path == "tau/scrolls"  # a Python task, read from its source
    assert leaves["scrolls_qasper"].dataset_name == "qasper"


def test_asset_list_all_tasks_dry_run_lists_every_task(shared_tasks, tmp_path, monkeypatch):
    """``[lm_eval] tasks = ["all"]`` with a task file and an include path: everything, listed, nothing written."""
    from typer.testing import CliRunner

    from titanenv.assets import cli

    (tmp_path / "more.txt").write_text("# extra\nlocal_qa\n")
    (tmp_path / "assets.toml").write_text(
        f'[lm_eval]\ntasks = ["all"]\ntask_file = "more.txt"\ninclude_path = ["{shared_tasks}"]\n'
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for flag in offline.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    result = CliRunner().invoke(cli.app, ["fetch", str(tmp_path / "assets.toml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = {line.split("    = ")[0]: line for line in result.output.splitlines() if "    = " in line}
    assert set(listed) == {"task:all", "task:local_qa"}
    every = listed["task:all"].split(": ", 1)[1].split()
    assert len(every) > 10_000 and {"arc_easy", "local_qa", "remote_qa"} <= set(every)
    lines = dict(line.split("    <- ") for line in result.output.splitlines() if "    <- " in line)
    assert lines["dataset:titanenv-test/never-fetched"] == "task:all, task:remote_qa"
    assert "task:arc_easy" in lines["dataset:allenai/ai2_arc?name=ARC-Easy"]
    assert not (tmp_path / "hf").exists()  # a dry run writes nothing
