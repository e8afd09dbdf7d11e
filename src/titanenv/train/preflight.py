"""Preflight: prove a node (and the whole allocation) can train before torchrun starts.

``titanenv train`` runs :func:`run` once per node, before torchrun. On every node:

``gpu``          (GPU nodes) the number of CUDA devices equals what the node should have, and
                 the driver supports the CUDA version PyTorch was built for;
``filesystem``   the run folder is writable (a probe file is written, fsynced and read back)
                 and its checkpoint folder can be listed;
``checkpoints``  training will not overwrite a checkpoint it must keep: a checkpoint folder with
                 ``step-N`` folders but no complete one is refused, naming each folder and the
                 ways out (:func:`titanenv.train.checkpoints.guard`; ``--resume-from step-N
                 --trust-unmarked`` checks an unmarked one against its DCP ``.metadata``);
``assets``       ``titanenv doctor --offline`` for the tokenizer and the training data: both
                 load with the network cut, as on a compute node;
``data``         each dataset's index is consistent (:func:`titanenv.data.indexed.validate`),
                 its manifest names the run's tokenizer, it holds at least one window of
                 ``seq_len + 1`` tokens, and its largest token id is below the tokenizer's
                 vocabulary (from the manifest's ``max_token_id``, else scanned once and cached
                 in ``RUN/cache/`` by the ``.bin``'s size and mtime);
``rendezvous``   a single node binds and connects to the rendezvous address (``localhost`` for
                 a standalone run) within a second, so a loopback that is down fails here and
                 not after minutes of torchrun retries. On several nodes the first node binds
                 the rendezvous ``host:port`` (the name resolves to one of its own addresses
                 and the port is free), connects to it itself and serves a
                 :class:`torch.distributed.TCPStore` on it; every other node connects to it
                 and sets its findings under its node index. This is also a barrier: the first
                 node waits for every node (naming the missing ones), checks it can see each
                 node's probe file (the run folder is *shared*) and that all nodes see the same
                 checkpoints, then sets one verdict every node waits for, so all nodes fail or
                 start together. The store is closed before torchrun starts, whose c10d
                 rendezvous serves the same port next.

The last check, a small all-reduce across all ranks within a timeout (NCCL on GPU, gloo on
CPU), needs the process group, so it runs inside the training processes right after
``init_process_group`` (:func:`allreduce_check`, called by :mod:`titanenv.train.trainer`).

Every failure names the node, the check, what was found and the fix; ``titanenv train``
exits with :data:`PREFLIGHT_FAILED` (no requeue).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from packaging.version import Version

from titanenv.assets import doctor
from titanenv.assets import plan as planlib
from titanenv.assets import spec as assetspec
from titanenv.data import indexed
from titanenv.data import manifest as manifestlib
from titanenv.data import tokenizer as toklib
from titanenv.train import checkpoints
from titanenv.train.exitcodes import ExitCode
from titanenv.train.rundir import RunDir

__all__ = [
    "PREFLIGHT_FAILED",
    "Finding",
    "PreflightConfig",
    "Report",
    "allreduce_check",
    "check_assets",
    "check_checkpoints",
    "check_data",
    "check_filesystem",
    "check_gpus",
    "check_loopback",
    "max_token_id",
    "run",
]

PREFLIGHT_FAILED = ExitCode.PREFLIGHT_FAILED
"""Exit code of ``titanenv train`` (and of a training process) when a preflight check fails."""

PROTOCOL = "titanenv-preflight-1"


@dataclass(frozen=True)
class Finding:
    """The outcome of one check on one node."""

    node: str
    check: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        """One log line: ``preflight ok|FAILED on NODE: CHECK: DETAIL [-- fix: FIX]``."""
        status = "ok" if self.ok else "FAILED"
        fix = f" -- fix: {self.fix}" if self.fix and not self.ok else ""
        return f"preflight {status} on {self.node}: {self.check}: {self.detail}{fix}"


@dataclass(frozen=True)
class Report:
    """All findings this node knows of (its own; on the first node, every node's) and the verdict."""

    ok: bool
    findings: list[Finding] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class PreflightConfig:
    """What one node checks.

    Attributes:
        node: this node's name.
        node_index: 0 on the first node of the job step (it serves the rendezvous check).
        nodes: every node of the step, in order (names the missing ones); may be empty.
        nnodes: number of nodes.
        rdzv_endpoint: ``HOST:PORT`` of the torchrun rendezvous; None for a standalone run.
        run: the run folder and attempt.
        gpus: CUDA devices this node must have (0: a CPU node, no GPU check).
        tokenizer: the tokenizer folder or file the run loads (None: not checked).
        data: tokenized dataset prefixes the run reads.
        model: the Hugging Face folder a fine-tune loads its base weights from (None: not checked).
        timeout_s: seconds the rendezvous check waits for all nodes.
        assets: run the offline asset check.
        seq_len: tokens per training sample (the data must hold ``seq_len + 1``); None: not checked.
        resume_from: ``--resume-from`` step (None: the newest complete checkpoint).
        trust_unmarked: ``--trust-unmarked``: accept an unmarked ``resume_from`` after checking it.
    """

    node: str
    node_index: int
    nodes: Sequence[str] = ()
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    run: RunDir
    gpus: int = 0
    tokenizer: Path | None = None
    data: Sequence[Path] = ()
    model: Path | None = None
    timeout_s: float = 120.0
    assets: bool = True
    seq_len: int | None = None
    resume_from: int | None = None
    trust_unmarked: bool = False


# ----------------------------------------------------------------------------- local checks


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def check_gpus(
    node: str,
    expected: int,
    *,
    count: int | None = None,
    driver_cuda: int | None = None,
    torch_cuda: str | None = None,
) -> Finding:
    """``expected`` CUDA devices are visible and the driver supports PyTorch's CUDA.

    ``count``, ``driver_cuda`` (the CUDA version the driver supports, e.g. 12040) and
    ``torch_cuda`` (e.g. ``"12.8"``) default to what this process sees; tests pass them.
    """
    count = torch.cuda.device_count() if count is None else count
    torch_cuda = torch.version.cuda if torch_cuda is None else torch_cuda
    if driver_cuda is None and count > 0:
        get = getattr(torch._C, "_cuda_getDriverVersion", None)
        driver_cuda = get() if get else None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    if not torch_cuda:
        return Finding(node, "gpu", False, f"this PyTorch has no CUDA support, but {expected} GPUs are expected",
                       "run inside the GPU container image (TITANENV_IMAGE), not the CPU venv")  # fmt: skip
    if count < expected:
        return Finding(
            node, "gpu", False, f"{count} CUDA devices visible, {expected} expected (CUDA_VISIBLE_DEVICES={visible})",
            f"ask for --gres=gpu:{expected} and run one task per node; check `nvidia-smi` on {node}",
        )  # fmt: skip
    major, minor = (int(x) for x in torch_cuda.split(".")[:2])
    if driver_cuda is not None and driver_cuda < major * 1000 + minor * 10:
        return Finding(
            node, "gpu", False,
            f"the driver supports CUDA {_cuda_version(driver_cuda)} but PyTorch was built for CUDA {torch_cuda}",
            "use a container image built for the site's driver (or load the CUDA forward-compatibility package)",
        )  # fmt: skip
    driver = f", driver supports CUDA {_cuda_version(driver_cuda)}" if driver_cuda else ""
    return Finding(node, "gpu", True, f"{count} CUDA devices (PyTorch CUDA {torch_cuda}{driver})")


MIN_TORCH = "2.13"
"""The lowest torch the train stage runs on (TorchTitan 0.3.0; measured, BENCHMARKS.md "GPU check")."""


def check_torch(node: str, version: str | None = None) -> Finding:
    """This torch is at least :data:`MIN_TORCH` (``version`` defaults to ``torch.__version__``).

    NVIDIA's builds (``2.14.0a0+...``) compare as their release. Older ones fail deep inside
    TorchTitan (a missing ``DataParallelMeshDims`` import, then the first backward), so say it here.
    """
    found = Version(torch.__version__ if version is None else version)
    if found.release < Version(MIN_TORCH).release:  # release: 2.14.0a0 counts as 2.14.0
        return Finding(
            node,
            "torch",
            False,
            f"torch {found} is older than {MIN_TORCH}, the lowest TorchTitan 0.3.0 runs on",
            f"use a container image with torch >= {MIN_TORCH} (NGC pytorch 26.09 or newer; see configuration.sh)",
        )
    return Finding(node, "torch", True, f"torch {found}")


def check_filesystem(node: str, run: RunDir) -> tuple[Finding, list[int]]:
    """Write, fsync and read back ``run.preflight/NODE.txt``; list the checkpoint folder.

    Returns the finding and the complete checkpoint steps this node sees (newest first).
    """
    probe = run.preflight / f"{node}.txt"
    fix = "give --output-dir a folder on a shared filesystem all nodes can write (e.g. under TITANENV_CHECKPOINT_DIR)"
    try:
        checkpoints.write_json_atomic(probe, {"node": node, "pid": os.getpid(), "time": time.time()})
        if json.loads(probe.read_text()).get("node") != node:
            return Finding(node, "filesystem", False, f"{probe} did not read back what was written", fix), []
        steps = checkpoints.complete_steps(run.checkpoints)
    except OSError as e:
        return Finding(node, "filesystem", False, f"cannot write and read {probe}: {e}", fix), []
    seen = f"complete checkpoints {steps[:3]}{'...' if len(steps) > 3 else ''}" if steps else "no complete checkpoint"
    return Finding(node, "filesystem", True, f"{run.root} writable; {seen}"), steps


def check_assets(node: str, tokenizer: Path | None, data: Sequence[Path], model: Path | None = None) -> list[Finding]:
    """``titanenv doctor --offline`` for the tokenizer, data and base model: each loads with the network cut."""
    if tokenizer is None and not data and model is None:
        return []
    experiment = assetspec.Experiment(tokenizer=str(tokenizer) if tokenizer else None, data=[str(p) for p in data],
                                      model=str(model) if model else None)  # fmt: skip
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    try:
        found, how = doctor.diagnose(experiment, planlib.build(None), None, home, "auto")
    except (OSError, RuntimeError) as e:
        return [
            Finding(
                node,
                "assets",
                False,
                f"the offline asset check could not run: {e}",
                "run `titanenv doctor --offline` on the node",
            )
        ]
    return [Finding(node, "assets", f.ok, f"{f.label}: {f.detail} ({how.split(';')[0]})", f.fix or "") for f in found]


def check_checkpoints(node: str, run: RunDir, resume_from: int | None = None, trust_unmarked: bool = False) -> Finding:
    """Training will overwrite or purge no checkpoint it must keep (:func:`titanenv.train.checkpoints.guard`).

    Fails when ``RUN/checkpoint`` holds ``step-N`` folders but none is complete (each folder is
    named with its reason, and the fix names ``--resume-from step-N --trust-unmarked`` and a new
    ``--output-dir``), or when ``resume_from`` is missing, unmarked without ``trust_unmarked``,
    fails its ``.metadata``/shard check, or is older than another folder.
    """
    try:
        g = checkpoints.guard(run.checkpoints, resume_from, trust_unmarked)
    except OSError as e:
        return Finding(node, "checkpoints", False, f"cannot read {run.checkpoints}: {e}",
                       "give --output-dir a readable folder on a shared filesystem")  # fmt: skip
    return Finding(node, "checkpoints", g.ok, g.detail, g.fix)


MAX_ID_CACHE = "max-token-id.json"
"""``RUN/cache/max-token-id.json``: ``{bin path: {"size", "mtime_ns", "max_token_id"}}``."""


def _manifest_max_id(manifest: manifestlib.Manifest | None) -> int | None:
    return manifest.output.max_token_id if manifest is not None and manifest.output is not None else None


def max_token_id(
    run: RunDir, prefix: Path, manifest: manifestlib.Manifest | None, *, scan: bool = True
) -> tuple[int | None, str]:
    """The largest token id of ``prefix`` and where it came from.

    From the manifest's ``max_token_id`` when it has one; else from ``RUN/cache/`` when the
    ``.bin`` still has the cached size and mtime; else (when ``scan``) computed by streaming the
    ``.bin`` once (:func:`titanenv.data.indexed.max_token_id`) and cached, so requeued attempts
    do not scan again.

    Returns:
        ``(max id, source)``; ``(None, "")`` when not known and ``scan`` is False. -1: no tokens.
    """
    if (value := _manifest_max_id(manifest)) is not None:
        return value, f"from {manifestlib.path_for(prefix).name}"
    b = indexed.bin_path(prefix).resolve()
    st = b.stat()
    cache = run.root / "cache" / MAX_ID_CACHE
    try:
        entries = json.loads(cache.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    hit = entries.get(str(b))
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return int(hit["max_token_id"]), f"cached in {cache}"
    if not scan:
        return None, ""
    value = indexed.max_token_id(prefix)
    entries[str(b)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "max_token_id": value}
    try:
        checkpoints.write_json_atomic(cache, entries)
    except OSError:
        pass  # a read-only run folder fails the filesystem check already
    return value, f"scanned {b.name} (no manifest), cached in {cache}"


def _check_dataset(
    node: str, run: RunDir, prefix: Path, tok: toklib.TokenizerInfo | None, seq_len: int | None, scan: bool
) -> Finding:
    check = "data"
    try:
        tokens = indexed.IndexedDataset(prefix).num_tokens  # opening validates the index (indexed.validate)
    except (ValueError, OSError) as e:
        return Finding(
            node, check, False, str(e), "rebuild it with `titanenv preprocess`, or copy the .bin/.idx pair again"
        )
    try:
        manifest = manifestlib.check_tokenizer(prefix, tok) if tok is not None else manifestlib.read(prefix)
    except manifestlib.TokenizerMismatch as e:
        return Finding(node, check, False, str(e))  # the message says both tokenizers and the fix
    except ValueError as e:
        return Finding(node, check, False, str(e), "rerun `titanenv preprocess` for this prefix")
    window = (seq_len or 0) + 1
    if tokens < window:
        need = f"one training window of seq_len + 1 = {window} tokens" if seq_len else "a single token"
        return Finding(node, check, False, f"{indexed.bin_path(prefix)} holds {tokens} tokens, fewer than {need}",
                       "tokenize more text into it (`titanenv preprocess`), or pass a shorter --seq-len")  # fmt: skip
    windows = f", {(tokens - 1) // seq_len:,} windows of {seq_len}+1" if seq_len else ""
    parts = [f"{prefix}: {tokens:,} tokens{windows}"]
    if manifest is not None and tok is not None:
        parts.append("tokenizer matches its manifest")
    if tok is not None:
        biggest, source = max_token_id(run, prefix, manifest, scan=scan)
        if biggest is None:
            parts.append("token ids checked on the first node")
        elif biggest >= tok.vocab_size:
            return Finding(
                node, check, False,
                f"{indexed.bin_path(prefix)} holds token id {biggest} ({source}), but the tokenizer {tok.path} has "
                f"{tok.vocab_size} tokens (ids 0..{tok.vocab_size - 1}), and the model's vocabulary follows it",
                f"pass --tokenizer with the tokenizer the data was made with (at least {biggest + 1} tokens), "
                "or tokenize the data again with this one",
            )  # fmt: skip
        else:
            parts.append(f"largest token id {biggest} < {tok.vocab_size} tokens")
    return Finding(node, check, True, "; ".join(parts))


def check_data(
    node: str,
    run: RunDir,
    data: Sequence[Path],
    tokenizer: Path | None,
    *,
    seq_len: int | None = None,
    scan: bool = True,
) -> list[Finding]:
    """One finding per dataset prefix: its index, manifest tokenizer, size and token ids (see the module docstring).

    Args:
        node: this node's name.
        run: the run folder (``RUN/cache/`` holds scanned maxima).
        data: dataset prefixes; one whose ``.bin``/``.idx`` is missing is skipped (the assets check names it).
        tokenizer: the run's ``tokenizer.json`` or its folder (None: no tokenizer or token-id check).
        seq_len: tokens per sample; the data must hold ``seq_len + 1`` (None: at least one token).
        scan: compute a missing maximum token id by reading the ``.bin`` (False on all but the first node).
    """
    tok = None
    if tokenizer is not None:
        try:
            tok = toklib.load(tokenizer)
        except (OSError, ValueError):
            tok = None  # the assets check names the tokenizer's problem
    return [
        _check_dataset(node, run, Path(p), tok, seq_len, scan)
        for p in data
        if indexed.bin_path(p).is_file() and indexed.idx_path(p).is_file()
    ]


# ----------------------------------------------------------------------------- rendezvous


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _bind(node: str, host: str, port: int) -> tuple[socket.socket | None, Finding]:
    check = "rendezvous"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        return None, Finding(
            node,
            check,
            False,
            f"cannot resolve the rendezvous host {host!r}: {e}",
            "check the machine profile's rdzv_host template (`titanenv config show`) or pass --rdzv-host",
        )
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            return None, Finding(node, check, False, f"port {port} on {host} is already in use on {node}",
                                 "another job or service holds it; pass a free --rdzv-port")  # fmt: skip
        if e.errno == errno.EADDRNOTAVAIL:
            return None, Finding(
                node, check, False,
                f"the rendezvous host {host} ({address[0]}) is not an address of {node}, the first node of the job",
                "the rendezvous must name the first node: fix --rdzv-host or the machine profile's rdzv_host",
            )  # fmt: skip
        return None, Finding(
            node, check, False, f"cannot bind {host}:{port} on {node}: {e}", "pass another --rdzv-port"
        )
    return sock, Finding(node, check, True, f"{host}:{port} bound on {node}")


PROBE_TIMEOUT_S = 1.0
"""Seconds a node may take to connect to its own, bound rendezvous address."""


def _probe(sock: socket.socket, node: str, host: str, *, accept: bool) -> Finding | None:
    """Connect to the listening ``sock`` within :data:`PROBE_TIMEOUT_S`; None when that works.

    ``accept``: also take the connection off the queue (a single node; the first node of
    several leaves it to its store's server, which drops a client that sends nothing).
    """
    port = sock.getsockname()[1]
    try:
        with socket.create_connection(sock.getsockname()[:2], timeout=PROBE_TIMEOUT_S):
            if accept:
                sock.settimeout(PROBE_TIMEOUT_S)
                sock.accept()[0].close()
    except OSError as e:
        return Finding(
            node, "rendezvous", False,
            f"cannot connect to {host}:{port} on {node} although it is bound there ({e}): its network interface "
            "(loopback for one node) is down, so torchrun's rendezvous would retry for minutes and then fail",
            "bring the interface up (`ip link set lo up` for loopback); a job started under `unshare -n`, or in a "
            "container without a network, has none",
        )  # fmt: skip
    return None


def check_loopback(node: str, host: str = "localhost", port: int = 0) -> Finding:
    """Bind ``host:port`` (0: any free port) and connect to it within a second.

    ``torchrun --standalone`` meets at ``localhost`` and a single Slurm node at ``127.0.0.1``;
    with the loopback down (``unshare -n``) the bind works but the connection does not.
    """
    sock, bound = _bind(node, host, port)
    if sock is None:
        return bound
    try:
        sock.listen(1)
        failed = _probe(sock, node, host, accept=True)
        port = sock.getsockname()[1]
    finally:
        sock.close()
    return failed or Finding(node, "rendezvous", True, f"{host}:{port} bound and reachable on {node}")


def _key(*parts: object) -> str:
    """A key of the preflight store: ``titanenv-preflight-1/report/INDEX``, ``.../verdict``, ``.../taken/INDEX``,
    ``.../closing``."""
    return "/".join([PROTOCOL, *map(str, parts)])


def _message(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) and obj.get("protocol") == PROTOCOL else None


def _finding(obj: dict[str, Any]) -> Finding:
    return Finding(**{k: obj[k] for k in ("node", "check", "ok", "detail", "fix")})


def _failed(findings: list[Finding]) -> Report:
    return Report(False, findings, [f.line() for f in findings if not f.ok])


VERDICT_TAKEN_TIMEOUT_S = 5.0
"""Seconds the first node keeps the store open for the other nodes to read the verdict."""


def _reports(store: dist.TCPStore, cfg: PreflightConfig, deadline: float) -> dict[int, dict[str, Any]]:
    """Wait until every other node has set its report key, or the deadline; the reports that came, by node index."""
    keys = {i: _key("report", i) for i in range(1, cfg.nnodes)}
    if (left := deadline - time.monotonic()) > 0:
        try:
            store.wait(list(keys.values()), timedelta(seconds=left))
        except dist.DistError:
            pass  # the deadline: _verify names the missing nodes
    found = {i: _message(store.get(key)) for i, key in keys.items() if store.check([key])}
    return {i: report for i, report in found.items() if report is not None}


def serve(cfg: PreflightConfig, own: list[Finding], own_steps: list[int]) -> Report:
    """First node: collect every other node's findings, verify them, answer one verdict to all.

    The transport is a :class:`torch.distributed.TCPStore` served on the bound rendezvous
    address: each node sets its report under its node index and waits for the verdict key.
    The store is closed before this returns, so torchrun's c10d rendezvous can take the port.
    """
    host, port = _split_endpoint(cfg.rdzv_endpoint or "")
    sock, bound = _bind(cfg.node, host, port)
    findings = [*own, bound]
    if sock is None:
        return _failed(findings)
    deadline = time.monotonic() + cfg.timeout_s
    sock.listen(max(cfg.nnodes, 8))
    if (unreachable := _probe(sock, cfg.node, host, accept=False)) is not None:
        sock.close()  # the store's own client could not connect either; the other nodes time out naming the address
        return _failed([*findings, unreachable])
    try:
        store = dist.TCPStore(host, port, None, True, timedelta(seconds=cfg.timeout_s + VERDICT_TAKEN_TIMEOUT_S),
                              wait_for_workers=False, master_listen_fd=sock.detach())  # fmt: skip
    except RuntimeError as e:  # the store owns the socket now and has closed it
        failed = Finding(cfg.node, "rendezvous", False, f"cannot serve the preflight store on {host}:{port}: {e}",
                         "pass another --rdzv-port; the first node's lines in the job log say more")  # fmt: skip
        return _failed([*findings, failed])
    try:
        peers = _reports(store, cfg, deadline)
        findings += _verify(cfg, list(peers.values()), own_steps)
        ok = all(f.ok for f in findings)
        lines = [f.line() for f in findings if not f.ok]
        store.set(_key("verdict"), json.dumps({"protocol": PROTOCOL, "ok": ok, "lines": lines}))
        try:
            store.wait([_key("taken", i) for i in peers], timedelta(seconds=VERDICT_TAKEN_TIMEOUT_S))
        except dist.DistError:
            pass  # a node that did not take its verdict times out on its own
        # The others start torchrun only once this store is going away: their rendezvous agent must
        # not reach it on torchrun's port while a slow node is still taking its verdict.
        store.set(_key("closing"), "1")
    finally:
        del store  # stops the server: the port is free for torchrun
    return Report(ok, findings, lines)


def _verify(cfg: PreflightConfig, peers: list[dict[str, Any]], own_steps: list[int]) -> list[Finding]:
    out: list[Finding] = []
    arrived = {report["node"] for report in peers}
    if len(peers) < cfg.nnodes - 1:
        missing = [n for n in cfg.nodes if n not in arrived and n != cfg.node] or [
            f"{cfg.nnodes - 1 - len(peers)} node(s)"
        ]
        out.append(Finding(cfg.node, "rendezvous", False,
                           f"{', '.join(missing)} did not report to {cfg.rdzv_endpoint} within {cfg.timeout_s:.0f} s",
                           "see those nodes' lines in the job log; a node that cannot reach the first node "
                           "names the address it tried"))  # fmt: skip
    for report in peers:
        node = report["node"]
        out += [_finding(f) for f in report.get("findings", [])]
        probe = cfg.run.preflight / f"{node}.txt"
        try:
            visible = json.loads(probe.read_text()).get("node") == node
        except (OSError, json.JSONDecodeError):
            visible = False
        if not visible:
            out.append(
                Finding(
                    node,
                    "filesystem",
                    False,
                    f"{cfg.node} cannot see {probe}, which {node} wrote: the run folder is not shared",
                    "use an --output-dir on a filesystem mounted on all nodes (and bound into the container)",
                )
            )
        if report.get("checkpoints") != own_steps:
            out.append(
                Finding(
                    node,
                    "filesystem",
                    False,
                    f"{node} sees complete checkpoints {(report.get('checkpoints') or [])[:3]} "
                    f"but {cfg.node} sees {own_steps[:3]} in {cfg.run.checkpoints}",
                    "all nodes must see the same checkpoint folder (a shared filesystem)",
                )
            )
    if peers and all(f.ok for f in out):
        out.append(Finding(cfg.node, "rendezvous", True, f"all {cfg.nnodes} nodes reported to {cfg.rdzv_endpoint}"))
    return out


def _exchange(
    host: str, port: int, index: int, message: dict[str, Any], timeout_s: float
) -> tuple[dict[str, Any] | None, str]:
    """Set this node's report in the first node's store and take the verdict: ``(verdict, error)``.

    The store client runs in a daemon thread bounded by ``timeout_s``: a client of a port that
    another program holds waits for an answer that never comes. The verdict is None when none
    came; the error says why.
    """
    answers: list[tuple[dict[str, Any] | None, str]] = []

    def talk() -> None:
        try:
            store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
            store.set(_key("report", index), json.dumps(message))
            store.wait([_key("verdict")], timedelta(seconds=timeout_s))
            verdict = _message(store.get(_key("verdict")))
            store.set(_key("taken", index), "1")
            answers.append((verdict, "" if verdict else "not a preflight verdict"))
            with contextlib.suppress(Exception):  # the store closing under us is the answer too
                store.wait([_key("closing")], timedelta(seconds=VERDICT_TAKEN_TIMEOUT_S + 5))
        except Exception as e:  # noqa: BLE001 (closed, timed out, not a store: all mean no answer)
            answers.append((None, f"{type(e).__name__}: {e}"))

    thread = threading.Thread(target=talk, name="preflight-join", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answers[0] if answers else (None, f"no answer within {timeout_s:.0f} s")


def join(cfg: PreflightConfig, own: list[Finding], own_steps: list[int]) -> Report:
    """Any other node: send the findings to the first node's store and wait for the verdict."""
    host, port = _split_endpoint(cfg.rdzv_endpoint or "")
    fix = (
        "the first node must be reachable from every node at the rendezvous address: check --rdzv-host/--rdzv-port "
        "and the machine profile's rdzv_host (`titanenv config show`), and the first node's lines in the job log"
    )
    deadline = time.monotonic() + cfg.timeout_s
    last: Exception | None = None
    reached = False
    while not reached and (left := deadline - time.monotonic()) > 0:
        try:
            socket.create_connection((host, port), timeout=min(5.0, left)).close()
            reached = True
        except OSError as e:  # refused while the first node is still starting; unreachable; unresolvable
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    if not reached:
        f = Finding(
            cfg.node,
            "rendezvous",
            False,
            f"cannot reach the rendezvous {host}:{port} within {cfg.timeout_s:.0f} s (last error: {last})",
            fix,
        )
        return _failed([*own, f])
    message = {
        "protocol": PROTOCOL,
        "node": cfg.node,
        "findings": [asdict(f) for f in own],
        "checkpoints": own_steps,
    }
    # The verdict comes when the last node reported, at the latest at the first node's deadline
    # (its clock started a bit later or earlier).
    verdict, error = _exchange(
        host, port, cfg.node_index, message, max(1.0, deadline - time.monotonic()) + 1 + 0.25 * cfg.timeout_s
    )
    if verdict is None:
        f = Finding(
            cfg.node,
            "rendezvous",
            False,
            f"reached {host}:{port} but got no preflight answer ({error}): "
            "another program listens on this port, or the first node failed before answering",
            fix,
        )
        return _failed([*own, f])
    reached_finding = Finding(cfg.node, "rendezvous", True, f"reached {host}:{port}")
    return Report(bool(verdict["ok"]), [*own, reached_finding], list(verdict.get("lines", [])))


def run(cfg: PreflightConfig) -> Report:
    """Every check of this node, then the rendezvous check with the other nodes (see the module docstring)."""
    fs, steps = check_filesystem(cfg.node, cfg.run)
    own = [fs]
    if fs.ok:
        own.append(check_checkpoints(cfg.node, cfg.run, cfg.resume_from, cfg.trust_unmarked))
    own.append(check_torch(cfg.node))
    if cfg.gpus > 0:
        own.append(check_gpus(cfg.node, cfg.gpus))
    if cfg.assets:
        own += check_assets(cfg.node, cfg.tokenizer, cfg.data, cfg.model)
    # Cheap checks on every node; the token-id scan (data without a manifest) only on the first.
    own += check_data(cfg.node, cfg.run, cfg.data, cfg.tokenizer, seq_len=cfg.seq_len, scan=cfg.node_index == 0)
    if cfg.rdzv_endpoint is None:  # torchrun --standalone meets at localhost
        own.append(check_loopback(cfg.node))
        return Report(all(f.ok for f in own), own, [f.line() for f in own if not f.ok])
    if cfg.nnodes == 1:
        own.append(check_loopback(cfg.node, *_split_endpoint(cfg.rdzv_endpoint)))
        return Report(all(f.ok for f in own), own, [f.line() for f in own if not f.ok])
    return serve(cfg, own, steps) if cfg.node_index == 0 else join(cfg, own, steps)


# ----------------------------------------------------------------------------- in the training processes


def allreduce_check(timeout_s: float, device: torch.device, node: str) -> float:
    """All-reduce a one on every rank within ``timeout_s``; returns the seconds it took.

    Runs in every training process after ``init_process_group`` (NCCL on GPU, gloo on CPU).
    On a timeout or a wrong sum the process prints which node and rank failed and exits
    with :data:`PREFLIGHT_FAILED` (a hung collective cannot be cancelled from Python).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    what = f"preflight FAILED on {node}: all-reduce over {world} ranks ({backend}), rank {rank}"

    def give_up() -> None:
        print(
            f"{what}: no result after {timeout_s:.0f} s -- fix: check the interconnect settings "
            "(NCCL_SOCKET_IFNAME, NCCL_IB_*) and that every node runs the same image",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PREFLIGHT_FAILED)

    backstop = threading.Timer(timeout_s + 10, give_up)  # if wait() itself hangs
    backstop.daemon = True
    backstop.start()
    start = time.monotonic()
    try:
        t = torch.ones(1, device=device)
        work = dist.all_reduce(t, async_op=True)
        work.wait(timeout=timedelta(seconds=timeout_s))
        total = float(t.item())
    except Exception as e:  # noqa: BLE001 (any backend error ends the same way)
        print(f"{what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(PREFLIGHT_FAILED)
    finally:
        backstop.cancel()
    if total != world:
        print(f"{what}: the sum of ones is {total}, not {world}", file=sys.stderr, flush=True)
        os._exit(PREFLIGHT_FAILED)
    return time.monotonic() - start
