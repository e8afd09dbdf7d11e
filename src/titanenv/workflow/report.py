"""Comparison report of runs trained side by side (an Infini-attention Llama and its baseline).

:func:`write_report` reads, for each model, what the other stages left in its run folder::

    RUN/tb/<timestamp>/events.out.tfevents.*   TorchTitan's scalars (loss, throughput, Infini gates);
                                                the folder is metrics.save_tb_folder of the config record
    RUN/trainer_config.json                     TorchTitan's config record (batch, seq_len, parallelism)
    RUN/provenance/ATTEMPT/provenance.json      launch: nnodes x nproc_per_node (the world size)
    RUN/eval.json                               `titanenv eval --data`: overall validation loss
    RUN/loss_by_position.json                   `titanenv eval --data --by-position`: loss per position bucket
    RUN/eval/passkey/passkey.json               passkey accuracy per (depth, length)

and writes, atomically, into ``OUT``: ``report.md`` (tables, the ``tensorboard`` command, links to
the images), ``report.png`` (all panels in one figure) and each panel alone (``loss.png``,
``gates.png``, ``passkey.png``, ``loss_by_position.png``; a panel with no data for any model is
not written, and a stale copy from an earlier report is removed). The training loss is required;
every other input may be missing, and the report then says "not available" for that part.
The markdown holds nothing that the inputs do not carry (no clock times), so the same inputs
give the same bytes.

Tokens on the x axis: ``step x tokens per step``, with tokens per step
``training.global_batch_size x seq_len`` when the global batch is set, else
``local_batch_size x seq_len x data-parallel ranks``. The ranks are
``data_parallel_replicate_degree x data_parallel_shard_degree``; a shard degree of -1 (TorchTitan's
"the rest") is ``world size / (tensor x pipeline x context parallel degrees)``, the world size from
the provenance record, else assumed 1 (the report says so). TorchTitan's own ``n_tokens_seen``
scalar, where present, is compared with the result and a mismatch is noted.

Usage::

    python -m titanenv.workflow.report --run baseline=RUN_A --run infini=RUN_B --out OUT
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import shlex
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure
from tensorboard.backend.event_processing import event_accumulator  # type: ignore[import-untyped]

from titanenv import atomic

__all__ = [
    "GATE_MEAN_TAG",
    "GATE_TAG",
    "LOSS_TAG",
    "TPS_TAG",
    "ModelData",
    "ReportFiles",
    "load_model",
    "main",
    "read_scalars",
    "write_report",
]

LOSS_TAG = "loss_metrics/global_avg_loss"
"""TorchTitan's training loss (``MetricsProcessor.log``), nats per token."""
TPS_TAG = "throughput(tps)"
"""TorchTitan's throughput: tokens per second per device."""
TOKENS_TAG = "n_tokens_seen"
"""TorchTitan's count of tokens trained on, summed over data-parallel ranks (float32 in TensorBoard)."""
VAL_TAG = "validation_metrics/loss"
"""TorchTitan's validator loss, when the run validated while training."""
GATE_TAG = re.compile(r"^infini/gate/(?P<layer>.+)/head(?P<head>\d+)$")
"""``infini/gate/layers.{i}/head{h}``: ``sigmoid(beta)`` of one head, 0..1."""
GATE_MEAN_TAG = re.compile(r"^infini/gate_mean/(?P<layer>.+)$")
"""``infini/gate_mean/layers.{i}``: mean ``sigmoid(beta)`` over the heads of one layer."""

CONFIG_FILE = "trainer_config.json"  # titanenv.train.recipes.CONFIG_RECORD
EVAL_FILE = "eval.json"  # titanenv.eval.loss.EVAL_FILE
POSITION_FILE = Path("loss_by_position.json")  # beside eval.json, as `titanenv eval --data --by-position` writes it
PASSKEY_FILE = Path("eval") / "passkey" / "passkey.json"
PANELS = ("loss", "gates", "passkey", "loss_by_position")
NA = "not available"
PASSKEY_CMAP = "RdYlGn"

Series = dict[int, float]
"""Scalar values by step."""


@dataclass(frozen=True)
class ReportFiles:
    """Paths :func:`write_report` wrote; a panel with no data for any model is None."""

    markdown: Path
    figure: Path
    """``report.png``: every panel in one figure."""
    loss: Path
    gates: Path | None
    passkey: Path | None
    loss_by_position: Path | None


