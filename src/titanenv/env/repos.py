"""Pinned external git repositories (e.g. a TorchTitan fork) and moving them to new pins.

``env/pinned_repos.txt`` lists ``NAME URL COMMIT [editable]``; each checkout lives in
``external/NAME``. ``update`` moves a checkout to its pinned commit and carries the local work
over with ``git rebase --autostash --onto PIN BASE``: commits made on top of the old pin are
replayed, uncommitted changes are stashed and re-applied. A copy of that work is saved first
(``git format-patch``, ``git diff``) in ``external/NAME.patches/``. On a conflict, in a commit
or in the uncommitted changes, the checkout is put back exactly as it was and the update stops,
naming the patch and the files. Nothing ever asks a question: git runs with no terminal
prompt, no editor and no stdin.

The commit a checkout was last moved to is kept in the ref ``refs/titanenv/base``; local work is
everything between it and ``HEAD``, plus the working tree.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BASE_REF", "PinnedRepo", "RepoError", "read_pinned", "update"]

BASE_REF = "refs/titanenv/base"
_SHA = re.compile(r"^[0-9a-f]{40}$")


class RepoError(RuntimeError):
    """A pinned-repos file is malformed or an update stopped; the message says where and what to do."""


@dataclass(frozen=True)
class PinnedRepo:
    """One line of the pinned-repos file."""

    name: str
    url: str
    commit: str
    path: Path
    editable: bool = False
    """Install the checkout editable into the venv, over the locked package of the same name."""


def read_pinned(file: Path, external: Path) -> list[PinnedRepo]:
    """Parse ``file``; checkouts go to ``external/NAME``.

    Raises:
        RepoError: a line is malformed (the message names ``file:line``).
    """
    if not file.is_file():
        return []
    repos = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (3, 4) or (len(fields) == 4 and fields[3] != "editable"):
            raise RepoError(f"{file}:{n}: expected 'NAME URL COMMIT [editable]', got {line.strip()!r}")
        name, url, commit = fields[:3]
        if not _SHA.match(commit):
            raise RepoError(f"{file}:{n}: {name}: pin a full 40-character commit hash, not {commit!r}")
        repos.append(PinnedRepo(name, url, commit, external / name, len(fields) == 4))
    return repos


def update(repo: PinnedRepo, dry_run: bool = False, log: Callable[[str], None] = print) -> str:
    """Move ``repo``'s checkout to its pinned commit, re-applying local work; return what happened.

    Raises:
        RepoError: git failed, or local work conflicts with the new pin (the checkout is restored).
    """
    if not (repo.path / ".git").exists():
        if dry_run:
            return f"{repo.name}: would clone {repo.url} into {repo.path} at {repo.commit[:12]}"
        repo.path.parent.mkdir(parents=True, exist_ok=True)
        _git(None, "clone", "--quiet", "--no-checkout", repo.url, str(repo.path))
        _ensure_commit(repo)
        _git(repo.path, "checkout", "--quiet", "--detach", repo.commit)
        _git(repo.path, "update-ref", BASE_REF, repo.commit)
        return f"{repo.name}: cloned at {repo.commit[:12]}"
    base = _git(repo.path, "rev-parse", "--verify", "--quiet", BASE_REF, check=False).strip()
    if not base:
        raise RepoError(
            f"{repo.path} has no {BASE_REF}, so its local work cannot be told apart: "
            f"record the commit it was checked out at with `git -C {repo.path} update-ref {BASE_REF} <commit>`"
        )
    head = _git(repo.path, "rev-parse", "HEAD").strip()
    commits = _git(repo.path, "rev-list", "--reverse", f"{base}..HEAD").split()
    dirty = _git(repo.path, "diff", "--binary", "HEAD")
    if base == repo.commit:
        return f"{repo.name}: already at {repo.commit[:12]}"
    plan = f"{repo.name}: {base[:12]} -> {repo.commit[:12]}, re-applying {len(commits)} commit(s)" + (
        " and uncommitted changes" if dirty else ""
    )
    if dry_run:
        return "would move " + plan
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    saved = repo.path.parent / f"{repo.name}.patches" / f"{stamp}-{base[:12]}"
    saved.mkdir(parents=True, exist_ok=True)
    patches = []
    if commits:  # a copy for the user; git rebase does the re-applying
        _git(repo.path, "format-patch", "--quiet", "--binary", "-o", str(saved / "commits"), f"{base}..HEAD")
        patches = sorted((saved / "commits").glob("*.patch"))
    if dirty:
        (saved / "uncommitted.patch").write_text(dirty)
    log(f"{repo.name}: local work saved in {saved}")
    _ensure_commit(repo)
    branch = _git(repo.path, "symbolic-ref", "--quiet", "--short", "HEAD", check=False).strip()
    stashes = _stash_count(repo.path)
    proc = _git_proc(repo.path, "rebase", "--quiet", "--autostash", "--onto", repo.commit, base)
    if proc.returncode != 0:
        files = _conflicted(repo.path, proc)
        stopped = _git(repo.path, "rev-parse", "--verify", "--quiet", "REBASE_HEAD", check=False).strip()
        _git_proc(repo.path, "rebase", "--abort")  # back to HEAD, the autostash re-applied
        _checkout(repo.path, branch, head)
        if not stopped and not files:  # refused before replaying anything (e.g. untracked files in the way)
            raise RepoError(
                f"{repo.name}: git rebase onto {repo.commit[:12]} failed in {repo.path}; the checkout is as it was.\n"
                f"  Your work is saved in {saved}. git said:\n{proc.stderr.strip()}"
            )
        patch = patches[commits.index(stopped)] if stopped in commits and patches else None
        raise RepoError(_conflict(repo, patch.name if patch else "commits", files, head, saved))
    if _stash_count(repo.path) > stashes:  # the rebase went through; the uncommitted changes did not
        files = _conflicted(repo.path, proc)
        _git(repo.path, "reset", "--hard", "--quiet")
        _checkout(repo.path, branch, head)
        _git(repo.path, "stash", "pop", "--quiet")  # onto the commit they were made on: applies cleanly
        raise RepoError(_conflict(repo, "uncommitted.patch", files, head, saved))
    _git(repo.path, "update-ref", BASE_REF, repo.commit)
    return "moved " + plan


def _stash_count(path: Path) -> int:
    return len(_git(path, "stash", "list").splitlines())


def _conflicted(path: Path, proc: subprocess.CompletedProcess) -> list[str]:
    files = _git(path, "diff", "--name-only", "--diff-filter=U", check=False).split()
    return files or re.findall(r"CONFLICT \([^)]*\): Merge conflict in (\S+)", proc.stdout + proc.stderr)


def _conflict(repo: PinnedRepo, patch: str, files: list[str], head: str, saved: Path) -> str:
    return (
        f"{repo.name}: local change {patch} conflicts with the new pin {repo.commit[:12]}"
        f" in {', '.join(sorted(set(files))) or 'the files it touches'}.\n"
        f"  {repo.path} is back at {head[:12]} with your changes, as before the update.\n"
        f"  Your work is saved in {saved}. To resolve by hand: cd {repo.path} &&"
        f" git rebase --autostash --onto {repo.commit} {BASE_REF} (fix, git rebase --continue),"
        f" then git update-ref {BASE_REF} {repo.commit}"
    )


def _checkout(path: Path, branch: str, commit: str) -> None:
    if branch:
        _git(path, "checkout", "--quiet", "-B", branch, commit)
    else:
        _git(path, "checkout", "--quiet", "--detach", commit)


def _ensure_commit(repo: PinnedRepo) -> None:
    if _git_proc(repo.path, "cat-file", "-e", f"{repo.commit}^{{commit}}").returncode == 0:
        return
    if _git_proc(repo.path, "fetch", "--quiet", repo.url, repo.commit).returncode != 0:
        _git(repo.path, "fetch", "--quiet", "--tags", repo.url, "+refs/heads/*:refs/remotes/origin/*")
    if _git_proc(repo.path, "cat-file", "-e", f"{repo.commit}^{{commit}}").returncode != 0:
        raise RepoError(f"{repo.name}: commit {repo.commit} is not in {repo.url}; check the pin")


def _git(path: Path | None, *args: str, check: bool = True) -> str:
    proc = _git_proc(path, *args)
    if check and proc.returncode != 0:
        raise RepoError(f"git {' '.join(args)} failed in {path or os.getcwd()}:\n{proc.stderr.strip()}")
    return proc.stdout


def _git_proc(path: Path | None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_EDITOR="true", GIT_MERGE_AUTOEDIT="no", GIT_PAGER="cat")
    if not _has_identity():
        # git rebase and git stash record a committer; give one where none is configured, instead of failing.
        for kind in ("AUTHOR", "COMMITTER"):
            env.setdefault(f"GIT_{kind}_NAME", "titanenv update")
            env.setdefault(f"GIT_{kind}_EMAIL", "titanenv@localhost")
    cmd = ["git", *(["-C", str(path)] if path else []), *args]
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)


def _has_identity() -> bool:
    if os.environ.get("GIT_COMMITTER_EMAIL") or os.environ.get("EMAIL"):
        return True
    proc = subprocess.run(
        ["git", "config", "--get", "user.email"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    return bool(proc.stdout.strip())
