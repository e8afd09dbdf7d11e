"""What was launched, recorded in the run folder: ``RUN/provenance/ATTEMPT/`` (layout in :mod:`titanenv.train.rundir`).

The first node's ``titanenv train`` calls :func:`start` before training and :func:`finish`
after it. Recorded: titanenv's version and git commit (with a dirty flag), the container
image (path, sha256 computed in the background while training runs, and the build record
``<image>.json`` when there is one), every installed distribution (``pip-freeze.txt``),
each training dataset's manifest with its hash, the site configuration, the batch script,
the node list, the exact torchrun command, a filtered environment, start and end times,
the exit code and how training ended, and the resolved trainer config.

**No secrets.** Only allow-listed variables are recorded (Slurm, NCCL/UCX/gloo, titanenv,
offline flags) and any name that looks like a credential (``*TOKEN*``, ``*SECRET*``,
``*PASSW*``, ``*KEY*``, ``*CREDENTIAL*``, ``*AUTH*``) is dropped even then; in the
copied batch script such assignments and Hugging Face tokens (``hf_...``) are redacted.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from titanenv import __version__
from titanenv import config as configlib
from titanenv.data import manifest as manifestlib
from titanenv.data.indexed import bin_path, idx_path
from titanenv.digest import sha256_file
from titanenv.redaction import SECRET_NAME, redact
from titanenv.slurmenv import SlurmEnv
from titanenv.train.checkpoints import write_json_atomic
from titanenv.train.launch import LaunchPlan
from titanenv.train.rundir import RunDir

__all__ = ["Recorder", "git_info", "image_info", "pip_freeze", "redact", "safe_env"]

RECORDED_PREFIXES = ("SLURM_", "SRUN_", "SBATCH_", "NCCL_", "UCX_", "GLOO_", "TITANENV_", "TORCH_", "CUDA_", "OMP_")
RECORDED_NAMES = frozenset(
    {"APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
     "TRANSFORMERS_OFFLINE", "PYTHONPATH", "VIRTUAL_ENV", "SYSTEMNAME", "HOSTNAME"}
)  # fmt: skip
SECRET = SECRET_NAME


def safe_env(env: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed variables of ``env``, without any whose name looks like a credential."""
    return {
        k: v
        for k, v in sorted(env.items())
        if (k.startswith(RECORDED_PREFIXES) or k in RECORDED_NAMES) and not SECRET.search(k)
    }


