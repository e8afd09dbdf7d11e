"""The offline lm-eval matrix: models (checkpoints) x tasks x few-shot counts, in one process.

:func:`run_matrix` sets the offline environment, checks that every task builds from the local
caches (:func:`titanenv.assets.lmeval.check_tasks`) before any model is loaded, then loads each
model once (lm-eval's ``HFLM``) and runs each of its cells (task, shots) through
``lm_eval.simple_evaluate`` with one shared ``TaskManager``. One lm-eval CLI process per cell
spends most of its 37-73 s starting up; here that cost is paid once.

A model is a run folder of ``titanenv train`` (its latest, ``step`` or ``steps`` complete
checkpoints, exported on the fly by :func:`titanenv.export.cached_export` into
``RUN/export/step-N/``), such an exported folder, or any local Hugging Face folder (``config.json``).
A PEFT adapter folder (``adapter_config.json``: a LoRA run's export, ``RUN/export/step-N-adapter/``,
which is also what a LoRA run folder exports to) is the pair of its base model
(``base_model_name_or_path``, a local folder) and the adapter: the base is loaded by lm-eval's
``HFLM`` and the adapter put on it with ``PeftModel.from_pretrained`` (not through ``HFLM(peft=)``,
which shrinks the embedding to the tokenizer's length whenever they differ, as titanenv's padded
vocabularies do: the scores' softmax would lose the padding rows, unlike the merged model's); the tokenizer is
the adapter folder's when it has one. titanenv's data carry no BOS token, so titanenv models are
scored with ``add_bos_token=False``; other folders keep their tokenizer's rule. Each cell's lm-eval
results JSON is written to ``OUT/lm_eval/MODEL/step-N[-adapter][-DTYPE]/TASK/Kshot.json`` (DTYPE unless
float32); a rerun with the same settings (the task's YAML contents among them) reuses it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from titanenv import atomic, offline
from titanenv.assets import lmeval
from titanenv.assets.lmeval import TaskCheck, check_tasks
from titanenv.eval import bundled, report
from titanenv.eval.generate import HF_MARKER
from titanenv.eval.generate import RUN_MARKER as CONFIG_RECORD
from titanenv.eval.report import Row
from titanenv.train import checkpoints

__all__ = [
    "ALL",
    "DTYPES",
    "Cell",
    "MatrixResults",
    "MatrixConfig",
    "ModelNotFound",
    "ModelRef",
    "TasksNotOffline",
    "parse_ints",
    "parse_steps",
    "parse_tasks",
    "default_out",
    "resolve_models",
    "run_matrix",
]

ALL = lmeval.ALL
DTYPES = ("float32", "bfloat16", "float16")
CELLS_DIR = "lm_eval"
PEFT_MARKER = "adapter_config.json"
"""A PEFT adapter folder's config (``peft.utils.CONFIG_NAME``)."""
TASKS_DIR = "tasks"