@dataclass
class ModelData:
    """What one run folder holds, as the report uses it (see :func:`load_model`)."""

    name: str
    run: Path
    tb: Path
    """TensorBoard folder: ``RUN/`` + ``metrics.save_tb_folder`` of the config record (default ``tb``)."""
    loss: Series
    tokens_per_step: int | None
    """None when ``trainer_config.json`` is missing: the x axis then uses ``n_tokens_seen``."""
    tokens_seen: Series
    """TorchTitan's ``n_tokens_seen`` by step (empty when not logged)."""
    tps: Series
    gates: dict[str, dict[int, Series]]
    """``{layer: {head: sigmoid(beta) by step}}``, layers in natural order; empty for a baseline."""
    gate_means: dict[str, Series]
    recipe: str | None = None
    validation: tuple[float, str] | None = None
    """(loss in nats/token, where it came from)."""
    positions: dict[str, Any] | None = None
    passkey: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def final_step(self) -> int:
        return max(self.loss)

    def tokens_at(self, step: int) -> float:
        """Tokens trained on after ``step`` (by the formula, else TorchTitan's ``n_tokens_seen``)."""
        if self.tokens_per_step is not None:
            return float(step * self.tokens_per_step)
        return self.tokens_seen.get(step, math.nan)


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def read_scalars(tb: Path) -> dict[str, Series]:
    """Every scalar under ``tb`` (TorchTitan's ``RUN/tb``), merged over its timestamped folders.

    Each folder holding event files is read with TensorBoard's ``EventAccumulator`` (all points, no
    sampling), in path order (TorchTitan names them ``%Y%m%d-%H%M``, so that is start order). A later
    folder replaces an earlier one's points of a tag from its own first step of that tag on, as after
    a resume from a checkpoint older than the crash (TensorBoard's orphan purge does the same).

    Returns:
        ``{tag: {step: value}}``, empty when there are no event files.
    """
    folders = sorted({p.parent for p in tb.rglob("events.out.tfevents*")}, key=lambda p: _natural(str(p)))
    merged: dict[str, Series] = {}
    for folder in folders:
        acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
            first = min(points)
            kept = {s: v for s, v in merged.get(tag, {}).items() if s < first}
            merged[tag] = dict(sorted({**kept, **points}.items()))
    return merged


def _read_json(path: Path) -> Any:
    """``path`` parsed, or None when it does not exist.

    Raises:
        ValueError: the file is not valid JSON (naming it).
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _world_size(run: Path, notes: list[str]) -> int | None:
    """``nnodes x nproc_per_node`` of the run's provenance records (the latest start), or None."""
    starts = []
    for path in sorted((run / "provenance").glob("*/provenance.json")):
        record = _read_json(path) or {}
        launch = record.get("launch") or {}
        if "nnodes" in launch and "nproc_per_node" in launch:
            starts.append((str(record.get("start") or ""), int(launch["nnodes"]) * int(launch["nproc_per_node"])))
    if not starts:
        return None
    sizes = sorted({w for _, w in starts})
    if len(sizes) > 1:
        notes.append(f"world size changed between starts ({', '.join(map(str, sizes))}); tokens use the latest start")
    return max(starts)[1]


