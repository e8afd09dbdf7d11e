"""Shared fixtures: the repository, its sample data, and (from slurm_harness) a real local Slurm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, except under CI=true, where the test must run."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample() -> Path:
    return SAMPLE


from runs import TinyRun, make_tiny_run  # noqa: E402
from slurm_harness import slurm_cluster  # noqa: E402,F401  (session fixture: a real local Slurm)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_run("test" | "gpt2") -> runs.TinyRun``: a finished few-step CPU run of the debug recipe with
    that tokenizer (tests/runs.py), trained on first use and shared by the whole session."""
    made: dict[str, TinyRun] = {}

    def get(tokenizer: str = "test") -> TinyRun:
        if tokenizer not in made:
            made[tokenizer] = make_tiny_run(tmp_path_factory.mktemp(f"tiny-run-{tokenizer}"), tokenizer)
        return made[tokenizer]

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run tests/test_lint.py first: a lint or type failure shows before the slower tests."""
    items.sort(key=lambda item: item.path.name != "test_lint.py")  # stable: the rest keep their order