@dataclass(kw_only=True)
class MatrixConfig:
    """What :func:`run_matrix` evaluates, and where it writes."""

    models: list[Path]
    """Run folders, exported folders or local Hugging Face folders, in table order."""
    tasks: list[str] = field(default_factory=lambda: list(bundled.BUNDLED_TASKS))
    """lm-eval task, group or tag names, or task YAML paths; ``"all"``: every task lm-eval knows (its
    own and the include paths'), the same rule as an asset list's ``[lm_eval] tasks = ["all"]``."""
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    """Few-shot counts; a task whose YAML pins ``num_fewshot: 0`` runs once, zero-shot."""
    limit: float | None = None
    """At most this many documents per task (lm-eval's ``--limit``; < 1: a fraction). For tests only."""
    include_path: list[Path] = field(default_factory=list)
    """Folders of custom task YAMLs, searched after the bundled tasks (``eval/lm_eval_tasks``)."""
    step: int | None = None
    """Checkpoint step of run folders. Default: the latest complete one."""
    steps: list[int] | Literal["all"] | None = None
    """Several checkpoint steps of run folders (a series: plotted against step); ``"all"``: every complete one."""
    batch_size: int = 8
    """Requests per forward pass (lm-eval's ``--batch_size``)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (``cuda:N``)."""
    dtype: str = "float32"
    """Weights and compute dtype: one of :data:`DTYPES`; also the dtype of on-the-fly exports."""
    out: Path | None = None
    """Output folder: ``results.csv``, ``results.md``, plots, ``lm_eval/`` cell JSONs, ``tasks/``.
    Default: ``RUN/eval`` when every model is a checkpoint (or an export) of one run, else ``./eval_results``."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no model: pass --model (a run folder, an exported or a Hugging Face folder)")
        if not self.tasks:
            raise ValueError("no task: pass --tasks")
        if not self.num_fewshot or any(n < 0 for n in self.num_fewshot):
            raise ValueError(f"--num-fewshot must be counts >= 0, got {self.num_fewshot}")
        if self.step is not None and self.steps is not None:
            raise ValueError("--step and --steps exclude each other: pass one")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu or cuda (cuda:N), got {self.device!r}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"--limit must be > 0, got {self.limit}")


@dataclass(frozen=True)
class ModelRef:
    """One model of the matrix, resolved from what the user named (nothing loaded yet)."""

    label: str
    """Its name in the tables: the run folder's name (for an export, its run's), else the folder's."""
    source: Path
    """The folder the user named."""
    step: int | None
    """Checkpoint step (run folders and titanenv exports); None for other Hugging Face folders."""
    run_dir: Path | None
    """The run folder to export ``step`` from, or None when ``hf_dir`` is already a Hugging Face folder."""
    hf_dir: Path | None
    """The Hugging Face folder (for an adapter: its base model), or None until the run's checkpoint is exported."""
    titanenv: bool
    """Trained by titanenv: its data have no BOS token, so it is scored with ``add_bos_token=False``."""
    weights_dtype: str | None = None
    """The weights' dtype of a titanenv export (its marker's), else None; set for run folders by their export."""
    peft: Path | None = None
    """A PEFT adapter folder put on ``hf_dir`` (its base model), else None."""


@dataclass(frozen=True)
class Cell:
    """One (model, step, task, shots) run of ``simple_evaluate``."""

    model: str
    step: int | None
    task: str
    shots: int
    path: Path
    """Its lm-eval results JSON (with a ``titanenv`` block: model folder, settings, seconds)."""
    reused: bool
    """Read from an earlier run with the same settings instead of run again."""
    seconds: float


@dataclass(frozen=True)
class MatrixResults:
    """What :func:`run_matrix` wrote, and its rows."""

    out: Path
    rows: list[Row]
    cells: list[Cell]
    csv: Path
    markdown: Path
    plots: list[Path]
    notes: list[str]
    """One line per thing the reader should know (zero-shot-only tasks, BOS handling)."""
    seconds: float


class ModelNotFound(FileNotFoundError):
    """A folder named as a model is neither a run folder (with a complete checkpoint) nor a Hugging Face folder."""


class TasksNotOffline(Exception):
    """Some tasks do not build from the local caches; ``checks`` holds the failed ones with their fix."""

    def __init__(self, checks: list[TaskCheck]) -> None:
        self.checks = checks
        lines = [f"{c.name}: {c.reason}\n  fetch it on a login node: {c.fix}" for c in checks]
        super().__init__(f"{len(checks)} task(s) not available offline:\n" + "\n".join(lines))


def parse_tasks(text: str) -> list[str]:
    """``T1,T2``, ``all`` or ``@FILE`` (names separated by commas or lines; ``#`` starts a comment).

    Raises:
        FileNotFoundError: ``@FILE`` does not exist.
        ValueError: no task name.
    """
    if text.startswith("@"):
        lines = (line.split("#", 1)[0] for line in Path(text[1:]).read_text().splitlines())
        text = ",".join(lines)
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ValueError("no task name given")
    return names