def git_info(root: Path) -> dict[str, object]:
    """Commit of the titanenv checkout at ``root`` and whether it has uncommitted changes.

    Uses ``git`` when present (not always in a container image), else reads ``.git/HEAD``.
    """
    git = shutil.which("git")
    if git:
        sha = subprocess.run([git, "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        if sha.returncode == 0:
            status = subprocess.run([git, "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True)  # fmt: skip
            return {"sha": sha.stdout.strip(), "dirty": bool(status.stdout.strip()), "source": "git"}
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (root / ".git" / ref[5:]).read_text().strip()
        return {"sha": ref, "dirty": None, "source": ".git/HEAD"}
    except OSError:
        return {"sha": None, "dirty": None, "source": f"no git checkout at {root}"}


def image_info(env: Mapping[str, str]) -> dict[str, object] | None:
    """The container image this process runs in (``APPTAINER_CONTAINER``), with its build record; None outside one."""
    path = env.get("APPTAINER_CONTAINER") or env.get("SINGULARITY_CONTAINER")
    if not path:
        return None
    image = Path(path)
    info: dict[str, object] = {"path": str(image), "sha256": None}
    record = image.with_suffix(".json")  # written by container/build_container.sh beside the image
    if record.is_file():
        try:
            info["build"] = json.loads(record.read_text())
        except json.JSONDecodeError:
            info["build"] = f"{record}: not valid JSON"
    if image.is_file():
        info["bytes"] = image.stat().st_size
    return info


def pip_freeze() -> str:
    """``name==version`` of every installed distribution, sorted (``pip freeze`` without running pip)."""
    lines = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        direct = dist.read_text("direct_url.json")
        url = json.loads(direct).get("url") if direct else None
        lines.add(f"{name} @ {url}" if url and url.startswith("file:") else f"{name}=={dist.version}")
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def data_records(prefixes: Sequence[Path]) -> list[dict[str, object]]:
    """Each dataset's manifest (sha256 and key facts), ``.idx`` sha256 and ``.bin`` size.

    The ``.bin`` (possibly terabytes) is not hashed: its manifest holds the hashes of the
    inputs and tokenizer that made it, and its size is checked against the ``.idx``.
    """
    out = []
    for prefix in prefixes:
        mpath = manifestlib.path_for(prefix)
        record: dict[str, object] = {"prefix": str(prefix)}
        if mpath.is_file():
            record["manifest"] = str(mpath)
            record["manifest_sha256"] = sha256_file(mpath)
            manifest = manifestlib.read(prefix)
            record["tokenizer_sha256"] = manifest.tokenizer.sha256 if manifest is not None else None
            record["tokens"] = manifest.counts.tokens if manifest is not None else None
        else:
            record["manifest"] = None
        if idx_path(prefix).is_file():
            record["idx_sha256"] = sha256_file(idx_path(prefix))
        if bin_path(prefix).is_file():
            record["bin_bytes"] = bin_path(prefix).stat().st_size
        out.append(record)
    return out


class Recorder:
    """Writes ``RUN/provenance/ATTEMPT/`` for one start of a run (first node only).

    Args:
        run: the run folder and attempt.
        env: the launcher's environment (filtered before anything is written).
    """

    def __init__(self, run: RunDir, env: Mapping[str, str]) -> None:
        self.run = run
        self.env = dict(env)
        self.record: dict[str, object] = {}
        self._hasher: threading.Thread | None = None

    def start(
        self,
        *,
        command: Sequence[str],
        plan: LaunchPlan,
        data: Sequence[Path],
        site: configlib.Resolved | None,
        worker_env: Mapping[str, str],
        settings: Mapping[str, object] | None = None,
    ) -> Path:
        """Record everything known before training; returns the attempt folder.

        ``settings``: the ``titanenv train`` flags, one entry per row of :mod:`titanenv.train.settings`.
        """
        out = self.run.provenance
        out.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[3]
        self.record = {
            "attempt": self.run.attempt,
            "run_dir": str(self.run.root),
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "end": None,
            "titanenv": {"version": __version__, "root": str(root), **git_info(root)},
            "image": image_info(self.env),
            "job": SlurmEnv.from_env(self.env).job_record(),
            "launch": {**asdict(plan), "nodes": list(plan.nodes)},
            "settings": dict(settings or {}),
            "command": list(command),
            "data": data_records(data),
            "environment": safe_env(worker_env),
        }
        if site is not None:
            write_json_atomic(out / "site.json", {
                "values": site.config.model_dump(mode="json", by_alias=True),
                "origins": site.origins,
                "machine": asdict(site.config.profile),
            })  # fmt: skip
        (out / "pip-freeze.txt").write_text(pip_freeze())
        script = self.env.get("TITANENV_BATCH_SCRIPT")
        if script and Path(script).is_file():
            (out / "sbatch.sh").write_text(redact(Path(script).read_text()))
        self._write()
        image = self.record["image"]
        if isinstance(image, dict) and Path(str(image["path"])).is_file():
            # Hashing a multi-GB image takes a while: do it while training runs.
            self._hasher = threading.Thread(target=self._hash_image, args=(Path(str(image["path"])),), daemon=True)
            self._hasher.start()
        return out

    def _hash_image(self, path: Path) -> None:
        digest = sha256_file(path)
        image = self.record.get("image")
        if isinstance(image, dict):
            image["sha256"] = digest

    def finish(self, *, exit_code: int, status: dict[str, Any] | None) -> None:
        """Record the end: time, exit code, how training ended, the resolved trainer config."""
        if self._hasher is not None:
            self._hasher.join(timeout=600)
        self.record["end"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.record["exit_code"] = exit_code
        self.record["status"] = status
        resolved = self.run.root / "trainer_config.json"  # TorchTitan's record of this start (rank 0)
        if resolved.is_file():
            shutil.copyfile(resolved, self.run.provenance / "config.json")
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.run.provenance / "provenance.json", self.record)