def _tokens_per_step(run: Path, cfg: Mapping[str, Any], notes: list[str]) -> int:
    """Tokens of one optimizer step from TorchTitan's config record (formula in the module docstring)."""
    training, par = cfg.get("training") or {}, cfg.get("parallelism") or {}
    seq_len = int(training["seq_len"])
    if int(training.get("global_batch_size", -1)) > 0:
        return int(training["global_batch_size"]) * seq_len
    replicate = int(par.get("data_parallel_replicate_degree", 1))
    shard = int(par.get("data_parallel_shard_degree", -1))
    if shard > 0:
        ranks = replicate * shard
    else:
        world = _world_size(run, notes)
        if world is None:
            world = 1
            notes.append("world size not recorded (no provenance/*/provenance.json with launch): assumed 1 rank")
        other = math.prod(int(par.get(k, 1)) for k in ("tensor_parallel_degree", "pipeline_parallel_degree",
                                                       "context_parallel_degree"))  # fmt: skip
        ranks = max(1, world // other)
    return int(training["local_batch_size"]) * seq_len * ranks


def _gates(scalars: Mapping[str, Series]) -> tuple[dict[str, dict[int, Series]], dict[str, Series]]:
    heads: dict[str, dict[int, Series]] = {}
    means: dict[str, Series] = {}
    for tag, series in scalars.items():
        if m := GATE_TAG.match(tag):
            heads.setdefault(m["layer"], {})[int(m["head"])] = series
        elif m := GATE_MEAN_TAG.match(tag):
            means[m["layer"]] = series
    order = sorted(heads, key=_natural)
    return (
        {layer: dict(sorted(heads[layer].items())) for layer in order},
        {layer: means[layer] for layer in sorted(means, key=_natural)},
    )


def _validation(
    run: Path, scalars: Mapping[str, Series], positions: Mapping[str, Any] | None
) -> tuple[float, str] | None:
    evaluated = _read_json(run / EVAL_FILE)
    if evaluated is not None and "loss" in evaluated:
        return float(evaluated["loss"]), f"`{EVAL_FILE}`, step {evaluated.get('step', '?')}"
    if scalars.get(VAL_TAG):
        step = max(scalars[VAL_TAG])
        return scalars[VAL_TAG][step], f"TensorBoard `{VAL_TAG}`, step {step}"
    if positions and positions.get("loss"):
        return statistics.fmean(positions["loss"]), f"mean of the position buckets of `{POSITION_FILE}`"
    return None


def _passkey(path: Path) -> dict[str, Any] | None:
    """``passkey.json`` checked: ``accuracy`` is ``len(depths)`` rows of ``len(lengths)`` values in 0..1.

    Raises:
        ValueError: another shape or range, or not valid JSON (naming the file).
    """
    data = _read_json(path)
    if data is None:
        return None
    try:
        acc, lengths, depths = data["accuracy"], data["lengths"], data["depths"]
        ok = len(acc) == len(depths) and all(len(r) == len(lengths) and all(0 <= v <= 1 for v in r) for r in acc)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: needs lists 'lengths', 'depths' and 'accuracy' ({e})") from e
    if not ok or not acc:
        raise ValueError(f"{path}: 'accuracy' must be {len(depths)} rows (depths) of {len(lengths)} values in 0..1")
    return dict(data)


def load_model(name: str, run: Path) -> ModelData:
    """Read one run folder (layout in the module docstring).

    Raises:
        FileNotFoundError: no TensorBoard scalar ``loss_metrics/global_avg_loss`` under ``RUN/tb``, or
            neither ``trainer_config.json`` nor ``n_tokens_seen`` to count tokens (naming the folder).
        ValueError: an input file is not valid JSON, or ``trainer_config.json`` lacks ``training.seq_len``
            or ``training.local_batch_size``.
    """
    run = Path(run).resolve()
    cfg = _read_json(run / CONFIG_FILE)
    # TorchTitan writes to dump_folder/metrics.save_tb_folder: `titanenv workflow --tensorboard-dir` makes it absolute.
    tb = run / str(((cfg or {}).get("metrics") or {}).get("save_tb_folder") or "tb")
    scalars = read_scalars(tb)
    if not scalars.get(LOSS_TAG):
        raise FileNotFoundError(
            f"{run}: no TensorBoard scalar {LOSS_TAG!r} under {tb} "
            "(did training run with metrics.enable_tensorboard, and is this its --output-dir?)"
        )
    notes: list[str] = []
    tokens_seen = scalars.get(TOKENS_TAG, {})
    per_step: int | None = None
    if cfg is not None:
        try:
            per_step = _tokens_per_step(run, cfg, notes)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{run / CONFIG_FILE}: no training.seq_len / training.local_batch_size ({e})") from e
    elif tokens_seen:
        notes.append(f"no {CONFIG_FILE}: tokens are TorchTitan's n_tokens_seen")
    else:
        raise FileNotFoundError(f"{run}: no {CONFIG_FILE} and no {TOKENS_TAG!r} scalar: cannot count tokens")
    gates, means = _gates(scalars)
    positions = _read_json(run / POSITION_FILE)
    data = ModelData(
        name=name,
        run=run,
        tb=tb,
        loss=scalars[LOSS_TAG],
        tokens_per_step=per_step,
        tokens_seen=tokens_seen,
        tps=scalars.get(TPS_TAG, {}),
        gates=gates,
        gate_means=means,
        recipe=(cfg or {}).get("recipe"),
        validation=_validation(run, scalars, positions),
        positions=positions,
        passkey=_passkey(run / PASSKEY_FILE),
        notes=notes,
    )
    step = data.final_step
    if per_step is not None and step in tokens_seen:
        logged, counted = tokens_seen[step], step * per_step
        if abs(logged - counted) > 0.01 * counted:
            notes.append(
                f"TorchTitan's n_tokens_seen at step {step} is {logged:,.0f} but the formula gives {counted:,}: "
                "check the data-parallel ranks"
            )
    return data


# ---- figures ---------------------------------------------------------------------------------------------------


Canvas = Figure | SubFigure


def _not_available(canvas: Canvas, title: str, why: str) -> None:
    ax = canvas.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, f"{NA}\n({why})", ha="center", va="center", color="grey", transform=ax.transAxes)


