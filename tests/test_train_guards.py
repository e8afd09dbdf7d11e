"""``titanenv train`` refuses, before torchrun, what would lose data or crash deep in torch.

Each test is written from a reproduction of issue 9: unmarked checkpoints (1), token ids beyond
the vocabulary (4), a tokenizer mismatch (6), an empty dataset (7), loopback down (8). Runs go
through ``python -m titanenv.cli train`` in a child process, so the exit code is the real one;
most are refused before torchrun and take seconds. One short real training run (module fixture)
provides a finished run folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import require
from titanenv.data import manifest as manifestlib
from titanenv.data import preprocess as pp
from titanenv.data.indexed import IndexedDatasetWriter, bin_path, idx_path
from titanenv.train import checkpoints, preflight
from titanenv.train.preflight import PreflightConfig
from titanenv.train.rundir import RunDir

PREFLIGHT_FAILED = 3
SMALL = ["--seq-len", "64", "--batch-size", "2", "--checkpoint-interval", "2"]
UNSHARE = (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
)


@pytest.fixture(scope="module")
def tokenizer_dir(sample: Path) -> Path:
    return sample / "torchtitan_test_tokenizer"  # 2,020 tokens


@pytest.fixture(scope="module")
def data(sample: Path, tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A small real dataset (WikiText-2 documents) made by `titanenv preprocess`, with its manifest."""
    prefix = tmp_path_factory.mktemp("data") / "wiki"
    pp.run(pp.PreprocessConfig(inputs=[sample / "wikitext2_valid_test_docs.jsonl"], output_prefix=prefix,
                               tokenizer_model=str(tokenizer_dir), append_eod=True))  # fmt: skip
    return prefix


