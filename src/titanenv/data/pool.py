"""Run pieces in this process (one worker) or in a pool of worker processes.

Workers write their own part files; the parent only receives each piece's counts and reads
progress from three shared counters (documents, tokens, input bytes).

Workers are forked when that is safe (Linux, and this process runs a single thread): they
inherit the tokenizer the parent has already loaded, so they start at once. Otherwise they are
spawned and load it themselves. The bytes written are the same either way.

Workers never outlive the parent: each asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``) and also watches its parent pid from a thread, since the kernel
sends that signal when the parent *thread* that forked it exits, and not at all on other
systems. SIGTERM or SIGINT of the parent stops every worker at once and exits with 128 + the
signal number; finished pieces are kept, and their leftovers are swept by the next run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, cast

import numpy as np

from titanenv import atomic
from titanenv.data import backends, worker
from titanenv.data.pieces import Piece
from titanenv.data.progress import Progress

log = logging.getLogger("titanenv.preprocess")
_PR_SET_PDEATHSIG = 1
_WATCH_S = 0.5  # how often a worker checks that its parent is alive
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkerDied(ChildProcessError):
    """A worker process was killed (signal, out of memory); finished pieces are kept for a rerun."""


class Stopped(SystemExit):
    """The parent got SIGTERM or SIGINT: every worker was stopped. ``code`` is 128 + the signal number."""


def _die_with(parent: int) -> None:
    """Make this worker process exit when process ``parent`` does (see the module docstring)."""
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watcher below still works
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="titanenv-parent-watch", daemon=True).start()


def _init(parent: int, counters: Any, tokenizer_json: str, backend: str) -> None:
    """Pool initializer: tie the worker's life to the parent's, then :func:`worker.init`."""
    _die_with(parent)
    # Ctrl-C reaches the whole process group; the parent decides, and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.init(counters, tokenizer_json, backend)


class Pool:
    """``with Pool(n, job) as pool: for index, counts in pool.execute(pieces, progress): ...``"""

    def __init__(self, n: int, job: worker.PieceJob) -> None:
        self.n = n
        self.job = job
        self.executor: ProcessPoolExecutor | None = None
        self.counters: Any = None  # a multiprocessing Array('q', 3) while workers run
        self.finished = 0
        self.todo = 0
        self._handlers: dict[int, Any] = {}

    def __enter__(self) -> Pool:
        if self.n < 1:
            return self  # nothing to tokenize
        self._catch_stop_signals()
        try:
            self._start()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _start(self) -> None:
        encoder_args = (self.job.backend, Path(self.job.tokenizer_json))
        backends.build(*encoder_args)  # load once here: forked workers inherit it, spawned ones report errors early
        if self.n > 1:
            ctx = _context()
            self.counters = ctx.Array("q", 3)
            self.executor = ProcessPoolExecutor(
                self.n,
                mp_context=ctx,
                initializer=_init,
                initargs=(os.getpid(), self.counters, self.job.tokenizer_json, self.job.backend),
            )
            self.executor.submit(int).result()  # start the workers now, before this process starts threads
            backends.release()  # the workers tokenize; the parent's copy only costs memory

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if self.executor and isinstance(exc, (Stopped, KeyboardInterrupt)):
                self._stop_workers()
                self.executor.shutdown(wait=False, cancel_futures=True)
            elif self.executor:
                self.executor.shutdown(wait=True, cancel_futures=True)
        finally:
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
            self._handlers.clear()
        if isinstance(exc, (Stopped, KeyboardInterrupt)):
            name = signal.Signals(cast(int, exc.code) - 128).name if isinstance(exc, Stopped) else "SIGINT"
            log.error(
                "stopped by %s: %d of %d pieces finished and are kept in %s: rerun the same command to resume",
                name,
                self.finished,
                self.todo,
                self.job.parts_dir,
            )

    def _catch_stop_signals(self) -> None:
        """SIGTERM/SIGINT stop the workers now and raise :class:`Stopped` here (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: object) -> None:
            self._stop_workers()
            raise Stopped(128 + signum)

        for signum in _STOP_SIGNALS:
            self._handlers[signum] = signal.signal(signum, stop)

    def _stop_workers(self) -> None:
        """SIGKILL every worker process and reap it; their temporary files are swept by the next run."""
        # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14.
        procs = list((getattr(self.executor, "_processes", None) or {}).values())
        for p in procs:
            try:
                p.kill()
            except (OSError, ValueError, AttributeError):
                pass  # already gone
        for p in procs:
            try:
                p.join(5)
            except (OSError, ValueError, AssertionError):
                pass

    def execute(self, todo: list[Piece], progress: Progress) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(piece index, counts)`` as pieces finish, in any order.

        Raises:
            WorkerDied: a worker process was killed; finished pieces stay for a rerun.
            Stopped: SIGTERM or SIGINT (``SystemExit`` with code 128 + signal); workers are stopped.
            atomic.DiskFull: the disk filled; the message adds an estimate of the space still needed.
            Whatever a piece raised (``BadDocument``, ``UnreadableInput``...).
        """
        if not todo:
            return
        if self.executor is None:
            yield from self._here(todo, progress)
            return
        pending = {self.executor.submit(worker.run, p, self.job) for p in todo}
        self.todo, self.finished = len(todo), 0
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            progress.update(*self.counters[:])
            for fut in done:
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    raise WorkerDied(
                        f"a worker process died (killed, or out of memory); {self.finished} of {len(todo)} pieces "
                        f"finished and are kept in {self.job.parts_dir}: rerun the same command to resume"
                    ) from None
                except atomic.DiskFull as e:
                    raise _with_estimate(e, todo, self.counters[:], self.job) from None
                self.finished += 1

    def _here(self, todo: list[Piece], progress: Progress) -> Iterator[tuple[int, dict[str, Any]]]:
        encoder = backends.build(self.job.backend, Path(self.job.tokenizer_json))
        totals = [0, 0, 0]

        def report(docs: int, tokens: int, nbytes: int) -> None:
            totals[0] += docs
            totals[1] += tokens
            totals[2] += nbytes
            progress.update(*totals)

        self.todo, self.finished = len(todo), 0
        for p in todo:
            try:
                yield p.index, worker.process(p, self.job, encoder, report)
            except atomic.DiskFull as e:
                raise _with_estimate(e, todo, totals, self.job) from None
            self.finished += 1


def _with_estimate(e: atomic.DiskFull, todo: list[Piece], counters: Any, job: worker.PieceJob) -> atomic.DiskFull:
    """``e`` plus the space the rest of the run needs, scaled from the bytes written per input byte so far."""
    docs, tokens, read = counters[:3]
    if tokens <= 0 or read <= 0:
        return e
    per_input_byte = (tokens * np.dtype(job.dtype).itemsize + 12 * docs) / read
    left = max(0, sum(p.size for p in todo) - read)
    more = int(per_input_byte * left)
    return atomic.DiskFull(
        e.errno,
        f"{e} (estimate: the {left} input bytes not yet tokenized need about {more} bytes more in "
        f"{job.parts_dir}, and the join then as much again as all the parts)",
    )


def _context() -> Any:  # a multiprocessing context (fork or spawn)
    # fork copies only the forking thread: with other threads alive, a lock they hold stays locked.
    if sys.platform == "linux" and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")
