"""The inside of ``titanenv doctor``: load each asset the way a job does, where the network is cut.

Run as ``python -m titanenv.assets.probe CHECKS.json RESULTS.json`` by :mod:`titanenv.assets.doctor`,
inside ``unshare -n`` where permitted, always with the offline environment set and the socket
guard on (which also records any connection a library attempts). Each check is independent:
one failing does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from titanenv import atomic, offline
from titanenv.assets.files import redact, redacted
from titanenv.digest import sha256_file


@dataclass(frozen=True)
class Check:
    """One thing to resolve: ``kind`` picks the loader, ``args`` are its arguments (JSON)."""

    kind: str
    """``tokenizer``, ``data``, ``model``, ``hub_tokenizer``, ``dataset``, ``metric``, ``nltk`` or ``file``."""
    label: str
    """What the report names, e.g. the asset key or ``experiment.data``."""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """What a check found."""

    label: str
    ok: bool
    detail: str
    network: list[str] = field(default_factory=list)
    """Connections the check attempted (blocked); any is a failure: on a compute node it would hang or fail."""


def run_checks(checks: list[Check]) -> list[Result]:
    """Run every check in this process; call with the offline environment set and the guard on."""
    attempts = offline.guard_sockets()
    results = []
    for check in checks:
        before = len(attempts)
        try:
            ok, detail = True, LOADERS[check.kind](**check.args)
        except Exception as e:  # the report needs every failure, whatever the library raised
            ok, detail = False, redact(f"{type(e).__name__}: {e}".strip().splitlines()[0][:500])
        tried = sorted(set(attempts[before:]))
        if tried:
            ok, detail = False, f"tried to reach {', '.join(tried)} ({detail})"
        results.append(Result(check.label, ok, detail, tried))
    return results


def _tokenizer(spec: str) -> str:
    from titanenv.data import tokenizer

    info = tokenizer.load(spec)
    return f"{info.path} (vocabulary {info.vocab_size}, EOD id {info.eod_id})"


def _data(prefix: str) -> str:
    from titanenv.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    return f"{len(ds)} documents, {ds.num_tokens} tokens"


def _model(repo: str, revision: str = "main", local: bool = False) -> str:
    if local:
        if not (Path(repo) / "config.json").is_file():
            raise FileNotFoundError(f"{repo}: no config.json (not a model folder)")
        return f"{repo} (local folder)"
    from huggingface_hub import snapshot_download

    path = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    try:
        from transformers import AutoConfig
    except ImportError:  # training-only installs have no transformers: the files are what counts
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json") from None
    else:
        AutoConfig.from_pretrained(repo, revision=revision)
    return str(path)


def _hub_tokenizer(repo: str, revision: str = "main") -> str:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return _tokenizer(repo)
    tok = AutoTokenizer.from_pretrained(repo, revision=revision)
    return f"{type(tok).__name__}, vocabulary {len(tok)}"


def _dataset(load: dict[str, Any], split: str | None = None) -> str:
    import datasets

    ds = datasets.load_dataset(**load, split=split)
    if isinstance(ds, datasets.DatasetDict):
        return ", ".join(f"{name}: {len(d)} rows" for name, d in ds.items())
    return f"{split}: {len(ds)} rows"


def _metric(name: str, revision: str | None = None) -> str:
    import evaluate

    module = evaluate.load(name, revision=revision)
    return type(module).__name__


def _nltk(name: str) -> str:
    import nltk

    for root in map(Path, nltk.data.path):
        for hit in sorted(root.glob(f"*/{name}")) + sorted(root.glob(f"*/{name}.zip")):
            resource = hit.relative_to(root).as_posix().removesuffix(".zip")
            return str(nltk.data.find(resource))
    hint = ""
    default = Path(os.environ.get("HF_HOME", "")) / "nltk_data"
    if not os.environ.get("NLTK_DATA") and any(default.glob(f"*/{name}*")):
        hint = f"; it is in {default}, but NLTK_DATA is not set: set NLTK_DATA={default}"
    raise LookupError(f"nltk package {name!r} not in any nltk data folder ({', '.join(nltk.data.path)}){hint}")


def _file(
    path: str | None = None,
    sha256: str | None = None,
    repo: str | None = None,
    filename: str | None = None,
    repo_type: str = "model",
    revision: str = "main",
) -> str:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if sha256 and sha256_file(path) != sha256:
            raise ValueError(f"{path}: sha256 differs from the asset list's")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo or "", filename or "", repo_type=repo_type, revision=revision, local_files_only=True)


LOADERS: dict[str, Callable[..., str]] = {
    "tokenizer": _tokenizer, "data": _data, "model": _model, "hub_tokenizer": _hub_tokenizer,
    "dataset": _dataset, "metric": _metric, "nltk": _nltk, "file": _file,
}  # fmt: skip


def main(argv: list[str]) -> int:
    """``probe CHECKS.json RESULTS.json``: run the checks, write the results; exit 0 (the parent judges)."""
    checks = [Check(**c) for c in json.loads(Path(argv[0]).read_text())]
    atomic.write_json(argv[1], redacted([asdict(r) for r in run_checks(checks)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