def _draw_loss(canvas: Canvas, models: Sequence[ModelData]) -> None:
    ax = canvas.add_subplot()
    for m in models:
        steps = sorted(m.loss)
        ax.plot([m.tokens_at(s) for s in steps], [m.loss[s] for s in steps], label=m.name)
    ax.set_xlabel("tokens")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()


def _final_gates(m: ModelData) -> dict[str, list[float]]:
    """``{layer: final sigmoid(beta) per head}`` (the value at each head's last logged step)."""
    return {layer: [s[max(s)] for s in heads.values()] for layer, heads in m.gates.items()}


def _draw_gates(canvas: Canvas, models: Sequence[ModelData]) -> None:
    gated = [m for m in models if m.gates]
    if not gated:
        _not_available(canvas, "Infini gates sigmoid(β)", "no infini/gate scalars")
        return
    rows = canvas.subfigures(len(gated), 1, squeeze=False)[:, 0]
    for row, m in zip(rows, gated, strict=True):
        final = _final_gates(m)
        ax_mean, ax_hist, ax_map = row.subplots(1, 3)
        for layer, series in (m.gate_means or {}).items():
            steps = sorted(series)
            ax_mean.plot([m.tokens_at(s) for s in steps], [series[s] for s in steps], label=layer)
        ax_mean.set(title="mean per layer", xlabel="tokens", ylabel="sigmoid(β)", ylim=(0, 1))
        if m.gate_means:
            ax_mean.legend(fontsize=6, ncol=2)
        ax_hist.hist([v for vals in final.values() for v in vals], bins=20, range=(0, 1))
        ax_hist.set(title="final, all heads", xlabel="sigmoid(β)", ylabel="heads")
        width = max(len(v) for v in final.values())
        grid = [vals + [math.nan] * (width - len(vals)) for vals in final.values()]
        image = ax_map.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax_map.set(title="final, layer x head", xlabel="head", ylabel="layer")
        ax_map.set_yticks(range(len(final)), list(final), fontsize=6)
        ax_map.set_xticks(range(width))
        row.colorbar(image, ax=ax_map)
        row.suptitle(f"{m.name}: Infini gates sigmoid(β)")


def _draw_passkey(canvas: Canvas, models: Sequence[ModelData]) -> None:
    tested = [m for m in models if m.passkey]
    if not tested:
        _not_available(canvas, "Passkey retrieval", f"no {PASSKEY_FILE}")
        return
    axes = canvas.subplots(1, len(tested), squeeze=False)[0]
    for ax, m in zip(axes, tested, strict=True):
        p = m.passkey or {}
        acc = p["accuracy"]
        ax.imshow(acc, vmin=0, vmax=1, cmap=PASSKEY_CMAP, aspect="auto", origin="lower")
        ax.set_xticks(range(len(p["lengths"])), [str(n) for n in p["lengths"]], rotation=45, fontsize=7)
        ax.set_yticks(range(len(p["depths"])), [f"{d}%" for d in p["depths"]], fontsize=7)
        for i, row in enumerate(acc):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        step = f", step {p['step']}" if p.get("step") is not None else ""
        ax.set(title=f"{m.name}{step}", xlabel="context length (tokens)", ylabel="passkey depth")
    shared = ScalarMappable(Normalize(0, 1), cmap=PASSKEY_CMAP)  # one 0..1 scale for every model
    canvas.colorbar(shared, ax=list(axes), label="accuracy")
    canvas.suptitle("Passkey retrieval accuracy")


