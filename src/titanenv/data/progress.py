"""Progress of a run: a rich bar on a terminal, a log line every ``interval`` seconds in a batch job.

Shows documents/s, tokens/s, input MB/s (bytes on disk) and the ETA from the input bytes left.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("titanenv.preprocess")


class Progress:
    """Call :meth:`update` with running totals; use as a context manager."""

    def __init__(self, total_bytes: int, interval: float = 30.0, tty: bool | None = None) -> None:
        self.total = max(total_bytes, 1)
        self.interval = interval
        self.start = self.last_log = time.monotonic()
        self.docs = self.tokens = self.bytes = 0
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self.bar = Bar(
                TextColumn("tokenizing"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("tokenize", total=self.total, rate="")

    def __enter__(self) -> Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar:
            self.bar.stop()

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        """Record running totals (documents read, tokens written, input bytes read)."""
        self.docs, self.tokens, self.bytes = docs, tokens, nbytes
        now = time.monotonic()
        if self.bar:
            self.bar.update(self.task, completed=min(nbytes, self.total), rate=self.rates(now))
        elif now - self.last_log >= self.interval:
            self.last_log = now
            eta = (now - self.start) * (self.total - nbytes) / max(nbytes, 1)
            log.info("%.1f%% %s, ETA %s", 100 * nbytes / self.total, self.rates(now), _hms(eta))

    def rates(self, now: float | None = None) -> str:
        dt = max((now or time.monotonic()) - self.start, 1e-9)
        return f"{self.docs / dt:,.0f} docs/s {self.tokens / dt:,.0f} tok/s {self.bytes / dt / 1e6:,.1f} MB/s"

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