def train(data: Path, tokenizer: Path, out: Path, *flags: str, timeout: float = 600, prefix: tuple[str, ...] = ()):
    """``titanenv train`` in a child process (outside Slurm); returns (rc, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [*prefix, sys.executable, "-m", "titanenv.cli", "train", "--data", str(data), "--tokenizer", str(tokenizer),
           "--output-dir", str(out), *SMALL, *flags]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout + p.stderr


def preflight_line(text: str, check: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("preflight FAILED") and f": {check}: " in line]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (to prove nothing was touched)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------- 1: checkpoints without completion markers


@pytest.fixture(scope="module")
def finished(data: Path, tokenizer_dir: Path, tmp_path_factory) -> Path:
    """A finished run of 4 steps with complete checkpoints step-2 and step-4."""
    out = tmp_path_factory.mktemp("runs") / "run"
    rc, text = train(data, tokenizer_dir, out, "--steps", "4")
    assert rc == 0, text[-3000:]
    assert checkpoints.complete_steps(out / "checkpoint") == [4, 2]
    assert not list(out.rglob(checkpoints.SAVING))  # the marker replaced each save's tag
    return out


def unmarked_copy(finished: Path, dest: Path) -> Path:
    """The repro: copy a finished run folder and delete every completion marker."""
    shutil.copytree(finished, dest)
    for marker in (dest / "checkpoint").glob(f"*/{checkpoints.MARKER}"):
        marker.unlink()
    return dest


def test_unmarked_checkpoints_are_refused_and_left_untouched(finished, data, tokenizer_dir, tmp_path):
    out = unmarked_copy(finished, tmp_path / "copy")
    before = tree(out / "checkpoint")
    rc, text = train(data, tokenizer_dir, out, "--steps", "8")
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    line = preflight_line(text, "checkpoints")
    for step in (2, 4):
        assert f"step-{step} (no completion marker {checkpoints.MARKER}" in line, line
    assert "--resume-from step-4 --trust-unmarked" in line and "new --output-dir" in line, line
    assert not [x for x in text.splitlines() if x.startswith("+ ") and "torchrun" in x]  # torchrun never started
    assert tree(out / "checkpoint") == before  # nothing overwritten, nothing purged


def test_trust_unmarked_checks_marks_and_resumes(finished, data, tokenizer_dir, tmp_path):
    out = unmarked_copy(finished, tmp_path / "copy")
    rc, text = train(data, tokenizer_dir, out, "--steps", "6", "--resume-from", "step-4", "--trust-unmarked")
    assert rc == 0, text[-3000:]
    assert "Training starts at step 5" in text, text[-3000:]
    assert checkpoints.read_marker(out / "checkpoint" / "step-4")["trusted"] is True
    assert checkpoints.complete_steps(out / "checkpoint") == [6, 4]
    assert (out / "checkpoint" / "step-2" / ".metadata").is_file()  # unmarked and older: kept, never purged
    # A requeued attempt repeats the flags: step-4 is complete now, so it resumes from the newest, step-6.
    again = checkpoints.guard(out / "checkpoint", 4, trust_unmarked=True)
    assert again.ok and again.trust is None and again.detail.startswith("resume from step-6"), again


def test_trust_unmarked_refuses_a_truncated_shard(finished, data, tokenizer_dir, tmp_path):
    out = unmarked_copy(finished, tmp_path / "copy")
    shard = next((out / "checkpoint" / "step-4").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    rc, text = train(data, tokenizer_dir, out, "--steps", "8", "--resume-from", "step-4", "--trust-unmarked")
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    line = preflight_line(text, "checkpoints")
    assert f"{shard.name} has 100 bytes" in line and "truncated" in line, line
    assert checkpoints.read_marker(out / "checkpoint" / "step-4") is None


def test_resume_from_an_older_step_would_overwrite_newer_ones(finished, data, tokenizer_dir, tmp_path):
    out = unmarked_copy(finished, tmp_path / "copy")
    rc, text = train(data, tokenizer_dir, out, "--steps", "8", "--resume-from", "step-2", "--trust-unmarked")
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    assert "step-4 is newer than step-2" in preflight_line(text, "checkpoints")


def fake_checkpoint(folder: Path, step: int, *, marked: bool = True) -> checkpoints.CheckpointState:
    path = folder / f"step-{step}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 100)
    (path / ".metadata").write_bytes(b"m")
    if marked:
        checkpoints.write_marker(path, step)
    return next(s for s in checkpoints.scan(folder) if s.step == step)


def test_retention_purges_only_complete_older_ones_and_our_own_debris(tmp_path):
    folder = tmp_path / "checkpoint"
    fake_checkpoint(folder, 10, marked=False)  # unmarked and older than where the run resumed: not ours to delete
    for step in (20, 30, 40):
        fake_checkpoint(folder, step)
    fake_checkpoint(folder, 50, marked=False)  # crash debris: newer than the complete step-40 the run resumed from
    fake_checkpoint(folder, 60)  # the run saved step 60
    half_purged = fake_checkpoint(folder, 15)
    checkpoints.begin_purge(half_purged.path)  # a purge interrupted after its first step
    doomed = checkpoints.purgeable(checkpoints.scan(folder), keep=2, resume_step=40)
    assert sorted(s.step for s in doomed) == [15, 20, 30, 50]
    assert checkpoints.purgeable(checkpoints.scan(folder), keep=2, resume_step=-1) != []  # a fresh start's own


def test_partial_checkpoint_newer_than_the_complete_one_is_named_crash_debris(tmp_path):
    run = RunDir(tmp_path / "run", "local")
    fake_checkpoint(run.checkpoints, 40)
    fake_checkpoint(run.checkpoints, 50, marked=False)
    finding = preflight.check_checkpoints("vm", run)
    assert finding.ok, finding.line()
    assert "resume from step-40" in finding.detail and "step-50" in finding.detail
    assert "crash debris" in finding.detail and "replaced" in finding.detail


def test_an_interrupted_save_of_our_own_is_not_refused(tmp_path):
    """A job killed during its first save (then requeued) left a tagged folder: our debris, not the user's."""
    run = RunDir(tmp_path / "run", "job-1.1")
    fake_checkpoint(run.checkpoints, 10, marked=False)
    checkpoints.begin_save(run.checkpoints / "step-10", job="1")
    finding = preflight.check_checkpoints("vm", run)
    assert finding.ok and "step-10 (its save was interrupted" in finding.detail, finding.line()
    fake_checkpoint(run.checkpoints, 20)  # the requeued attempt saved step 20
    assert [s.step for s in checkpoints.purgeable(checkpoints.scan(run.checkpoints), 3, -1)] == [10]


# ---------------------------------------------------------------- 4, 6, 7: the data, before torchrun


def write_dataset(prefix: Path, documents: list[list[int]]) -> Path:
    """A Megatron .bin/.idx with no manifest (as Megatron's own tools write it)."""
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for doc in documents:
            w.add_document(doc)
    return prefix


