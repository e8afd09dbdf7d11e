"""One fetcher per asset kind: download it into ``HF_HOME`` the way the job will load it, and list its files.

Run on a login node (network on). Each fetcher returns the commit it resolved and the files,
relative to ``HF_HOME``, that an offline load reads. Hugging Face libraries are imported inside
the fetchers: they read ``HF_HOME`` when imported, and ``titanenv`` sets it first.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from titanenv.assets import cache
from titanenv.assets.plan import is_hub_id
from titanenv.assets.spec import Dataset, ExtraFile, HubModel, Item, Metric, NltkData
from titanenv.digest import sha256_file


@dataclass(frozen=True)
class Fetched:
    """What a fetch resolved."""

    commit: str | None
    """Hub commit sha; None for nltk data and URL files."""
    files: list[str]
    """Files an offline load reads, relative to ``HF_HOME``."""


class Unsupported(Exception):
    """The asset cannot work offline with the installed libraries; retrying will not help."""


def fetch(item: Item, home: Path, commit: str | None = None) -> Fetched:
    """Download ``item`` into ``home`` (``HF_HOME``).

    Args:
        commit: a locked commit to fetch instead of the item's revision (for Hub assets).

    Raises:
        Unsupported: e.g. a dataset that needs a loading script.
        Exception: whatever the library raised (network, not found, ...).
    """
    if isinstance(item, HubModel):
        return _hub_repo(item, home, commit)
    if isinstance(item, Dataset):
        return _dataset(item, home, commit)
    if isinstance(item, Metric):
        return _metric(item, home, commit)
    if isinstance(item, NltkData):
        return _nltk(item, home)
    if isinstance(item, ExtraFile):
        return _url_file(item, home) if item.url else _hub_file(item, home, commit)
    raise TypeError(f"no fetcher for {type(item).__name__}")


def _hub_repo(item: HubModel, home: Path, commit: str | None) -> Fetched:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    path = Path(snapshot_download(
        item.repo, revision=commit or item.revision, cache_dir=home / "hub",
        allow_patterns=item.patterns, ignore_patterns=item.ignore_patterns,
    ))  # fmt: skip
    files = cache.hub_snapshot_files(home, "model", item.repo, path.name, item.revision)
    snapshot = cache.relative(home, path) + "/"
    # The snapshot may also hold files another entry fetched (a tokenizer, then the model): keep ours.
    ours = set(filter_repo_objects(
        [f[len(snapshot):] for f in files if f.startswith(snapshot)],
        allow_patterns=item.patterns, ignore_patterns=item.ignore_patterns,
    ))  # fmt: skip
    return Fetched(path.name, [f for f in files if not f.startswith(snapshot) or f[len(snapshot) :] in ours])


def _dataset(item: Dataset, home: Path, commit: str | None) -> Fetched:
    import datasets

    args = item.load_arguments()
    if commit:
        args["revision"] = commit
    try:
        # What load_dataset does, split in two to learn the Arrow cache folder it prepares.
        builder = datasets.load_dataset_builder(**args)
    except RuntimeError as e:
        if "scripts are no longer supported" in str(e):
            raise Unsupported(
                f"needs a loading script, which datasets {datasets.__version__} no longer runs ({e}); "
                "use a Parquet revision of it (often refs/convert/parquet) or another dataset"
            ) from None
        raise
    builder.download_and_prepare()
    if item.split:
        builder.as_dataset(split=item.split)  # an unknown split fails here, not on the compute node
    resolved = _hub_commit("dataset", item.repo, commit or item.revision or "main") if is_hub_id(item.repo) else None
    return Fetched(resolved, cache.tree_files(home, Path(builder.cache_dir)))


def _metric(item: Metric, home: Path, commit: str | None) -> Fetched:
    import evaluate

    module = evaluate.load(item.name, revision=commit or item.revision)
    module_file = sys.modules[type(module).__module__].__file__
    assert module_file is not None  # evaluate loads metrics from files
    folder = Path(module_file).parent  # .../metrics/<org>--<name>/<hash>
    repo = folder.parent.name.replace("--", "/", 1)
    modules_root = home / "modules"
    # evaluate imports the module as a package: keep the __init__.py files above it.
    inits = [p / "__init__.py" for p in folder.parents if modules_root in (p, *p.parents)]
    files = cache.tree_files(home, folder) + [cache.relative(home, p) for p in inits if p.is_file()]
    revision = commit or item.revision
    revisions = [revision] if revision else _evaluate_revisions(evaluate.__version__)
    return Fetched(_first_commit("space", repo, revisions), files)


def _evaluate_revisions(version: str) -> list[str]:
    """The revisions ``evaluate.load`` tries for a Space: ``$HF_SCRIPTS_VERSION`` or ``v<version>``, then ``main``."""
    first = os.environ.get("HF_SCRIPTS_VERSION", version)
    if re.match(r"\d*\.\d*\.\d*", first):
        first = f"v{first}"
    return list(dict.fromkeys([first, "main"]))


def _nltk(item: NltkData, home: Path) -> Fetched:
    from nltk.downloader import Downloader

    target = cache.nltk_dir(home)
    cache.relative(home, target)  # outside HF_HOME, no lockfile or archive would carry it
    # NLTK_DOWNLOAD_URL: the index of a mirror, as nltk's own downloader command reads it.
    downloader = Downloader(server_index_url=os.environ.get("NLTK_DOWNLOAD_URL"))
    if not downloader.download(item.name, download_dir=str(target), quiet=True, raise_on_error=True):
        raise FileNotFoundError(f"nltk could not download {item.name!r} (unknown package?)")
    subdir = target / downloader.info(item.name).subdir
    files = [p for p in (subdir / f"{item.name}.zip",) if p.is_file()]
    found = [cache.relative(home, p) for p in files] + cache.tree_files(home, subdir / item.name)
    if not found:
        raise FileNotFoundError(f"nltk reported {item.name!r} downloaded, but nothing is in {subdir}")
    return Fetched(None, found)


def _hub_file(item: ExtraFile, home: Path, commit: str | None) -> Fetched:
    from huggingface_hub import hf_hub_download

    repo, filename = item.repo or "", item.filename or ""  # both set: ExtraFile's validator
    path = Path(
        hf_hub_download(
            repo, filename, repo_type=item.repo_type, revision=commit or item.revision, cache_dir=home / "hub"
        )
    )
    snapshot = path.parents[len(Path(filename).parts) - 1]
    files = [cache.relative(home, path)]
    refs = cache.repo_folder(home, item.repo_type, repo) / "refs" / item.revision
    if refs.is_file():
        files.append(cache.relative(home, refs))
    return Fetched(snapshot.name, files)


def _url_file(item: ExtraFile, home: Path) -> Fetched:
    import httpx

    dest = home / item.destination
    rel = cache.relative(home, dest)
    if dest.is_file() and sha256_file(dest) == item.sha256:
        return Fetched(None, [rel])
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream("GET", item.url or "", follow_redirects=True, timeout=60) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
        if (digest := sha256_file(tmp)) != item.sha256:
            raise ValueError(f"{item.url}: sha256 {digest}, expected {item.sha256} (files[].sha256 in the asset list)")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return Fetched(None, [rel])


def _hub_commit(repo_type: str, repo: str, revision: str) -> str:
    from huggingface_hub import HfApi

    # Always with a revision: /api/<type>s/<repo>/revision/<rev> is also what mirrors serve.
    sha = HfApi().repo_info(repo, repo_type=repo_type, revision=revision).sha
    assert sha is not None, f"{repo_type} {repo}@{revision}: the Hub sent no commit"
    return sha


def _first_commit(repo_type: str, repo: str, revisions: list[str]) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    for rev in revisions[:-1]:
        try:
            return _hub_commit(repo_type, repo, rev)
        except HfHubHTTPError:  # no such tag (mirrors answer 401 rather than 404): evaluate falls back too
            continue
    return _hub_commit(repo_type, repo, revisions[-1])
