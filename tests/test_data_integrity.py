"""Data integrity (issue 9): corrupt indexes refused, workers never orphaned, one run per prefix, full disks.

Each test is written from the issue's reproduction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_data_resume import workers_of as children
from titanenv.data import indexed
from titanenv.data import preprocess as pp

CLI = [sys.executable, "-c", "from titanenv.cli import main; main()"]


def corrupt(path: Path, start: int = 40, end: int = 200) -> None:
    """The issue's reproduction: overwrite bytes ``start..end`` of ``path`` with 0xff."""
    data = bytearray(path.read_bytes())
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


def inputs(sample: Path) -> list[Path]:
    return [sample / "wikitext2_valid_test_docs.jsonl", *sorted(sample.glob("c4-sample.*.json.gz"))]


def preprocess(sample: Path, prefix: Path, **kw) -> dict:
    cfg = pp.PreprocessConfig(
        inputs=inputs(sample),
        output_prefix=prefix,
        tokenizer_model=str(sample / "gpt2_tokenizer.json"),
        append_eod=True,
        **kw,
    )
    return pp.run(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample) -> Path:
    """A real dataset made by `titanenv preprocess` from sample_data (152 documents)."""
    prefix = tmp_path_factory.mktemp("corpus") / "good"
    m = preprocess(sample, prefix)
    assert m["documents_written"] == 152
    return prefix


def copy_of(prefix: Path, dest: Path) -> Path:
    for ext in ("bin", "idx", "manifest.json"):
        (dest.parent / f"{dest.name}.{ext}").write_bytes(Path(f"{prefix}.{ext}").read_bytes())
    return dest


# --- item 3: a corrupted .idx is refused wherever a dataset is opened ---