def _draw_positions(canvas: Canvas, models: Sequence[ModelData]) -> None:
    measured = [m for m in models if m.positions and m.positions.get("loss")]
    if not measured:
        _not_available(canvas, "Validation loss by position", f"no {POSITION_FILE}")
        return
    ax = canvas.add_subplot()
    for m in measured:
        p = m.positions or {}
        centres = [(lo + hi) / 2 for lo, hi in p["buckets"]]
        ax.plot(centres, p["loss"], marker="o", label=m.name)
    ax.set_xlabel("position in the sequence (tokens, bucket centre)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss by position")
    ax.grid(alpha=0.3)
    ax.legend()


DRAW: dict[str, Callable[[Canvas, Sequence[ModelData]], None]] = {
    "loss": _draw_loss,
    "gates": _draw_gates,
    "passkey": _draw_passkey,
    "loss_by_position": _draw_positions,
}


def _has(m: ModelData, panel: str) -> bool:
    """Whether model ``m`` has data for ``panel`` (one of :data:`PANELS`)."""
    parts = {
        "loss": m.loss,
        "gates": m.gates,
        "passkey": m.passkey,
        "loss_by_position": (m.positions or {}).get("loss"),
    }
    return bool(parts[panel])


def _available(models: Sequence[ModelData]) -> dict[str, bool]:
    return {name: any(_has(m, name) for m in models) for name in PANELS}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _panel(name: str, models: Sequence[ModelData]) -> bytes:
    rows = sum(1 for m in models if m.gates) if name == "gates" else 1
    fig = Figure(figsize=(13 if name == "gates" else 7, 3.8 * max(1, rows)), layout="constrained")
    DRAW[name](fig, models)
    return _png(fig)


def _overview(models: Sequence[ModelData], title: str) -> bytes:
    fig = Figure(figsize=(16, 11), layout="constrained")
    fig.suptitle(title)
    cells = fig.subfigures(2, 2, squeeze=False)
    for canvas, name in zip(cells.flat, PANELS, strict=True):
        DRAW[name](canvas, models)
    return _png(fig)


# ---- markdown --------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def logdir_spec(models: Sequence[ModelData]) -> str:
    """``tensorboard --logdir_spec=NAME:TB,...`` (each run's TensorBoard folder, absolute, shell-quoted)."""
    spec = ",".join(f"{m.name}:{m.tb}" for m in models)
    return f"tensorboard --logdir_spec={shlex.quote(spec)}"


def _summary(m: ModelData) -> list[str]:
    step = m.final_step
    tokens = m.tokens_at(step)
    tps = [v for s, v in m.tps.items() if s != 1 or len(m.tps) == 1]  # step 1 includes warm-up and compile
    rows = [
        ("recipe", f"`{m.recipe}`" if m.recipe else NA),
        ("steps", f"{step:,}"),
        (f"final training loss (step {step})", f"{m.loss[step]:.4f}"),
        ("final validation loss", f"{m.validation[0]:.4f} ({m.validation[1]})" if m.validation else NA),
        ("tokens seen", f"{tokens:,.0f}" + (f" ({m.tokens_per_step:,} per step)" if m.tokens_per_step else "")),
        ("median throughput (tokens/s per device)", f"{statistics.median(tps):,.0f}" if tps else NA),
        ("passkey mean accuracy", _passkey_mean(m)),
    ]
    if m.gates:
        every = [v for vals in _final_gates(m).values() for v in vals]
        rows.append(("final gate sigmoid(β), mean over heads", f"{statistics.fmean(every):.3f} ({len(every)} heads)"))
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in rows]
    return lines


def _passkey_mean(m: ModelData) -> str:
    if not m.passkey:
        return NA
    cells = [v for row in m.passkey["accuracy"] for v in row]
    return f"{statistics.fmean(cells):.3f} ({len(cells)} cells, {m.passkey.get('trials', '?')} trials each)"


def _gate_table(m: ModelData) -> list[str]:
    lines = [f"**{m.name}** (final values)", "", "| layer | heads | mean | min | max |", "|---|---|---|---|---|"]
    for layer, vals in _final_gates(m).items():
        lines.append(f"| {layer} | {len(vals)} | {statistics.fmean(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")
    return lines


