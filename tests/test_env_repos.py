"""env.repos.update: git rebase --autostash carries local work to the new pin, or stops and restores."""

from __future__ import annotations

import pytest

from test_env_setup import commit, git
from titanenv.env import repos


@pytest.fixture
def moved(tmp_path):
    """An upstream with commits A and B, and a checkout of it at A on branch ``work``."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "main")
    a = commit(upstream, {"model.py": "dim = 1\nlayers = 2\n", "README": "fork\n"}, "A")
    b = commit(upstream, {"extra.py": "x = 1\n"}, "B")
    repo = repos.PinnedRepo("fork", str(upstream), a, tmp_path / "external" / "fork")
    repos.update(repo, log=lambda m: None)
    git(repo.path, "checkout", "-q", "-b", "work")
    return upstream, repo, b


def test_local_commits_are_rebased_on_a_branch(moved):
    upstream, repo, b = moved
    commit(repo.path, {"model.py": "dim = 1\nlayers = 4\n"}, "local: deeper")
    (repo.path / "README").write_text("notes\n")
    stashes = git(repo.path, "stash", "list")
    out = repos.update(repos.PinnedRepo(repo.name, repo.url, b, repo.path), log=lambda m: None)
    assert out.startswith("moved fork:")
    assert git(repo.path, "symbolic-ref", "--short", "HEAD") == "work"
    assert git(repo.path, "rev-parse", "HEAD~1") == b
    assert "rebase" in git(repo.path, "reflog", "-1", "--format=%gs")
    assert git(repo.path, "status", "--porcelain") == "M README"
    assert git(repo.path, "stash", "list") == stashes  # the autostash is gone


def test_uncommitted_changes_that_conflict_stop_and_restore(moved):
    upstream, repo, _ = moved
    head = git(repo.path, "rev-parse", "HEAD")
    (repo.path / "model.py").write_text("dim = 1\nlayers = 3  # trying\n")  # uncommitted
    c = commit(upstream, {"model.py": "dim = 1\nlayers = 8\n"}, "C: upstream changes the same line")
    with pytest.raises(repos.RepoError, match=r"local change uncommitted\.patch conflicts .* in model\.py"):
        repos.update(repos.PinnedRepo(repo.name, repo.url, c, repo.path), log=lambda m: None)
    assert git(repo.path, "rev-parse", "HEAD") == head
    assert git(repo.path, "symbolic-ref", "--short", "HEAD") == "work"
    assert (repo.path / "model.py").read_text() == "dim = 1\nlayers = 3  # trying\n"
    assert git(repo.path, "status", "--porcelain") == "M model.py"
    assert git(repo.path, "stash", "list") == ""
    assert git(repo.path, "rev-parse", repos.BASE_REF) == repo.commit
    saved = list((repo.path.parent / "fork.patches").glob("*/uncommitted.patch"))
    assert len(saved) == 1 and "layers = 3" in saved[0].read_text()


def test_a_rebase_refused_before_it_starts_says_why_and_changes_nothing(moved):
    upstream, repo, b = moved
    head = git(repo.path, "rev-parse", "HEAD")
    (repo.path / "model.py").write_text("dim = 1\nlayers = 3\n")  # uncommitted
    (repo.path / "extra.py").write_text("mine\n")  # untracked, where the new pin adds a file
    with pytest.raises(repos.RepoError, match=r"git rebase onto .* failed(.|\n)*extra\.py"):
        repos.update(repos.PinnedRepo(repo.name, repo.url, b, repo.path), log=lambda m: None)
    assert git(repo.path, "rev-parse", "HEAD") == head
    assert (repo.path / "extra.py").read_text() == "mine\n"
    assert git(repo.path, "status", "--porcelain") == "M model.py\n?? extra.py"
    assert git(repo.path, "stash", "list") == ""