def test_doctor_fails_on_a_corrupt_idx_naming_the_file(corpus, tmp_path):
    bad = copy_of(corpus, tmp_path / "bad")
    corrupt(indexed.idx_path(bad))
    run = subprocess.run(
        [*CLI, "doctor", "--offline", "--data", str(bad), "--isolation", "guard"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert f"{bad}.idx" in out and "corrupt index" in out and "sizes[1]" in out, out
    assert "0 of 1 assets resolve offline" in out, out


def test_dataloader_refuses_a_corrupt_idx(corpus, tmp_path):
    from titanenv.train.dataloader import TokenWindowDataset

    bad = copy_of(corpus, tmp_path / "bad")
    TokenWindowDataset(bad, seq_len=16)  # the intact copy opens
    corrupt(indexed.idx_path(bad))
    with pytest.raises(indexed.IndexCorrupt, match=r"bad\.idx: corrupt index: sizes\[1\]"):
        TokenWindowDataset(bad, seq_len=16)


def test_merge_refuses_a_corrupt_shard(sample, tmp_path):
    for i in range(2):
        preprocess(sample, tmp_path / "out", shard_index=i, num_shards=2)
    shard = tmp_path / "out-00001-of-00002"
    corrupt(indexed.idx_path(shard))
    with pytest.raises(indexed.IndexCorrupt, match=r"out-00001-of-00002\.idx: corrupt index: sizes\[1\]"):
        pp.merge(tmp_path / "out", 2)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.manifest.json").exists()
    assert not list(tmp_path.glob("*.tmp.*"))


def _entries(prefix: Path):
    """(raw index bytes, offset of sizes, of pointers, of document indices)."""
    raw = bytearray(indexed.idx_path(prefix).read_bytes())
    n = int(np.frombuffer(raw, np.int64, 1, 18)[0])
    return raw, 34, 34 + 4 * n, 34 + 12 * n


def test_validate_names_the_first_bad_entry(corpus, tmp_path):
    indexed.validate(corpus)
    cases = {
        "pointer": (r"pointers\[7\] = 1, but the sizes before it sum to", lambda r, s, p, d: (p + 8 * 7, np.int64(1))),
        "size": (r"sizes\[3\] = -2 is negative", lambda r, s, p, d: (s + 4 * 3, np.int32(-2))),
        "doc": (
            r"document_indices\[9\] = 3 is below document_indices\[8\] = 8",
            lambda r, s, p, d: (d + 8 * 9, np.int64(3)),
        ),
        "last": (
            r"document_indices\[152\] = 153, but there are 152 sequences",
            lambda r, s, p, d: (d + 8 * 152, np.int64(153)),
        ),
    }
    for name, (message, where) in cases.items():
        bad = copy_of(corpus, tmp_path / name)
        raw, *offsets = _entries(bad)
        at, value = where(raw, *offsets)
        raw[at : at + value.nbytes] = value.tobytes()
        indexed.idx_path(bad).write_bytes(bytes(raw))
        with pytest.raises(indexed.IndexCorrupt, match=message) as err:
            indexed.validate(bad)
        assert err.value.path == indexed.idx_path(bad)
    short = copy_of(corpus, tmp_path / "short")
    with open(indexed.bin_path(short), "r+b") as f:
        f.truncate(indexed.bin_path(short).stat().st_size - 2)
    with pytest.raises(indexed.IndexCorrupt, match=r"short\.bin: corrupt index: \d+ bytes, but .*short\.idx describes"):
        indexed.validate(short)
    trunc = copy_of(corpus, tmp_path / "trunc")
    with open(indexed.idx_path(trunc), "r+b") as f:
        f.truncate(100)
    with pytest.raises(indexed.IndexCorrupt, match=r"trunc\.idx: corrupt index: 100 bytes, but its header"):
        indexed.validate(trunc)


def test_max_token_id_streams_the_bin(corpus, tmp_path):
    tokens = indexed.IndexedDataset(corpus).tokens
    assert indexed.max_token_id(corpus) == int(tokens.max())
    assert indexed.max_token_id(corpus, chunk_bytes=6) == int(tokens.max())  # blocks smaller than the data
    with indexed.IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass
    assert indexed.max_token_id(tmp_path / "empty") == -1
    with indexed.IndexedDatasetWriter(tmp_path / "wide", np.int32) as w:
        w.add_document([5, 70000, 3])
        w.add_document([])
    indexed.validate(tmp_path / "wide")
    assert indexed.max_token_id(tmp_path / "wide", chunk_bytes=4) == 70000


# --- shared helpers for the process, lock and disk tests ---


def big_corpus(sample: Path, path: Path, copies: int) -> Path:
    """``copies`` x 2.4 MB of real text (wikitext-2 articles) as JSONL."""
    with open(sample / "wikitext2_valid_test_docs.jsonl") as f:
        lines = [json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in f]
    with open(path, "w") as f:
        for _ in range(copies):
            f.writelines(lines)
    return path


def preprocess_args(
    sample: Path, corpus_path: Path, prefix: Path, workers: int = 2, piece_mb: float = 0.2
) -> list[str]:
    return [
        *CLI,
        "preprocess",
        "--input",
        str(corpus_path),
        "--output-prefix",
        str(prefix),
        "--tokenizer-model",
        str(sample / "gpt2_tokenizer.json"),
        "--append-eod",
        "--workers",
        str(workers),
        "--piece-mb",
        str(piece_mb),
        "--tokenizer-backend",
        "hf",
    ]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for PID 1 to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for(condition, seconds: float = 120, proc=None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(condition())
        time.sleep(0.01)
    return False


def start_busy_run(sample: Path, tmp_path: Path, prefix: Path, copies: int = 10):
    """A 2-worker preprocess of ``copies`` x 2.4 MB, returned once both workers run and one piece is done."""
    corpus_path = tmp_path / "corpus.jsonl"
    if not corpus_path.exists():
        big_corpus(sample, corpus_path, copies)
    args = preprocess_args(sample, corpus_path, prefix)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "250"}
    )
    parts = Path(f"{prefix}.parts")
    started = wait_for(lambda: list(parts.glob("*.done.json")) and len(children(proc.pid)) >= 2, proc=proc)
    if not started or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"the run finished or failed before it could be interrupted: {proc.communicate()[0].decode()}")
    return proc, args, children(proc.pid)


# --- item 9: workers never outlive the preprocess parent ---


def test_sigkill_of_the_parent_takes_its_workers_down(sample, tmp_path):
    proc, _, workers = start_busy_run(sample, tmp_path, tmp_path / "out")
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    gone = wait_for(lambda: not any(alive(w) for w in workers), seconds=15)
    leftover = [w for w in workers if alive(w)]
    for w in leftover:  # do not leave them running whatever the result
        os.kill(w, signal.SIGKILL)
    assert gone, f"workers {leftover} outlived their SIGKILLed parent"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_stops_every_worker_and_a_rerun_resumes_to_the_same_bytes(sample, tmp_path, signum):
    proc, args, workers = start_busy_run(sample, tmp_path, tmp_path / "out")
    os.kill(proc.pid, signum)
    try:
        output = proc.communicate(timeout=60)[0].decode()
    except subprocess.TimeoutExpired:  # orphaned workers hold its stdout open
        proc.kill()
        output = proc.communicate()[0].decode() + "\n(timed out: stdout held open)"
    gone = wait_for(lambda: not any(alive(w) for w in workers), seconds=15)
    leftover = [w for w in workers if alive(w)]
    for w in leftover:
        os.kill(w, signal.SIGKILL)
    assert gone, f"workers {leftover} still run after {signum.name} of the parent"
    assert proc.returncode == 128 + signum, output
    assert "rerun the same command to resume" in output, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "out.bin").exists()

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stderr
    assert not list(tmp_path.rglob("*.tmp.*"))
    pp.run(
        pp.PreprocessConfig(
            inputs=[tmp_path / "corpus.jsonl"],
            output_prefix=tmp_path / "clean",
            tokenizer_model=str(sample / "gpt2_tokenizer.json"),
            append_eod=True,
            piece_mb=0.2,
            tokenizer_backend="hf",
        )
    )
    for ext in ("bin", "idx"):
        assert (tmp_path / f"out.{ext}").read_bytes() == (tmp_path / f"clean.{ext}").read_bytes()