def _markdown(models: Sequence[ModelData], title: str, available: Mapping[str, bool]) -> str:
    out = [f"# {title}", "", "| model | run folder |", "|---|---|"]
    out += [f"| {m.name} | `{m.run}` |" for m in models]
    out += ["", "TensorBoard, all runs side by side:", "", "```sh", logdir_spec(models), "```", ""]
    out += ["![all panels](report.png)", "", "## Summary", ""]
    for m in models:
        out += [f"### {m.name}", "", *_summary(m), ""]
    sections = {
        "loss": ("Training loss", "x axis: tokens trained on (see the notes for how they are counted)."),
        "gates": ("Infini gates", "sigmoid(β) per head: the share of the memory read in each head's output."),
        "passkey": ("Passkey retrieval", "Accuracy per passkey depth and context length; colour scale 0..1."),
        "loss_by_position": ("Validation loss by position", "Mean loss of the tokens in each position bucket."),
    }
    for name, (heading, caption) in sections.items():
        out += [f"## {heading}", ""]
        if not available[name]:
            out += [f"{NA}: no run has {_source(name)}.", ""]
            continue
        out += [caption, "", f"![{heading}]({name}.png)", ""]
        missing = [m.name for m in models if not _has(m, name)]
        if missing:
            out += [f"{NA} for {', '.join(missing)} (no {_source(name)}).", ""]
        if name == "gates":
            for m in models:
                if m.gates:
                    out += [*_gate_table(m), ""]
    notes = [f"{m.name}: {n}" for m in models for n in m.notes]
    out += ["## Notes", ""]
    out += [
        "- tokens = step x local_batch_size x seq_len x data-parallel ranks "
        "(or x global_batch_size x seq_len when that is set), from each run's trainer_config.json",
        "- throughput: the median of TorchTitan's `throughput(tps)` over the logged steps after step 1",
    ]
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _source(name: str) -> str:
    return {
        "loss": f"`{LOSS_TAG}`",
        "gates": "`infini/gate/LAYER/headH` scalars",
        "passkey": f"`{PASSKEY_FILE}`",
        "loss_by_position": f"`{POSITION_FILE}`",
    }[name]


def write_report(runs: Mapping[str, Path], out: Path, *, title: str = "Infini-attention vs baseline") -> ReportFiles:
    """Read each run folder and write the comparison report into ``out`` (created if needed).

    Args:
        runs: model name -> run folder (``titanenv train --output-dir``), in the order to show them.
            Names appear in the legends and in ``--logdir_spec``, so they cannot hold ``,`` or ``:``.
        out: folder for ``report.md``, ``report.png`` and the panel PNGs.
        title: heading of the markdown and of the overview figure.

    Raises:
        ValueError: no runs, a name with ``,``/``:``/newline or empty, or an input that is not valid JSON.
        FileNotFoundError: a run without the TensorBoard training loss (naming its folder).
    """
    if not runs:
        raise ValueError("write_report: no runs given")
    for name in runs:
        if not name or re.search(r"[,:\n|]", name):
            raise ValueError(f"model name {name!r}: use a non-empty name without ',', ':', '|' or newlines")
    models = [load_model(name, Path(run)) for name, run in runs.items()]
    out = Path(out)
    available = _available(models)
    paths: dict[str, Path | None] = {}
    for name in PANELS:
        path = out / f"{name}.png"
        if available[name]:
            paths[name] = atomic.write_bytes(path, _panel(name, models))
        else:
            path.unlink(missing_ok=True)  # a stale panel of an earlier report
            paths[name] = None
    return ReportFiles(
        markdown=atomic.write_text(out / "report.md", _markdown(models, title, available)),
        figure=atomic.write_bytes(out / "report.png", _overview(models, title)),
        loss=out / "loss.png",  # always written: load_model raised for a run without the loss
        gates=paths["gates"],
        passkey=paths["passkey"],
        loss_by_position=paths["loss_by_position"],
    )


def _run_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=RUN_DIR")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m titanenv.workflow.report --run NAME=DIR ... --out OUT [--title TEXT]``; prints the files."""
    parser = argparse.ArgumentParser(prog="python -m titanenv.workflow.report", description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", type=_run_arg, required=True, metavar="NAME=DIR",
                        help="model name and its run folder; repeat, in display order")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and the PNGs")
    parser.add_argument("--title", default="Infini-attention vs baseline")
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if len(runs) != len(args.run):
        parser.error("--run: each NAME once")
    try:
        files = write_report(runs, args.out, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    for path in (files.markdown, files.figure, files.loss, files.gates, files.passkey, files.loss_by_position):
        if path is not None:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