def test_token_ids_beyond_the_vocabulary_are_refused(data, tokenizer_dir, tmp_path):
    ids = np.asarray(np.memmap(bin_path(data), dtype=np.uint16, mode="r")[:5000]).tolist()
    prefix = write_dataset(tmp_path / "megatron", [ids[:2500], [*ids[2500:], 3000]])  # 3000 >= 2020 tokens
    assert manifestlib.read(prefix) is None
    rc, text = train(prefix, tokenizer_dir, tmp_path / "run", "--steps", "2")
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    line = preflight_line(text, "data")
    assert "3000" in line and "2020" in line, line
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_max_token_id_is_computed_once_per_bin(data, tokenizer_dir, tmp_path, monkeypatch):
    from titanenv.data import indexed

    ids = np.asarray(np.memmap(bin_path(data), dtype=np.uint16, mode="r")[:3000]).tolist()
    prefix = write_dataset(tmp_path / "megatron", [ids])
    calls = []
    real = indexed.max_token_id
    monkeypatch.setattr(indexed, "max_token_id", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    for attempt in ("job-1.0", "job-1.1"):  # a requeued job: a new attempt in the same run folder
        run = RunDir(tmp_path / "run", attempt)
        findings = preflight.check_data("vm", run, [prefix], tokenizer_dir, seq_len=64)
        assert all(f.ok for f in findings), [f.line() for f in findings]
    assert len(calls) == 1
    bin_path(prefix).write_bytes(bin_path(prefix).read_bytes())  # rewritten: new mtime, scanned again
    preflight.check_data("vm", RunDir(tmp_path / "run", "job-1.2"), [prefix], tokenizer_dir, seq_len=64)
    assert len(calls) == 2


def test_tokenizer_mismatch_fails_in_preflight_in_one_line(data, sample, tmp_path):
    rc, text = train(data, sample / "gpt2_tokenizer.json", tmp_path / "run", "--steps", "2")
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    line = preflight_line(text, "data")
    assert "tokenized with" in line and "ChildFailedError" not in text, text[-3000:]
    assert "Traceback" not in text


def test_tokenizer_mismatch_fails_on_every_node(data, sample, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    run = RunDir(tmp_path / "run", "job-1.0")
    gpt2 = sample / "gpt2_tokenizer.json"
    configs = [PreflightConfig(node=f"node{i + 1}", node_index=i, nodes=["node1", "node2"], nnodes=2,
                               rdzv_endpoint=endpoint, run=run, timeout_s=20, assets=False, tokenizer=gpt2,
                               data=[data], seq_len=64) for i in range(2)]  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(preflight.run, configs)
    assert not first.ok and not second.ok
    for node in ("node1", "node2"):
        assert any(line.startswith(f"preflight FAILED on {node}: data:") and "tokenized with" in line
                   for line in second.lines), second.lines  # fmt: skip


@pytest.mark.parametrize(("documents", "tokens"), [([], 0), ([list(range(1, 51)), list(range(1, 51))], 100)])
def test_an_empty_or_too_small_dataset_is_refused_with_both_numbers(tokenizer_dir, tmp_path, documents, tokens):
    prefix = write_dataset(tmp_path / "small", documents)
    rc, text = train(prefix, tokenizer_dir, tmp_path / "run", "--steps", "2", "--seq-len", "128")
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    line = preflight_line(text, "data")
    assert f"{tokens} tokens" in line and "129" in line, line


def test_a_corrupt_index_fails_preflight(data, tokenizer_dir, tmp_path):
    prefix = tmp_path / "corrupt"
    for src, dst in ((bin_path(data), bin_path(prefix)), (idx_path(data), idx_path(prefix))):
        shutil.copyfile(src, dst)
    raw = bytearray(idx_path(prefix).read_bytes())
    raw[40:200] = b"\xff" * 160
    idx_path(prefix).write_bytes(bytes(raw))
    findings = preflight.check_data("vm", RunDir(tmp_path / "run", "a"), [prefix], tokenizer_dir, seq_len=64)
    assert any(not f.ok and "corrupt index" in f.detail for f in findings), [f.line() for f in findings]


# ---------------------------------------------------------------- 8: loopback down


def test_loopback_down_fails_fast_in_preflight(data, tokenizer_dir, tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to bring loopback down")
    rc, text = train(data, tokenizer_dir, tmp_path / "run", "--steps", "2", prefix=("unshare", "-n"), timeout=120)
    assert rc == PREFLIGHT_FAILED, text[-3000:]
    line = preflight_line(text, "rendezvous")
    assert "localhost:" in line and "ip link set lo up" in line, line
    assert "RendezvousConnectionError" not in text


def test_loopback_is_probed_for_a_single_slurm_node_too(tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to bring loopback down")
    script = (
        "import sys\n"
        "from titanenv.train import preflight\n"
        "from titanenv.train.rundir import RunDir\n"
        "cfg = preflight.PreflightConfig(node='vm', node_index=0, nnodes=1, rdzv_endpoint='127.0.0.1:29517',\n"
        f"    run=RunDir(__import__('pathlib').Path({str(tmp_path)!r}), 'a'), assets=False)\n"
        "r = preflight.run(cfg)\n"
        "print('\\n'.join(r.lines)); sys.exit(0 if r.ok else 3)\n"
    )
    p = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "127.0.0.1:29517" in p.stdout and "rendezvous" in p.stdout, p.stdout