# --- item 10: one run per output prefix ---


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(prefix: Path, pid: int, host: str, age_s: float = 0) -> Path:
    path = Path(f"{prefix}.lock")
    path.write_text(json.dumps({"pid": pid, "host": host, "time": time.time() - age_s}) + "\n")
    return path


def test_a_second_run_on_the_same_prefix_fails_fast_naming_the_first(sample, tmp_path):
    import socket

    proc, args, workers = start_busy_run(sample, tmp_path, tmp_path / "out", copies=4)
    try:
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        first = proc.communicate(timeout=600)[0].decode()
    assert second.returncode != 0, second.stderr
    message = " ".join((second.stdout + second.stderr).split())  # undo the console's line wrapping
    assert f"prefix {tmp_path / 'out'} in use by pid {proc.pid} on host {socket.gethostname()}" in message, message
    assert "Traceback" not in message and "No such file" not in message, message
    assert proc.returncode == 0, first
    assert not Path(f"{tmp_path / 'out'}.lock").exists()
    indexed.validate(tmp_path / "out")


def test_a_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(sample, tmp_path, caplog):
    import socket

    from titanenv.data import lock

    stale = write_lock(tmp_path / "out", dead_pid(), socket.gethostname())
    with caplog.at_level("WARNING"):
        m = preprocess(sample, tmp_path / "out")
    assert m["documents_written"] == 152
    assert "stale lock" in caplog.text and str(stale) in caplog.text
    assert not stale.exists()
    with lock.PrefixLock(tmp_path / "x") as held:
        info = json.loads(held.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(lock.PrefixInUse, match=f"in use by pid {os.getpid()} on host"):
            lock.PrefixLock(tmp_path / "x").acquire()
    assert not held.path.exists()


def test_a_lock_held_on_another_host_is_refused_with_the_way_out(sample, tmp_path):
    from titanenv.data import lock

    held = write_lock(tmp_path / "out", 4242, "other-node-17", age_s=3600)
    with pytest.raises(lock.PrefixInUse, match=r"in use by pid 4242 on host other-node-17") as err:
        preprocess(sample, tmp_path / "out")
    assert f"delete {held}" in str(err.value)
    assert held.exists() and not (tmp_path / "out.bin").exists()


def test_merge_refuses_while_the_prefix_is_locked(sample, tmp_path):
    import socket

    from titanenv.data import lock

    for i in range(2):
        preprocess(sample, tmp_path / "out", shard_index=i, num_shards=2)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        write_lock(tmp_path / "out", holder.pid, socket.gethostname())
        with pytest.raises(lock.PrefixInUse, match=f"in use by pid {holder.pid} on host"):
            pp.merge(tmp_path / "out", 2)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "out.bin").exists()
    m = pp.merge(tmp_path / "out", 2)  # the holder is dead now: its lock is stale
    assert m["documents_written"] == 152