def parse_ints(text: str, what: str) -> list[int]:
    """``0,5`` -> ``[0, 5]`` (order kept, duplicates dropped).

    Raises:
        ValueError: an item is not an integer (the message names ``what``).
    """
    try:
        return list(dict.fromkeys(int(n) for n in text.split(",") if n.strip()))
    except ValueError:
        raise ValueError(f"{what}: expected integers separated by commas, got {text!r}") from None


def parse_steps(text: str) -> list[int] | Literal["all"]:
    """``10,20`` -> ``[10, 20]``; ``all`` -> ``"all"``."""
    if text.strip() == ALL:
        return "all"
    return parse_ints(text, "--steps")


def resolve_models(
    sources: Sequence[str | os.PathLike[str]],
    *,
    step: int | None = None,
    steps: list[int] | Literal["all"] | None = None,
) -> list[ModelRef]:
    """Resolve model folders into the models of the matrix, one per checkpoint.

    A run folder gives one model per step (``steps``), or its ``step``, or its latest complete
    checkpoint; ``step``/``steps`` do not apply to other folders. Labels are made unique.

    Raises:
        ModelNotFound: a folder is neither a run folder (with a complete checkpoint) nor a Hugging Face folder.
        FileNotFoundError: a step is not a complete checkpoint (the message lists the complete ones).
    """
    refs: list[ModelRef] = []
    for source in map(Path, sources):
        if (source / CONFIG_RECORD).is_file():
            refs += [
                ModelRef(_label(source), source, s, source, None, titanenv=True)
                for s in _run_steps(source, step, steps)
            ]
        elif (source / PEFT_MARKER).is_file():
            run, s = _export_of(source)
            dtype = _export_dtype(source) if run is not None else None
            base = _adapter_base(source)
            refs.append(ModelRef(_label(run or source), source, s, None, base, run is not None, dtype, source))
        elif (source / HF_MARKER).is_file():
            run, s = _export_of(source)
            dtype = _export_dtype(source) if run is not None else None
            refs.append(ModelRef(_label(run or source), source, s, None, source, run is not None, dtype))
        else:
            raise ModelNotFound(
                f"{source}: not a model folder: expected a run folder of `titanenv train` ({CONFIG_RECORD}) "
                f"or an exported / Hugging Face folder ({HF_MARKER}, weights, tokenizer) or a PEFT adapter "
                f"({PEFT_MARKER})"
            )
    return _unique_labels(refs)


