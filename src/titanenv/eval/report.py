"""Tables and plots of the lm-eval matrix (:mod:`titanenv.eval.matrix`), each written atomically.

``results.csv`` and ``results.md`` hold one row per (model, step, task, shots, metric);
``plot_steps.png`` draws each metric against checkpoint step (a series of one run) and
``plot_shots.png`` against the few-shot count, where there is more than one point to draw.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from titanenv import atomic

__all__ = ["CSV_FILE", "MD_FILE", "SHOTS_PLOT", "STEPS_PLOT", "Row", "rich_table", "write_plots", "write_tables"]

CSV_FILE, MD_FILE = "results.csv", "results.md"
STEPS_PLOT, SHOTS_PLOT = "plot_steps.png", "plot_shots.png"


@dataclass(frozen=True)
class Row:
    """One metric of one cell of the matrix."""

    model: str
    step: int | None
    """Checkpoint step; None for a Hugging Face folder that is not a titanenv export."""
    task: str
    shots: int
    """Few-shot examples actually used (lm-eval's ``n-shot``)."""
    metric: str
    """lm-eval's metric name; a filter other than ``none`` follows in brackets: ``exact_match (strict-match)``."""
    value: float
    stderr: float | None
    """Standard error, where lm-eval gives one (not for perplexities)."""


def _cells(row: Row) -> list[str]:
    return [
        row.model,
        "" if row.step is None else str(row.step),
        row.task,
        str(row.shots),
        row.metric,
        f"{row.value:.6g}",
        "" if row.stderr is None else f"{row.stderr:.6g}",
    ]


def write_tables(rows: Sequence[Row], out: str | Path, *, notes: Iterable[str] = ()) -> tuple[Path, Path]:
    """Write ``OUT/results.csv`` and ``OUT/results.md`` (the notes as a list under the table).

    Returns:
        ``(csv path, markdown path)``.
    """
    out = Path(out)
    header = [f.name for f in fields(Row)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(_cells(r) for r in rows)
    csv_path = atomic.write_text(out / CSV_FILE, buf.getvalue())
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    md_path = atomic.write_text(out / MD_FILE, "\n".join(lines) + "\n")
    return csv_path, md_path


def rich_table(rows: Sequence[Row], title: str = "lm-eval results") -> Any:
    """The rows as a ``rich.table.Table`` (for a console's ``print``)."""
    from rich.table import Table

    table = Table(title=title)
    for f in fields(Row):
        right = f.name in ("step", "shots", "value", "stderr")
        table.add_column(f.name, justify="right" if right else "left", overflow="fold")
    for r in rows:
        table.add_row(*_cells(r))
    return table


def write_plots(rows: Sequence[Row], out: str | Path) -> list[Path]:
    """Plot each (task, metric) against step and against shots, where a line has two points or more.

    One subplot per (task, metric); in the steps plot one line per (model, shots), in the shots
    plot one per (model, step); error bars where lm-eval gives a standard error. PNG, matplotlib's
    Agg backend (no display needed).

    A plot of an earlier run that this one does not draw is removed (it would show stale results).

    Returns:
        The PNG files written (none when no line has two points).
    """
    written = []
    for x, line_key, name in (("step", ("model", "shots"), STEPS_PLOT), ("shots", ("model", "step"), SHOTS_PLOT)):
        series = _series(rows, x, line_key)
        if series:
            written.append(atomic.write_bytes(Path(out) / name, _figure(series, x)))
        else:
            (Path(out) / name).unlink(missing_ok=True)
    return written


Series = dict[tuple[str, str], dict[str, list[tuple[float, float, float | None]]]]


def _series(rows: Sequence[Row], x: str, line_key: tuple[str, str]) -> Series:
    """``{(task, metric): {line label: [(x, value, stderr)]}}``, only panels with a line of 2+ points."""
    panels: Series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        xv = getattr(r, x)
        if xv is None:
            continue
        a, b = (getattr(r, k) for k in line_key)
        label = f"{a} {line_key[1]} {b}" if b is not None else str(a)
        panels[(r.task, r.metric)][label].append((float(xv), r.value, r.stderr))
    return {
        k: {lab: sorted(pts) for lab, pts in v.items()}
        for k, v in panels.items()
        if any(len(p) > 1 for p in v.values())
    }


def _figure(series: Series, x: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on compute nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(series)
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.5 * cols, 3.4 * math.ceil(n / cols)), squeeze=False)
    for ax, ((task, metric), lines) in zip(axes.flat, sorted(series.items()), strict=False):
        for label, points in sorted(lines.items()):
            xs, ys, errs = zip(*points, strict=True)
            yerr = [e or 0.0 for e in errs] if any(e is not None for e in errs) else None
            ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=label)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
