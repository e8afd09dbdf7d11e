"""Where assets live under ``HF_HOME``, and which files make up each one.

Every cache stays under ``HF_HOME`` (``hub/``, ``datasets/``, ``modules/``, ``nltk_data/``,
``titanenv/files/``) so that lockfile paths are relative to it and one archive moves all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Overrides that would move a cache out of HF_HOME, and so out of the lockfile and archives.
_SUBCACHES = {
    "HF_HUB_CACHE": "hub",
    "HUGGINGFACE_HUB_CACHE": "hub",
    "HF_DATASETS_CACHE": "datasets",
    "HF_MODULES_CACHE": "modules",
}
# Never listed, never packed: credentials huggingface_hub keeps in HF_HOME.
SECRET_NAMES = frozenset({"token", "stored_tokens"})


class CacheLayoutError(ValueError):
    """A cache variable points outside ``HF_HOME``; the message names it and the fix."""


def hf_home(environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """``$HF_HOME``, else huggingface_hub's default (``$XDG_CACHE_HOME/huggingface`` or ``~/.cache/huggingface``).

    Raises:
        CacheLayoutError: ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE`` or ``HF_MODULES_CACHE`` is set
            to a folder other than its default under ``HF_HOME``.
    """
    if environ.get("HF_HOME"):
        home = Path(environ["HF_HOME"]).expanduser()
    else:
        home = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    home = home.absolute()
    for var, sub in _SUBCACHES.items():
        value = environ.get(var)
        if value and Path(value).expanduser().absolute() != home / sub:
            raise CacheLayoutError(
                f"{var}={value} moves a cache out of HF_HOME={home}: unset it (titanenv keeps every cache "
                "under HF_HOME so that the lockfile and the archives carry all of it)"
            )
    return home


def nltk_dir(home: Path, environ: dict[str, str] | os._Environ = os.environ) -> Path:
    """Where nltk data goes: the first folder of ``$NLTK_DATA``, else ``HF_HOME/nltk_data``.

    Jobs find it there only when ``NLTK_DATA`` names it; ``titanenv doctor`` checks that.
    """
    first = (environ.get("NLTK_DATA") or "").split(os.pathsep)[0]
    return Path(first).absolute() if first else home / "nltk_data"


def relative(home: Path, path: Path) -> str:
    """``path`` (not resolved: snapshot symlinks stay as they are) relative to ``home``, POSIX style.

    Raises:
        CacheLayoutError: ``path`` is outside ``home``.
    """
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(home).as_posix()
    except ValueError:
        raise CacheLayoutError(f"{path} is outside HF_HOME={home}; keep every asset under HF_HOME") from None


def repo_folder(home: Path, repo_type: str, repo: str) -> Path:
    """huggingface_hub's cache folder of a repository: ``hub/{models,datasets,spaces}--org--name``."""
    return home / "hub" / f"{repo_type}s--{repo.replace('/', '--')}"


def hub_snapshot_files(home: Path, repo_type: str, repo: str, commit: str, revision: str | None) -> list[str]:
    """Files an offline load of a snapshot reads.

    They are the snapshot's files, ``refs/<revision>`` and the cached tree listing.
    """
    folder = repo_folder(home, repo_type, repo)
    found = [relative(home, p) for p in _files(folder / "snapshots" / commit)]
    if revision and revision != commit and (folder / "refs" / revision).is_file():
        found.append(relative(home, folder / "refs" / revision))
    if (tree := folder / "trees" / f"{commit}.json").is_file():
        found.append(relative(home, tree))
    return found


def tree_files(home: Path, folder: Path) -> list[str]:
    """Every file below ``folder``, sorted, without lock and partial-download files."""
    return [relative(home, p) for p in _files(folder)]


def _files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".lock", ".incomplete")) or name in SECRET_NAMES:
                continue
            out.append(Path(dirpath) / name)
    return out