def _adapter_base(folder: Path) -> Path:
    """The base model folder of PEFT adapter ``folder``: its ``base_model_name_or_path`` (a relative path is
    taken from the working directory, as PEFT does).

    Raises:
        ModelNotFound: no base named, or not a local Hugging Face folder (nothing is downloaded).
    """
    try:
        base = json.loads((folder / PEFT_MARKER).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ModelNotFound(f"{folder}/{PEFT_MARKER}: names no base model (base_model_name_or_path)")
    if not (Path(base) / HF_MARKER).is_file():
        raise ModelNotFound(
            f"{folder}: its base model {base} (base_model_name_or_path in {PEFT_MARKER}) is not a local Hugging Face "
            f"folder ({HF_MARKER}); the adapter is evaluated on its base: put the base there, or evaluate the "
            "merged model (`titanenv export --merge`)"
        )
    return Path(base)


def _export_of(folder: Path) -> tuple[Path | None, int | None]:
    """``(run folder, step)`` of a titanenv export (its marker says), else ``(None, None)``."""
    from titanenv.export import MARKER  # titanenv.export imports huggingface_hub: after offline.apply

    try:
        mark = json.loads((folder / MARKER).read_text())
        return Path(mark["run_dir"]), int(mark["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _export_dtype(folder: Path) -> str | None:
    """The weights' dtype a titanenv export's marker records, else None."""
    from titanenv.export import MARKER

    try:
        dtype = json.loads((folder / MARKER).read_text()).get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return dtype if isinstance(dtype, str) else None


def _label(folder: Path) -> str:
    return folder.resolve().name or "model"


def _unique_labels(refs: list[ModelRef]) -> list[ModelRef]:
    """Two different folders with one name get ``-2``, ``-3`` suffixes in order."""
    seen: dict[str, list[Path]] = {}
    out = []
    for ref in refs:
        folders = seen.setdefault(ref.label, [])
        home = (ref.run_dir or ref.peft or ref.hf_dir or ref.source).resolve()
        if ref.titanenv and ref.run_dir is None:
            home = (_export_of(ref.source)[0] or ref.source).resolve()
        if home not in folders:
            folders.append(home)
        n = folders.index(home)
        out.append(ref if n == 0 else ModelRef(**{**ref.__dict__, "label": f"{ref.label}-{n + 1}"}))
    return out


def _run_steps(run: Path, step: int | None, steps: list[int] | Literal["all"] | None) -> list[int]:
    complete = sorted(checkpoints.complete_steps(run / "checkpoint"))
    if not complete:
        raise ModelNotFound(
            f"{run}/checkpoint: no complete checkpoint (step-N/{checkpoints.MARKER}); train first with `titanenv train`"
        )
    if steps == "all":
        return complete
    wanted = steps if steps is not None else [step] if step is not None else [complete[-1]]
    missing = [s for s in wanted if s not in complete]
    if missing:
        raise FileNotFoundError(
            f"{run}: no complete checkpoint for step {', '.join(map(str, missing))}; "
            f"complete steps: {', '.join(map(str, complete))}"
        )
    return list(wanted)


def run_matrix(config: MatrixConfig, *, progress: Callable[[str], None] | None = None) -> MatrixResults:
    """Evaluate every model (checkpoint) of ``config`` on every (task, shots) cell, offline.

    Order: resolve the models; render the bundled tasks into ``OUT/tasks``; check every task
    builds offline; then per model: export (run folders), load once, run its cells. Writes, each
    atomically: the cell JSONs, ``OUT/results.csv``, ``OUT/results.md`` and the plots
    (:func:`titanenv.eval.report.write_plots`).

    Args:
        config: what to evaluate.
        progress: called with one line per step of the run (default: silent).

    Returns:
        The rows (model, step, task, shots, metric, value, stderr) and the files written.

    Raises:
        TasksNotOffline: a task's dataset, metric or nltk data is not in the local caches
            (raised before any model is exported or loaded; nothing is downloaded).
        FileNotFoundError: a model folder or checkpoint step does not exist.
        AssetListError: a task name is unknown to lm-eval.
    """
    started = time.monotonic()
    say = progress or (lambda line: None)
    _go_offline()
    refs = resolve_models(config.models, step=config.step, steps=config.steps)
    out = config.out or default_out(refs)
    include = [bundled.render_tasks(out / TASKS_DIR), *map(Path, config.include_path)]
    listed = [_all_tasks(include) if t == ALL else [t] for t in config.tasks]
    names = list(dict.fromkeys(n for group in listed for n in group))
    say(f"checking {len(names)} task(s) build offline: {', '.join(names)}")
    # The rendered bundled folder is rebuilt on every run: its fetch lines need no --task-path for it.
    noise = f" --task-path {shlex.quote(str(include[0]))}"
    failed = [replace(c, fix=c.fix.replace(noise, "")) for c in check_tasks(names, include) if not c.ok]
    if failed:
        raise TasksNotOffline(failed)
    manager = _task_manager(names, include)
    plan, notes = _plan(manager, names, config.num_fewshot)
    if any(r.titanenv for r in refs):
        notes.append("titanenv models are scored with add_bos_token=False (their training data has no BOS token)")
    cells: list[Cell] = []
    rows: list[Row] = []
    for ref in refs:
        model_cells, model_rows = _run_model(_exported(ref, config.dtype, say), plan, config, manager, out, say)
        cells += model_cells
        rows += model_rows
    csv_path, md_path = report.write_tables(rows, out, notes=notes)
    plots = report.write_plots(rows, out)
    return MatrixResults(out, rows, cells, csv_path, md_path, plots, notes, time.monotonic() - started)


def default_out(refs: Sequence[ModelRef]) -> Path:
    """``RUN/eval`` when all ``refs`` come from one run folder (checkpoints or exports), else ``./eval_results``."""
    runs = {(r.run_dir or _export_of(r.source)[0] or r.source).resolve() for r in refs}
    run = next(iter(runs))
    return run / "eval" if len(runs) == 1 and all(r.titanenv for r in refs) else Path("eval_results")


def _plan(manager: Any, names: list[str], shots: list[int]) -> tuple[list[tuple[str, int]], list[str]]:
    """The (task, shots) cells of each model, and a note for each zero-shot-only task."""
    plan: list[tuple[str, int]] = []
    notes: list[str] = []
    for name in names:
        counts = [0] if _zero_shot_only(manager, name) and shots != [0] else shots
        if counts != shots:
            notes.append(f"{name} is zero-shot only (num_fewshot: 0 in its YAML): run once, with 0 shots")
        plan += [(name, n) for n in counts]
    return plan, notes


def _run_model(
    ref: ModelRef,
    plan: list[tuple[str, int]],
    config: MatrixConfig,
    manager: Any,
    out: Path,
    say: Callable[[str], None],
) -> tuple[list[Cell], list[Row]]:
    """Run (or reuse) the cells of one model; the model is loaded once, at its first cell to run."""
    hf_dir = ref.hf_dir or ref.source  # set by _exported
    cells: list[Cell] = []
    rows: list[Row] = []
    lm: Any = None
    for task, shots in plan:
        settings = _settings(ref, hf_dir, task, shots, config, manager)
        path = out / CELLS_DIR / ref.label / _step_folder(ref, config.dtype) / _cell_folder(task) / f"{shots}shot.json"
        t0 = time.monotonic()
        result = _reuse(path, settings)
        reused = result is not None
        if result is None:
            if lm is None:
                say(f"loading {_name(ref)} ({hf_dir}{f' + adapter {ref.peft}' if ref.peft else ''})")
                lm = _load_lm(ref, config)
            say(f"{_name(ref)}: {task}, {shots}-shot")
            result = _evaluate(lm, task, shots, config, manager)
            result["titanenv"] = {**settings, "seconds": round(time.monotonic() - t0, 3)}
            atomic.write_text(path, json.dumps(result, indent=2, default=_jsonable) + "\n")
        cells.append(Cell(ref.label, ref.step, task, shots, path, reused, time.monotonic() - t0))
        rows += _rows(ref, shots, result, _model_name(ref, config.dtype))
    del lm
    _free(config.device)
    return cells, rows


def _dtype_tag(ref: ModelRef, dtype: str) -> str:
    """The dtype of a model's cells: ``dtype`` (lm-eval's compute and load dtype), after the weights'
    dtype of a titanenv export when that differs (``bfloat16-float32``: bfloat16 weights run in float32)."""
    weights = ref.weights_dtype
    return dtype if weights in (None, dtype) else f"{weights}-{dtype}"


def _step_folder(ref: ModelRef, dtype: str) -> str:
    """``step-N`` (``hf``: not a titanenv model), ``-adapter`` after it for a base-plus-adapter pair,
    then ``-DTYPE`` unless float32 throughout."""
    tag = _dtype_tag(ref, dtype)
    name = (f"step-{ref.step}" if ref.step is not None else "hf") + ("-adapter" if ref.peft is not None else "")
    return name + ("" if tag == "float32" else f"-{tag}")


def _model_name(ref: ModelRef, dtype: str) -> str:
    """A model's name in the tables and plots: its label, with ``adapter`` for a base-plus-adapter pair and
    its dtype unless float32 throughout (``run (adapter, bfloat16)``)."""
    tag = _dtype_tag(ref, dtype)
    tags = [t for t in ("adapter" if ref.peft is not None else "", "" if tag == "float32" else tag) if t]
    return f"{ref.label} ({', '.join(tags)})" if tags else ref.label


def _name(ref: ModelRef) -> str:
    return ref.label if ref.step is None else f"{ref.label} step {ref.step}"


def _go_offline() -> None:
    """:func:`titanenv.offline.apply`, and the same flags in the libraries that read them at import."""
    offline.apply()
    hub: Any = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    ds: Any = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = True
        ds.HF_DATASETS_OFFLINE = True


def _all_tasks(include: list[Path]) -> list[str]:
    return [leaf.name for leaf in lmeval.expand([ALL], include)[ALL]]


def _task_manager(names: list[str], include: list[Path]) -> Any:
    """A ``TaskManager`` that knows ``names``: the include paths alone when they suffice (indexing
    lm-eval's built-in tasks takes seconds), else with the built-in tasks."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    custom = TaskManager(include_path=paths, include_defaults=False)
    if all(n in custom.task_index or n.endswith((".yaml", ".yml")) for n in names):
        return custom
    return TaskManager(include_path=paths)


def _zero_shot_only(manager: Any, name: str) -> bool:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.kind.name != "TASK":
        return False
    cfg = entry.cfg if entry.cfg is not None else load_yaml(entry.yaml_path, resolve_func=False, recursive=True)
    return bool(cfg.get("num_fewshot") == 0)


def _exported(ref: ModelRef, dtype: str, say: Callable[[str], None]) -> ModelRef:
    if ref.hf_dir is not None or ref.run_dir is None:
        return ref
    from titanenv.export import DTYPES, cached_export  # imports huggingface_hub: after offline.apply

    say(f"exporting {ref.run_dir} step {ref.step} (cached in RUN/export/)")
    weights = dtype if dtype in DTYPES else "float32"
    hf_dir = cached_export(ref.run_dir, step=ref.step, dtype=weights)  # a LoRA run: its adapter
    if (hf_dir / PEFT_MARKER).is_file():
        return ModelRef(**{**ref.__dict__, "hf_dir": _adapter_base(hf_dir), "weights_dtype": weights, "peft": hf_dir})
    return ModelRef(**{**ref.__dict__, "hf_dir": hf_dir, "weights_dtype": weights})


def _settings(ref: ModelRef, hf_dir: Path, task: str, shots: int, config: MatrixConfig, manager: Any) -> dict[str, Any]:
    """What a cell's result depends on; an earlier JSON with the same settings is reused. An adapter adds
    ``peft`` and ``peft_weights`` (absent otherwise, so the cells of other models keep their key)."""
    settings = {
        "model": ref.label,
        "hf_dir": str(hf_dir.resolve()),
        "weights": _weight_files(hf_dir),
        "step": ref.step,
        "task": task,
        "task_yaml_sha256": _task_digest(manager, task),
        "shots": shots,
        "limit": config.limit,
        "dtype": config.dtype,
        "add_bos_token": False if ref.titanenv else None,
        "lm_eval": _lm_eval_version(),
    }
    if ref.peft is not None:
        settings.update(peft=str(ref.peft.resolve()), peft_weights=_weight_files(ref.peft))
    return settings


def _weight_files(folder: Path) -> list[list[Any]]:
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]


def _task_digest(manager: Any, task: str) -> str | None:
    """sha256 over the contents of ``task``'s YAML file (the ``TaskManager`` index's, or the path
    itself) and of the files its ``include:`` chain names: an edited task runs again. None for a
    task without a YAML file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task)
    start = entry.yaml_path if entry is not None else Path(task) if task.endswith((".yaml", ".yml")) else None
    if start is None:
        return None
    digest = hashlib.sha256()
    todo, seen = [Path(start).expanduser().resolve()], set()
    while todo:
        path = todo.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        try:
            include = load_yaml(path, resolve_func=False, recursive=False).get("include")
        except Exception:  # an unreadable include chain is lm-eval's error to report; its bytes are hashed
            continue
        for inc in include if isinstance(include, list) else [include] if include else []:
            todo.append((path.parent / str(inc)).resolve())
    return digest.hexdigest()


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _reuse(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    try:
        old: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    kept = {k: v for k, v in old.get("titanenv", {}).items() if k != "seconds"}
    return old if kept == json.loads(json.dumps(settings)) else None


def _load_lm(ref: ModelRef, config: MatrixConfig) -> Any:
    """lm-eval's ``HFLM`` of ``ref``: its Hugging Face folder, or its adapter's base with the adapter on it."""
    from lm_eval.models.huggingface import HFLM

    own_tokenizer = ref.peft is not None and any(
        (ref.peft / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    )
    # The adapter was trained at its run's sequence length (its tokenizer_config's model_max_length);
    # the base's config.json has the base's. lm-eval's rolling windows must use the adapter's, as the merged model does.
    max_length = None
    if own_tokenizer and ref.peft is not None and (ref.peft / "tokenizer_config.json").is_file():
        found = json.loads((ref.peft / "tokenizer_config.json").read_text()).get("model_max_length")
        max_length = int(found) if isinstance(found, int) and found < 10**9 else None
    lm = HFLM(
        pretrained=str(ref.hf_dir),
        tokenizer=str(ref.peft) if own_tokenizer else None,
        device=config.device,
        dtype=config.dtype,
        batch_size=config.batch_size,
        add_bos_token=False if ref.titanenv else None,
        max_length=max_length,
    )
    if ref.peft is not None:  # not HFLM(peft=): see the module docstring
        from peft import PeftModel

        lm._model = PeftModel.from_pretrained(lm.model, str(ref.peft)).eval()
        lm.peft = str(ref.peft)  # what lm-eval records of the model
    return lm


def _evaluate(lm: Any, task: str, shots: int, config: MatrixConfig, manager: Any) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    result = simple_evaluate(
        model=lm, tasks=[task], num_fewshot=shots, limit=config.limit, task_manager=manager,
        log_samples=False, verbosity="WARNING",
    )  # fmt: skip
    if result is None:  # only on non-zero ranks of a distributed run, which this is not
        raise RuntimeError(f"lm-eval returned no result for {task}")
    return dict(result)


def _rows(ref: ModelRef, shots: int, result: dict[str, Any], model: str | None = None) -> list[Row]:
    """One row per (task or subtask, metric) of a cell's results."""
    rows = []
    for task, entry in result.get("results", {}).items():
        n = int(result.get("n-shot", {}).get(task, shots))
        for key, value in entry.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            err = entry.get(f"{metric}_stderr,{filt}")
            stderr = float(err) if isinstance(err, int | float) and math.isfinite(err) else None
            name = metric if filt == "none" else f"{metric} ({filt})"
            rows.append(Row(model or ref.label, ref.step, task, n, name, float(value), stderr))
    return rows


def _jsonable(o: object) -> object:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(o)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _cell_folder(task: str) -> str:
    """A folder name for ``task`` inside ``OUT/lm_eval/MODEL/STEP``: a task YAML path gives its stem,
    and nothing can climb out of ``OUT`` (``/``, ``..``)."""
    name = Path(task).stem if task.endswith((".yaml", ".yml")) else task
    return re.sub(r"[^\w.+=-]+", "_", name).lstrip(".") or "_"
