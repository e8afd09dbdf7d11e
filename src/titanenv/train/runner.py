"""One node's part of a training run: provenance, preflight, torchrun, signals, exit code.

``titanenv train`` calls :func:`run_node` once per node (``srun --ntasks-per-node=1``).
The steps, in order:

1. the first node (``SLURM_NODEID`` 0, or the only node) records provenance
   (:class:`titanenv.train.provenance.Recorder`);
2. every node runs the preflight (:func:`titanenv.train.preflight.run`); on failure all
   nodes exit with :data:`~titanenv.train.preflight.PREFLIGHT_FAILED` before torchrun
   (with ``--no-preflight`` the checkpoint guard still runs); with ``--trust-unmarked`` the
   first node then marks the checked ``--resume-from`` checkpoint complete;
3. torchrun starts with SIGUSR1 *ignored* (its agent would die of it; the training
   processes install their own handler);
4. while it runs, SIGUSR1 to this process creates the stop file (so ``scancel
   --signal=USR1`` on the step works too) and SIGTERM/SIGINT are passed on to torchrun;
5. the exit code: torchrun's when it failed; :data:`STOPPED` when training checkpointed
   and stopped early on request (``status.json`` says ``stopped``); else 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from titanenv import config as configlib
from titanenv.slurmenv import SlurmEnv
from titanenv.train import checkpoints, control, preflight
from titanenv.train import job as joblib
from titanenv.train.exitcodes import ExitCode
from titanenv.train.job import NodeRun
from titanenv.train.provenance import Recorder
from titanenv.train.rundir import stage_tokenizer
from titanenv.train.settings import TrainArgs

__all__ = ["STOPPED", "exit_code", "plan_here", "run_here", "run_node"]

STOPPED = ExitCode.STOPPED
"""Exit code of ``titanenv train`` when training checkpointed and stopped before its planned steps
(EX_TEMPFAIL: try again). The sbatch script requeues the job on it."""


def exit_code(torchrun_rc: int, status: dict[str, Any] | None) -> int:
    """``titanenv train``'s exit code from torchrun's and the status rank 0 wrote."""
    if torchrun_rc != 0:
        return torchrun_rc
    return STOPPED if status and status.get("state") == "stopped" else 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _preflight(job: NodeRun) -> bool:
    cfg = preflight.PreflightConfig(
        node=job.node,
        node_index=job.node_index,
        nodes=job.plan.nodes,
        nnodes=job.plan.nnodes,
        rdzv_endpoint=job.plan.rdzv_endpoint,
        run=job.run,
        gpus=job.gpus,
        tokenizer=job.tokenizer,
        data=job.data,
        model=job.base_model,
        timeout_s=job.args.preflight_timeout_s,
        seq_len=job.seq_len,
        resume_from=job.args.resume_from,
        trust_unmarked=job.args.trust_unmarked,
    )
    report = preflight.run(cfg)
    for finding in report.findings:
        if finding.ok:
            _say(finding.line())
    for line in report.lines:
        _say(line)
    if not report.ok:
        _say(f"preflight failed: {job.node} does not start training (exit {preflight.PREFLIGHT_FAILED})")
    return report.ok


def _checkpoint_guard(job: NodeRun) -> bool:
    """With --no-preflight, still refuse to train over checkpoints that are not ours to overwrite."""
    finding = preflight.check_checkpoints(job.node, job.run, job.args.resume_from, job.args.trust_unmarked)
    _say(finding.line())
    if not finding.ok:
        _say(f"preflight failed: {job.node} does not start training (exit {preflight.PREFLIGHT_FAILED})")
    return finding.ok


def _trust(job: NodeRun) -> bool:
    """--trust-unmarked: the first node marks the checked checkpoint complete before torchrun starts."""
    if not job.args.trust_unmarked or job.args.resume_from is None or job.node_index != 0:
        return True
    guard = checkpoints.guard(job.run.checkpoints, job.args.resume_from, job.args.trust_unmarked)
    if guard.trust is None:
        return guard.ok  # already complete (a requeued attempt): nothing to mark
    try:
        path = checkpoints.trust(guard.trust, job=SlurmEnv.from_env().job_id or "")
    except (OSError, ValueError) as e:
        _say(f"preflight FAILED on {job.node}: checkpoints: {e}")
        return False
    _say(f"checkpoints: --trust-unmarked: marked {guard.trust.path} complete ({path.name}); resuming from it")
    return True


def _torchrun(job: NodeRun) -> int:
    def on_usr1(signum: int, frame: object) -> None:
        _say(f"titanenv train on {job.node}: SIGUSR1: asking training to checkpoint and stop ({job.stop_file})")
        job.stop_file.parent.mkdir(parents=True, exist_ok=True)
        job.stop_file.touch()

    _say(f"+ {' '.join(job.command)}")
    # Ignored while torchrun starts: SIG_IGN survives fork and exec (a Python handler would not), so
    # torchrun's agent ignores USR1 instead of dying of it; the training processes install their own handler.
    previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, signal.SIG_IGN)}
    try:
        proc = subprocess.Popen(list(job.command), env=dict(job.env))
    finally:
        signal.signal(signal.SIGUSR1, on_usr1)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)  # torchrun's agent stops its workers on TERM/INT

    previous.update({s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)})
    try:
        return proc.wait()  # PEP 475: the handlers above do not interrupt the wait
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_node(job: NodeRun) -> int:
    """Run this node's share (see the module docstring); returns the exit code for ``titanenv train``."""
    recorder = Recorder(job.run, os.environ) if job.node_index == 0 else None
    if recorder is not None:
        path = recorder.start(
            command=job.command, plan=job.plan, data=job.data, site=job.site, worker_env=job.env, settings=job.settings
        )
        _say(f"provenance: {path}")
    if not (_preflight(job) if job.args.preflight else _checkpoint_guard(job)) or not _trust(job):
        if recorder is not None:
            recorder.finish(exit_code=preflight.PREFLIGHT_FAILED, status={"state": "preflight failed"})
        return preflight.PREFLIGHT_FAILED
    rc = _torchrun(job)
    status = control.read_status(job.run.status)
    code = exit_code(rc, status)
    if code == STOPPED:
        assert status is not None  # STOPPED comes from the status file
        _say(f"training stopped at step {status['step']} of {status['steps']} on request; exit {STOPPED} (requeue)")
    if recorder is not None:
        recorder.finish(exit_code=code, status=status)
    return code


def plan_here(args: TrainArgs, site: configlib.Resolved | None, *, stage: bool = False) -> NodeRun:
    """This node's launch of ``args`` in this process's environment (a Slurm step, or one local node).

    ``stage``: copy the tokenizer into ``OUTPUT/tokenizer/`` first (a dry run does not).
    """
    import torch

    tokenizer_dir = stage_tokenizer(args.tokenizer, args.output_dir) if stage else args.output_dir / "tokenizer"
    return joblib.node_run(args, env=dict(os.environ), cuda_devices=torch.cuda.device_count(), site=site,
                           tokenizer_dir=tokenizer_dir)  # fmt: skip


def run_here(args: TrainArgs, site: configlib.Resolved | None) -> tuple[int, NodeRun]:
    """Stage the tokenizer, plan this node's launch and run it (:func:`run_node`).

    Returns:
        ``(exit code, the node's launch)``: 0, :data:`STOPPED`, :data:`~titanenv.train.preflight.PREFLIGHT_FAILED`
        or torchrun's exit code.

    Raises:
        FileNotFoundError: no tokenizer at ``args.tokenizer``.
    """
    node = plan_here(args, site, stage=True)
    return run_node(node), node
