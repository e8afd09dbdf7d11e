"""``titanenv assets fetch``: run the fetchers over a plan, in parallel, with retries; write lock and summary.

A rerun resumes: assets whose locked files are all present (same sizes) are not fetched again,
an asset with a lock entry is fetched at its locked commit, and huggingface_hub continues
partial downloads. ``refresh=True`` re-resolves revisions (moves ``main`` forward).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from titanenv import __version__, atomic
from titanenv.assets import fetchers, lockfile
from titanenv.assets.cache import CacheLayoutError
from titanenv.assets.files import redact, redacted
from titanenv.assets.lockfile import LockedAsset
from titanenv.assets.plan import Plan, Planned
from titanenv.offline import is_offline

log = logging.getLogger("titanenv.assets")
PARALLEL_KINDS = {"model", "tokenizer", "dataset", "file"}
"""Fetched by a thread pool; metrics and nltk data (dynamic imports, small) one after another."""


class OfflineError(RuntimeError):
    """Fetching was asked for with the offline flags set."""


@dataclass
class Outcome:
    """What happened to one asset; a row of the summary file."""

    key: str
    kind: str
    origins: list[str]
    status: str
    """``fetched``, ``locked`` (already present, not fetched again), ``failed`` or ``unsupported``."""
    commit: str | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    attempts: int = 0
    error: str | None = None


@dataclass
class Options:
    """How to fetch."""

    jobs: int = 4
    """Assets fetched at once."""
    retries: int = 3
    """Attempts per asset for transient errors (network, 5xx); backoff 2, 4, ... seconds."""
    refresh: bool = False
    """Ignore locked commits and fetch revisions anew."""
    hash_jobs: int = 2
    """Threads hashing files for the lockfile."""
    progress: bool = True
    backoff: float = 2.0
    """Seconds before the first retry; doubled for each further one."""


def run(plan: Plan, home: Path, lock_path: Path, summary_path: Path, options: Options | None = None) -> list[Outcome]:
    """Fetch every item of ``plan`` into ``home``; merge the lock at ``lock_path``; write the summary.

    Returns:
        One outcome per item plus one per unsupported lm-eval task.

    Raises:
        OfflineError: the offline flags are set (a compute node, or container_run.sh without
            ``TITANENV_OFFLINE=0``).
    """
    if flags := is_offline():
        raise OfflineError(
            f"offline mode is on ({', '.join(flags)}): fetch on a login node with the network, e.g.\n"
            "  TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch ..."
        )
    _check_imported_home(home)
    opts = options or Options()
    started = datetime.now(UTC)
    lock = lockfile.read_or_empty(lock_path)
    locked = {a.key: a for a in lock.assets}
    items = list(plan.items.values())
    mutex = threading.Lock()
    with tqdm(total=len(items), desc="assets", unit="asset", disable=not opts.progress) as bar:

        def one(p: Planned) -> Outcome:
            nonlocal lock
            outcome, asset = _fetch_one(p, home, locked.get(p.item.key), opts)
            with mutex:
                if asset is not None:  # lock each asset as it lands: an interrupted fetch keeps its progress
                    lock = lock.merged([asset])
                    lockfile.write(lock_path, lock)
                bar.update()
                _log(outcome)
            return outcome

        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            outcomes = list(pool.map(one, [p for p in items if p.item.kind in PARALLEL_KINDS]))
        outcomes += [one(p) for p in items if p.item.kind not in PARALLEL_KINDS]
    for key, why in plan.unsupported.items():
        outcomes.append(Outcome(key, "task", [key], "unsupported", error=why))
        _log(outcomes[-1])
    if not lock_path.exists():
        lockfile.write(lock_path, lock)
    write_summary(summary_path, outcomes, home, lock_path, started)
    return outcomes


def _check_imported_home(home: Path) -> None:
    """Hugging Face libraries fix their cache paths when imported: they must agree with ``home``."""
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and Path(hub.HF_HOME).absolute() != home:
        raise CacheLayoutError(
            f"huggingface_hub was imported with HF_HOME={hub.HF_HOME}, not {home}; set HF_HOME before starting"
        )


def _fetch_one(p: Planned, home: Path, locked: LockedAsset | None, opts: Options) -> tuple[Outcome, LockedAsset | None]:
    item = p.item
    out = Outcome(item.key, item.kind, list(p.origins), "failed")
    spec = item.model_dump(mode="json")
    reuse = locked if locked is not None and locked.spec == spec and not opts.refresh else None
    if reuse is not None and _present(home, reuse):
        out.status, out.commit, out.files, out.bytes = "locked", reuse.commit, len(reuse.files), reuse.size
        return out, None
    pin = reuse.commit if reuse is not None else None  # the lock, not the branch, says which commit
    start = time.monotonic()
    for attempt in range(1, opts.retries + 1):
        out.attempts = attempt
        try:
            fetched = fetchers.fetch(item, home, pin)
            files = lockfile.hash_files(home, fetched.files, opts.hash_jobs)
        except fetchers.Unsupported as e:
            out.status, out.error = "unsupported", redact(str(e))
            break
        except Exception as e:  # every library has its own errors; _transient sorts them
            out.error = redact(f"{type(e).__name__}: {e}")
            if attempt == opts.retries or not _transient(e):
                break
            log.warning("%s: attempt %d failed (%s); retrying", item.key, attempt, out.error.splitlines()[0])
            time.sleep(opts.backoff * 2 ** (attempt - 1))
        else:
            asset = LockedAsset(key=item.key, kind=item.kind, spec=spec, commit=fetched.commit, files=files)
            out.status, out.error, out.commit = "fetched", None, fetched.commit
            out.files, out.bytes = len(files), asset.size
            out.seconds = round(time.monotonic() - start, 3)
            return out, asset
    out.seconds = round(time.monotonic() - start, 3)
    return out, None


def _present(home: Path, asset: LockedAsset) -> bool:
    """Every locked file exists with its size (cheap; ``titanenv assets verify`` re-hashes)."""
    for f in asset.files:
        full = home / f.path
        if not full.is_file() or full.stat().st_size != f.size:
            return False
    return True


def _transient(e: Exception) -> bool:
    """Worth retrying: network trouble, rate limits, server errors; not 'not found' or bad arguments."""
    from huggingface_hub import errors as hf

    permanent = (
        hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.EntryNotFoundError, hf.GatedRepoError,
        hf.DisabledRepoError, FileNotFoundError, ValueError, KeyError, TypeError, ImportError, CacheLayoutError,
    )  # fmt: skip
    if isinstance(e, permanent):
        return False
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status is None or status == 429 or status >= 500


def _log(o: Outcome) -> None:
    size = f"{o.files} files, {o.bytes / 1e6:.1f} MB"
    if o.status == "fetched":
        log.info("fetched %s @ %s (%s)", o.key, (o.commit or "-")[:12], size)
    elif o.status == "locked":
        log.info("present %s @ %s (%s, as locked)", o.key, (o.commit or "-")[:12], size)
    else:
        log.error("%s %s: %s", o.status, o.key, o.error)


def write_summary(path: Path, outcomes: list[Outcome], home: Path, lock_path: Path, started: datetime) -> None:
    """The summary file (as the old ``download_summary.json``): per asset its status, error, commit and size."""
    totals = {s: sum(o.status == s for o in outcomes) for s in ("fetched", "locked", "failed", "unsupported")}
    totals["bytes"] = sum(o.bytes for o in outcomes)
    atomic.write_json(path, redacted({
        "generated_by": f"titanenv {__version__}",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "hf_home": os.fspath(home),
        "lockfile": os.fspath(lock_path),
        "totals": totals,
        "assets": [asdict(o) for o in outcomes],
    }))  # fmt: skip


def summary_path_for(lock_path: Path) -> Path:
    """``NAME.summary.json`` beside ``NAME.lock.json``."""
    name = lock_path.name.removesuffix(lockfile.LOCK_SUFFIX)
    return lock_path.with_name(f"{name}.summary.json")