# --- item 11: a full disk fails clearly and leaves no temporary files ---


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root; under CI=true it must run)."""
    from conftest import require

    mnt = tmp_path / "small"
    mnt.mkdir()
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_while_tokenizing_names_the_path_and_leaves_no_temp_files(sample, tmp_path, small_disk):
    corpus_path = big_corpus(sample, tmp_path / "corpus.jsonl", 3)  # ~3.3 MB of tokens: more than the disk
    run = subprocess.run(
        preprocess_args(sample, corpus_path, small_disk / "out"), capture_output=True, text=True, timeout=600
    )
    message = run.stdout + run.stderr
    assert run.returncode != 0, message
    assert "no space left on device" in message and str(small_disk) in message, message
    assert "bytes free" in message, message
    assert "Traceback" not in message, message
    assert not list(small_disk.rglob("*.tmp.*")), list(small_disk.rglob("*"))


def test_full_disk_at_the_join_is_reported_up_front(sample, tmp_path, small_disk):
    corpus_path = big_corpus(sample, tmp_path / "corpus.jsonl", 1)  # parts 1.1 MB + output 1.1 MB > 2 MiB
    run = subprocess.run(
        preprocess_args(sample, corpus_path, small_disk / "out"), capture_output=True, text=True, timeout=600
    )
    message = run.stdout + run.stderr
    assert run.returncode != 0, message
    assert "needs" in message and "bytes free" in message and str(small_disk) in message, message
    assert not list(small_disk.rglob("*.tmp.*")), list(small_disk.rglob("*"))
    assert not (small_disk / "out.bin").exists()


def test_merge_checks_free_space_before_writing(sample, tmp_path, small_disk):
    corpus_path = big_corpus(sample, tmp_path / "corpus.jsonl", 1)
    for i in range(2):  # 2 x 0.55 MB: they fit, the merged 1.1 MB does not
        pp.run(
            pp.PreprocessConfig(
                inputs=[corpus_path],
                output_prefix=small_disk / "out",
                tokenizer_model=str(sample / "gpt2_tokenizer.json"),
                append_eod=True,
                shard_index=i,
                num_shards=2,
                piece_mb=0.2,
            )
        )
    with pytest.raises(OSError, match=r"merge .*needs \d+ bytes in .*small.*, \d+ bytes free") as err:
        pp.merge(small_disk / "out", 2)
    assert err.value.errno == 28
    assert not (small_disk / "out.bin").exists() and not list(small_disk.rglob("*.tmp.*"))


def test_stale_temp_files_of_dead_pids_are_swept_on_the_next_run(sample, tmp_path):
    import socket

    from titanenv import atomic

    host = socket.gethostname()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        dead, live = dead_pid(), holder.pid
        stale = [
            atomic.temp_path(tmp_path / "out.bin", pid=dead),
            atomic.temp_path(tmp_path / "out.parts" / "000000.train.k0.idx", pid=dead),
        ]
        kept = [
            atomic.temp_path(tmp_path / "out.idx", pid=live),
            atomic.temp_path(tmp_path / "out.bin", pid=dead, host="elsewhere"),
        ]
        for p in stale + kept:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
        preprocess(sample, tmp_path / "out")
        assert [p for p in stale if p.exists()] == []
        assert all(p.exists() for p in kept)
        assert f".tmp.{dead}." in stale[0].name and host.replace(".", "_") in stale[0].name
    finally:
        holder.kill()
        holder.wait()


# --- item 4 (part): the merged manifest records max_token_id ---


def test_merge_records_max_token_id_over_the_shards(sample, tmp_path):
    for i in range(3):
        preprocess(sample, tmp_path / "out", shard_index=i, num_shards=3)
    merged = pp.merge(tmp_path / "out", 3)
    expected = int(indexed.IndexedDataset(tmp_path / "out").tokens.max())
    assert merged["output"]["max_token_id"] == expected == 50256
    on_disk = json.loads(Path(f"{tmp_path / 'out'}.manifest.json").read_text())
    assert on_disk["output"]["max_token_id"] == expected
    # Tasks made before manifests recorded it: the merge scans their .bin files instead.
    for i in range(3):
        path = Path(f"{tmp_path / f'out-{i:05d}-of-00003'}.manifest.json")
        m = json.loads(path.read_text())
        m["output"].pop("max_token_id", None)
        path.write_text(json.dumps(m))
    assert pp.merge(tmp_path / "out", 3)["output"]["max_token_id"] == expected


def test_merge_keeps_the_special_token_and_skipped_file_records(sample, tmp_path):
    (tmp_path / "in").mkdir()
    lines = [json.dumps({"text": f"doc {i} <|endoftext|> tail"}) for i in range(6)]
    (tmp_path / "in" / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "in" / "old.bin").write_bytes(b"\0")  # a folder input skips it
    for i in range(2):
        pp.run(pp.PreprocessConfig(inputs=[tmp_path / "in"], output_prefix=tmp_path / "out",
                                   tokenizer_model=str(sample / "gpt2_tokenizer.json"), append_eod=True,
                                   shard_index=i, num_shards=2))  # fmt: skip
    merged = pp.merge(tmp_path / "out", 2)
    assert merged["documents_with_special_text"] == 6
    assert merged["special_tokens"] == "parse" and merged["max_document_chars"] == pp.DEFAULT_MAX_DOCUMENT_CHARS
    assert merged["files_skipped"]["count"] == 1


def test_merge_refuses_tasks_run_with_other_special_token_rules(sample, tmp_path):
    for i, mode in enumerate(("parse", "plain")):
        preprocess(sample, tmp_path / "out", shard_index=i, num_shards=2, special_tokens=mode)
    with pytest.raises(ValueError, match="disagree on special_tokens"):
        pp.merge(tmp_path / "out", 2)
