"""``titanenv doctor --offline``: prove that a job's assets resolve with the network cut.

For an experiment (tokenizer, tokenized data, model, eval tasks) and its asset list, every
asset is loaded the way the job loads it, in a child process (:mod:`titanenv.assets.probe`)
that runs with the offline environment of ``offline.env`` and:

- inside ``unshare -n`` (as root) or ``unshare -rn`` (an unprivileged user namespace) where
  permitted: no network interface but loopback exists;
- else with :func:`titanenv.offline.guard_sockets`: any connection to a non-loopback address raises.

The guard is on in both cases, so a library that *tries* the network is reported even when it
would have recovered: on a compute node such an attempt can hang until a timeout.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from titanenv import offline
from titanenv.assets import lockfile
from titanenv.assets.lmeval import TaskCheck
from titanenv.assets.plan import Plan, Planned, is_hub_id
from titanenv.assets.probe import Check, Result
from titanenv.assets.spec import Dataset, Experiment, ExtraFile, HubModel, Metric, NltkData, Tokenizer

Isolation = Literal["auto", "unshare", "guard"]
FETCH = "TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch"


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    label: str
    ok: bool
    detail: str
    fix: str | None = None
    """The command that fetches it (or what to do), for a missing asset."""


def checks_for(
    experiment: Experiment, plan: Plan, assets_path: Path | None, home: Path
) -> list[tuple[Check, str | None]]:
    """Every check the job needs, each with the fix to print when it fails."""
    out: list[tuple[Check, str | None]] = []
    covered: set[str] = set()
    if experiment.tokenizer:
        key = f"tokenizer:{experiment.tokenizer}"
        covered.add(key)
        fix = (
            _fix(plan.items[key], assets_path, home)
            if key in plan.items
            else "pass an existing tokenizer.json or its folder"
        )
        out.append((Check("tokenizer", "experiment.tokenizer", {"spec": experiment.tokenizer}), fix))
    if experiment.model:
        hub = is_hub_id(experiment.model)
        key = f"model:{experiment.model}"
        covered.add(key)
        fix = _fix(plan.items[key], assets_path, home) if key in plan.items else "pass an existing model folder"
        out.append((Check("model", "experiment.model", {"repo": experiment.model, "local": not hub}), fix))
    for prefix in experiment.data:
        fix = f"tokenized data is made, not fetched: titanenv preprocess --output-prefix {shlex.quote(prefix)} ..."
        out.append((Check("data", f"experiment.data {prefix}", {"prefix": prefix}), fix))
    for key, planned in plan.items.items():
        if key not in covered:
            out.append((_check(planned, home), _fix(planned, assets_path, home)))
    return out


def _check(planned: Planned, home: Path) -> Check:
    item, key = planned.item, planned.item.key
    if isinstance(item, Tokenizer):
        return Check("hub_tokenizer", key, {"repo": item.repo, "revision": item.revision})
    if isinstance(item, HubModel):
        return Check("model", key, {"repo": item.repo, "revision": item.revision})
    if isinstance(item, Dataset):
        return Check("dataset", key, {"load": item.load_arguments(), "split": item.split})
    if isinstance(item, Metric):
        return Check("metric", key, {"name": item.name, "revision": item.revision})
    if isinstance(item, NltkData):
        return Check("nltk", key, {"name": item.name})
    if isinstance(item, ExtraFile):
        if item.url:
            return Check("file", key, {"path": str(home / item.destination), "sha256": item.sha256})
        return Check(
            "file",
            key,
            {"repo": item.repo, "filename": item.filename, "repo_type": item.repo_type, "revision": item.revision},
        )
    raise TypeError(f"no check for {type(item).__name__}")


def _fix(planned: Planned, assets_path: Path | None, home: Path) -> str:
    """The exact command that fetches this asset on a login node."""
    if planned.from_file and assets_path is not None:
        return f"{FETCH} {shlex.quote(str(assets_path))} --only {shlex.quote(planned.item.key)}"
    task = next((o for o in reversed(planned.origins) if o.startswith("task:")), None)
    lock = lockfile.default_path(assets_path, home)
    return f"{FETCH} --add {shlex.quote(task or planned.item.key)} --lock {shlex.quote(str(lock))}"


def isolation(mode: Isolation = "auto") -> tuple[list[str], str]:
    """The command prefix that cuts the network, and how it is cut.

    Raises:
        RuntimeError: ``mode="unshare"`` where no ``unshare`` works.
    """
    if mode != "guard":
        for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
            if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix, f"network cut with `{' '.join(prefix)}` (loopback only), socket guard on"
        if mode == "unshare":
            raise RuntimeError("--isolation unshare: `unshare -n` and `unshare -rn` are not permitted here")
    return [], "socket guard (unshare not permitted here): connections to non-loopback addresses raise"


def probe(
    checks: list[Check], prefix: list[str], environ: dict[str, str] | None = None, timeout: float = 1800
) -> list[Result]:
    """Run the checks in a child process under ``prefix`` with the offline environment.

    Raises:
        RuntimeError: the child did not write its results (it crashed); the message holds its output.
    """
    env = dict(os.environ if environ is None else environ)
    offline.apply(env)
    with tempfile.TemporaryDirectory(prefix="titanenv-doctor-") as tmp:
        plan_file, result_file = Path(tmp, "checks.json"), Path(tmp, "results.json")
        plan_file.write_text(json.dumps([asdict(c) for c in checks]))
        cmd = [*prefix, sys.executable, "-m", "titanenv.assets.probe", str(plan_file), str(result_file)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not result_file.is_file():
            raise RuntimeError(f"the offline probe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return [Result(**r) for r in json.loads(result_file.read_text())]


def diagnose(
    experiment: Experiment, plan: Plan, assets_path: Path | None, home: Path, mode: Isolation = "auto"
) -> tuple[list[Finding], str]:
    """Resolve everything offline. Returns the findings (in check order) and how the network was cut."""
    pairs = checks_for(experiment, plan, assets_path, home)
    prefix, how = isolation(mode)
    results = probe([c for c, _ in pairs], prefix) if pairs else []
    findings = [
        Finding(r.label, r.ok, r.detail, None if r.ok else fix) for (_, fix), r in zip(pairs, results, strict=False)
    ]
    findings += [
        Finding(key, False, f"cannot run offline: {why}", "remove it from the task list, or fetch its data by hand")
        for key, why in plan.unsupported.items()
    ]
    return findings, how


def check_tasks_offline(
    names: list[str],
    include_path: list[Path],
    prefix: list[str],
    environ: dict[str, str] | None = None,
    timeout: float = 3600,
) -> list[TaskCheck]:
    """:func:`titanenv.assets.lmeval.check_tasks` in a child process under ``prefix`` (from
    :func:`isolation`) with the offline environment and the socket guard on.

    Returns:
        One check per leaf task; a connection attempt adds a failed check named ``(network)``.

    Raises:
        RuntimeError: a task name is unknown (the message names it), or the child crashed (the
            message holds the end of its output).
    """
    env = dict(os.environ if environ is None else environ)
    offline.apply(env)
    with tempfile.TemporaryDirectory(prefix="titanenv-doctor-") as tmp:
        request, result = Path(tmp, "tasks.json"), Path(tmp, "checks.json")
        request.write_text(json.dumps({"names": names, "include_path": [str(p) for p in include_path]}))
        cmd = [*prefix, sys.executable, "-m", "titanenv.assets.taskprobe", str(request), str(result)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not result.is_file():
            tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            raise RuntimeError(f"the offline task check failed: {tail[0]}\n{proc.stderr[-4000:]}")
        rows = json.loads(result.read_text())
        if isinstance(rows, dict):
            raise RuntimeError(rows["error"])
        return [TaskCheck(**c) for c in rows]
