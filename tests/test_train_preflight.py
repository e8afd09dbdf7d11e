"""Preflight checks, run for real on this machine.

Filesystem, GPU rules, assets, the rendezvous handshake between nodes.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch.distributed as dist

from titanenv.train import checkpoints, preflight
from titanenv.train.preflight import PreflightConfig, check_gpus
from titanenv.train.rundir import RunDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg(run: RunDir, node: str, index: int, endpoint: str | None, nnodes: int = 2, timeout: float = 10, **kw):
    return PreflightConfig(node=node, node_index=index, nodes=[f"node{i + 1}" for i in range(nnodes)], nnodes=nnodes,
                           rdzv_endpoint=endpoint, run=run, timeout_s=timeout, assets=False, **kw)  # fmt: skip


def run_nodes(*configs: PreflightConfig) -> list[preflight.Report]:
    """Run several "nodes" of one job concurrently (threads stand in for the nodes)."""
    with ThreadPoolExecutor(len(configs)) as pool:
        return list(pool.map(preflight.run, configs))


def test_two_nodes_meet_and_agree(tmp_path):
    run = RunDir(tmp_path / "run", "job-1.0")
    endpoint = f"127.0.0.1:{free_port()}"
    first, second = run_nodes(cfg(run, "node1", 0, endpoint), cfg(run, "node2", 1, endpoint))
    assert first.ok and second.ok, (first.lines, second.lines)
    assert any(f.check == "rendezvous" and "all 2 nodes reported" in f.detail for f in first.findings)
    assert (run.preflight / "node2.txt").is_file()


def test_the_port_is_free_for_torchrun_once_the_nodes_agreed(tmp_path):
    """The preflight store is closed before torchrun starts: its c10d rendezvous serves the same port next."""
    run = RunDir(tmp_path / "run", "job-1.0")
    port = free_port()
    first, second = run_nodes(cfg(run, "node1", 0, f"127.0.0.1:{port}"), cfg(run, "node2", 1, f"127.0.0.1:{port}"))
    assert first.ok and second.ok, (first.lines, second.lines)
    store = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=5), wait_for_workers=False)
    store.set("rendezvous", "torchrun")
    assert store.get("rendezvous") == b"torchrun"
    del store


def test_a_node_that_never_comes_is_named(tmp_path):
    run = RunDir(tmp_path / "run", "job-1.0")
    report = preflight.run(cfg(run, "node1", 0, f"127.0.0.1:{free_port()}", nnodes=3, timeout=1))
    assert not report.ok
    assert any("node2, node3 did not report" in line for line in report.lines), report.lines


def test_unreachable_rendezvous_port_fails_with_node_address_and_fix(tmp_path):
    run = RunDir(tmp_path / "run", "job-1.0")
    report = preflight.run(cfg(run, "node2", 1, f"127.0.0.1:{free_port()}", timeout=1.5))  # nobody serves it
    assert not report.ok
    (line,) = report.lines
    assert line.startswith("preflight FAILED on node2: rendezvous: cannot reach the rendezvous 127.0.0.1:")
    assert "within 2 s" in line and "-- fix:" in line and "--rdzv-port" in line


def test_unresolvable_and_foreign_rendezvous_hosts(tmp_path):
    run = RunDir(tmp_path / "run", "job-1.0")
    bad_name = preflight.run(cfg(run, "node1", 0, "node1i.invalid:29500", timeout=1))
    assert "cannot resolve the rendezvous host 'node1i.invalid'" in bad_name.lines[0]
    foreign = preflight.run(cfg(run, "node1", 0, "192.0.2.1:29500", timeout=1))  # TEST-NET-1: never local
    assert "192.0.2.1 (192.0.2.1) is not an address of node1, the first node" in foreign.lines[0]


def test_port_in_use_on_the_first_node_fails_both_sides(tmp_path):
    run = RunDir(tmp_path / "run", "job-1.0")
    with socket.socket() as squatter:  # another program listens on the port and never answers
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        endpoint = f"127.0.0.1:{squatter.getsockname()[1]}"
        first, second = run_nodes(
            cfg(run, "node1", 0, endpoint, timeout=1.5), cfg(run, "node2", 1, endpoint, timeout=1.5)
        )
    assert "is already in use on node1" in first.lines[0]
    assert "got no preflight answer" in second.lines[-1]


def test_a_run_folder_that_is_not_shared_is_caught(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    # Each "node" has its own folder: what node2 wrote is not visible to node1.
    first, second = run_nodes(cfg(RunDir(tmp_path / "a", "j"), "node1", 0, endpoint),
                              cfg(RunDir(tmp_path / "b", "j"), "node2", 1, endpoint))  # fmt: skip
    assert not first.ok and not second.ok
    assert any("node1 cannot see" in line and "not shared" in line for line in second.lines)


def test_nodes_must_see_the_same_checkpoints(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    run = RunDir(tmp_path / "run", "j")
    step = run.checkpoints / "step-5"
    step.mkdir(parents=True)
    checkpoints.write_marker(step, 5)
    other = RunDir(tmp_path / "run", "j")
    first, _ = run_nodes(cfg(run, "node1", 0, endpoint), cfg(other, "node2", 1, endpoint))
    assert first.ok  # same folder: same view
    assert "complete checkpoints [5]" in next(f.detail for f in first.findings if f.check == "filesystem")


def test_unwritable_run_folder(tmp_path):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"  # root writes anywhere: block with a file where a folder must go
        blocked.write_text("")
        run = RunDir(blocked / "run", "j")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        run = RunDir(tmp_path / "ro" / "run", "j")
    finding, _ = preflight.check_filesystem("node1", run)
    assert not finding.ok and "cannot write and read" in finding.detail and "shared filesystem" in finding.fix


def test_single_node_checks_its_port_and_assets(tmp_path, sample):
    run = RunDir(tmp_path / "run", "local")
    tokenizer = sample / "torchtitan_test_tokenizer"
    config = PreflightConfig(node="vm", node_index=0, nnodes=1, rdzv_endpoint=f"127.0.0.1:{free_port()}", run=run,
                             tokenizer=tokenizer, data=[tmp_path / "missing"])  # fmt: skip
    report = preflight.run(config)
    assert not report.ok
    (line,) = report.lines
    assert "assets: experiment.data" in line and "missing.idx" in line and "titanenv preprocess" in line
    assert any(f.check == "assets" and f.ok and "tokenizer" in f.detail for f in report.findings)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(count=4, driver_cuda=12040, torch_cuda="12.4"), None),
        (dict(count=3, driver_cuda=12040, torch_cuda="12.4"), "3 CUDA devices visible, 4 expected"),
        (
            dict(count=4, driver_cuda=12020, torch_cuda="12.8"),
            "driver supports CUDA 12.2 but PyTorch was built for CUDA 12.8",
        ),
        (dict(count=0, driver_cuda=None, torch_cuda=""), "this PyTorch has no CUDA support"),
    ],
)
def test_gpu_rules(kw, needle):
    finding = check_gpus("jwb0001", 4, **kw)
    assert finding.ok == (needle is None)
    if needle:
        assert needle in finding.line() and finding.line().startswith("preflight FAILED on jwb0001: gpu:")


def test_allreduce_check_in_a_process_group(tmp_path):
    """World of one over gloo (the multi-rank case runs in every training test)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        took = preflight.allreduce_check(10, torch.device("cpu"), "vm")
    finally:
        dist.destroy_process_group()
    assert 0 <= took < 10


def test_handshake_ignores_strangers(tmp_path):
    """A port scanner connecting first must not count as a node."""
    run = RunDir(tmp_path / "run", "j")
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(preflight.run, cfg(run, "node1", 0, endpoint))
        for _ in range(100):
            try:
                stranger = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                threading.Event().wait(0.05)
        with stranger:
            stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
            second = preflight.run(cfg(run, "node2", 1, endpoint))
        first = first.result()
    assert first.ok and second.ok, (first.lines, second.lines)


@pytest.mark.parametrize(("version", "ok"), [("2.11.0+cu130", False), ("2.12.1", False), ("2.13.0+cpu", True),
                                             ("2.14.0a0+git1234", True)])  # fmt: skip
def test_torch_older_than_the_floor_is_named(version, ok):
    """torch 2.11/2.12 fail deep inside TorchTitan 0.3.0 (BENCHMARKS.md, GPU check); NVIDIA's a0 builds pass."""
    finding = preflight.check_torch("node1", version)
    assert finding.ok is ok
    if not ok:
        assert version in finding.detail and preflight.MIN_TORCH in finding.detail and "image" in finding.fix
