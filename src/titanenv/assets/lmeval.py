"""lm-eval task names expanded into the datasets, metrics and nltk data their leaf tasks load.

Groups and tags are walked through ``lm_eval.tasks.TaskManager``'s index, the same YAML configs
lm-eval reads, without building ``Task`` objects: building one loads its dataset, which needs
the network. Task functions (``!function``) are not imported either, since some modules
download at import (ifeval's ``nltk.download``); extra assets are found by reading the task's
Python files instead.

:func:`check_tasks` is the other half, for where the cache is filled: it does build each task
(offline), which proves its dataset, metrics and nltk data resolve from the local caches.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titanenv import offline
from titanenv.assets.files import redact
from titanenv.assets.probe import LOADERS
from titanenv.assets.spec import AssetListError, Dataset, Item, Metric, NltkData

ALL = "all"
"""The task name that means every leaf task lm-eval knows (its own and the include path's)."""
FETCH_TASK = "TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch --add"
"""The start of a task's fetch command; ``task:NAME`` and ``--task-path DIR`` follow."""

# Calls that fetch from the network when a task's code runs; seen in lm-eval's own tasks.
_EVALUATE_LOAD = re.compile(r"""\b(?:hf_evaluate|evaluate)\.load\(\s*["']([\w\-./]+)["']""")
_BARE_LOAD = re.compile(r"""(?<![\w.])load\(\s*["']([\w\-./]+)["']""")
_NLTK_DOWNLOAD = re.compile(r"""\bnltk\.download\(\s*["']([\w\-]+)["']""")


@dataclass(frozen=True)
class LeafTask:
    """One task lm-eval will run, with what it loads."""

    name: str
    dataset_path: str | None
    dataset_name: str | None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    """``evaluate`` metrics its config or code loads."""
    nltk: tuple[str, ...] = ()
    """nltk packages its code downloads."""
    unsupported: str | None = None
    """Why titanenv cannot fetch its data, or None."""

    def assets(self) -> list[Item]:
        """The assets this task needs (its dataset, metrics and nltk data)."""
        items: list[Item] = []
        if self.dataset_path and not self.unsupported:
            items.append(Dataset(repo=self.dataset_path, config=self.dataset_name, kwargs=self.dataset_kwargs))
        items += [Metric(name=m) for m in self.metrics]
        items += [NltkData(name=n) for n in self.nltk]
        return items


def expand(names: Iterable[str], include_path: Iterable[Path] = ()) -> dict[str, list[LeafTask]]:
    """Expand task, group and tag names (or task YAML paths) into their leaf tasks, in order.

    Returns:
        For each name, its leaf tasks (a task is its own single leaf).

    Raises:
        AssetListError: a name is neither a known task, group or tag nor a task YAML file.
    """
    try:
        import lm_eval.tasks  # noqa: F401  (import and index take seconds; only when tasks are asked for)
    except ImportError:
        raise AssetListError(
            "lm-eval tasks are named, but lm-eval is not installed: install titanenv's assets extra"
        ) from None

    return _expand(list(names), tuple(str(p) for p in include_path))[1]


def _expand(names: list[str], paths: tuple[str, ...]) -> tuple[Any, dict[str, list[LeafTask]]]:
    """:func:`expand`, and the ``TaskManager`` whose index resolved every name."""
    registered = _registered_metrics()
    if paths and ALL not in names:  # indexing lm-eval's 14,000 built-in YAML files is slow: custom folders first
        manager = _manager(paths, include_defaults=False)
        try:
            return manager, _expand_in(names, manager.task_index, registered)
        except AssetListError:
            pass  # a name or a group member is built in
    manager = _manager(paths, include_defaults=True)
    return manager, _expand_in(names, manager.task_index, registered)


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    """One ``TaskManager`` per include path (indexing takes seconds), shared by :func:`expand` and
    :func:`check_tasks`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def _expand_in(names: list[str], index: dict, registered: set[str]) -> dict[str, list[LeafTask]]:
    leaves: dict[str, LeafTask] = {}
    out: dict[str, list[LeafTask]] = {}
    for name in names:
        found = {}
        walked = _walk_all(index) if name == ALL and ALL not in index else _walk(name, {}, index, group=None)
        for task_name, cfg in walked:
            if task_name not in leaves:
                leaves[task_name] = _leaf(task_name, cfg, registered)
            found[task_name] = leaves[task_name]
        out[name] = list(found.values())
    return out


def _walk(spec: str | dict, overrides: dict, index: dict, group: str | None) -> Iterator[tuple[str, dict]]:
    """Yield ``(task name, merged config)`` for every leaf under ``spec``, as lm-eval's factory builds them."""
    if isinstance(spec, dict):
        if "group" in spec:
            inner = {k: v for k, v in spec.items() if k != "group"}
            if spec["group"] in index:
                yield from _walk(spec["group"], {**overrides, **inner}, index, group)
            else:  # an inline group: its members inherit the group's task fields
                yield from _members(spec, overrides, index, f"{group}::{spec['group']}")
            return
        if "task" not in spec:
            raise AssetListError(f"lm-eval group {group!r}: member {spec!r} has neither 'task' nor 'group'")
        merged = {**overrides, **spec}
        if spec["task"] not in index:  # an inline task defined inside its group
            yield f"{group}::{spec['task']}", merged
            return
        yield from _walk(spec["task"], {k: v for k, v in merged.items() if k != "task"}, index, group)
        return
    entry = index.get(spec) or _entry_from_path(spec)
    if entry is None:
        raise AssetListError(
            f"lm-eval task {spec!r}: no such task, group or tag (see `lm-eval ls tasks`), nor a task YAML file"
        )
    kind = entry.kind.name
    if kind == "TAG":
        for name in sorted(entry.tags):
            if name in index:
                yield from _walk(name, overrides, index, group)
    elif kind == "GROUP":
        yield from _members(_config(entry), overrides, index, entry.name)
    else:
        cfg = {**_config(entry), **overrides}
        cfg.setdefault("__source__", str(entry.yaml_path) if entry.yaml_path else None)
        yield spec, cfg


def _walk_all(index: dict) -> Iterator[tuple[str, dict]]:
    """Every leaf task of the index (``TASK`` and ``PY_TASK`` entries), sorted by name."""
    for name in sorted(n for n, e in index.items() if e.kind.name in ("TASK", "PY_TASK")):
        yield from _walk(name, {}, index, group=None)


def _members(cfg: dict, overrides: dict, index: dict, group: str) -> Iterator[tuple[str, dict]]:
    from lm_eval.config.group import GroupConfig

    group_fields = {f.name for f in dataclasses.fields(GroupConfig)}
    inherited = {**{k: v for k, v in cfg.items() if k not in group_fields}, **overrides}
    members = cfg.get("task") or []
    for member in [members] if isinstance(members, str) else members:
        yield from _walk(member, inherited, index, group)


def _entry_from_path(spec: str) -> Any:
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.entry_from_path(Path(spec)) if spec.endswith((".yaml", ".yml")) else None


def _config(entry: Any) -> dict:
    if entry.cfg is not None:
        return dict(entry.cfg)
    from lm_eval.tasks._yaml_loader import load_yaml

    return dict(load_yaml(entry.yaml_path, resolve_func=False, recursive=True))


def _registered_metrics() -> set[str]:
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    return set(metric_registry)


def _leaf(name: str, cfg: dict, registered: set[str]) -> LeafTask:
    source = cfg.get("__source__")
    folder = Path(source).parent if source else None
    if "class" in cfg:
        path, ds_name, unsupported = _python_task_dataset(cfg, source)
    elif "custom_dataset" in cfg:
        path, ds_name, unsupported = None, None, "builds its dataset in Python (custom_dataset): fetch its data by hand"
    else:
        path, ds_name, unsupported = cfg.get("dataset_path"), cfg.get("dataset_name"), None
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    kwargs.pop("trust_remote_code", None)  # lm-eval drops it too under datasets>=4
    metrics = [] if cfg.get("process_results") else _evaluate_metrics(cfg.get("metric_list") or [], registered)
    code_metrics, nltk = _code_assets(folder)
    return LeafTask(
        name=name,
        dataset_path=path,
        dataset_name=ds_name,
        dataset_kwargs=kwargs,
        metrics=tuple(dict.fromkeys(metrics + code_metrics)),
        nltk=tuple(nltk),
        unsupported=unsupported,
    )


def _evaluate_metrics(metric_list: list[dict], registered: set[str]) -> list[str]:
    """Metrics lm-eval loads through ``evaluate.load``: unknown to its registry, or ``hf_evaluate: true``."""
    names = []
    for m in metric_list:
        name = m.get("metric")
        # Unresolved ``!function`` values are file paths ("/x/utils.fn"), not metric names.
        is_name = isinstance(name, str) and "." not in name and not name.startswith("/")
        if is_name and (m.get("hf_evaluate") or name not in registered):
            names.append(str(name))  # is_name: a str
    return names


def _code_assets(folder: Path | None) -> tuple[list[str], list[str]]:
    """``evaluate.load("x")`` and ``nltk.download("y")`` calls in the task folder's Python files."""
    metrics, nltk = _folder_assets(folder)
    return list(metrics), list(nltk)


@functools.lru_cache(maxsize=4096)
def _folder_assets(folder: Path | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """:func:`_code_assets`, read once per folder (thousands of tasks share a few hundred folders)."""
    metrics: list[str] = []
    nltk: list[str] = []
    for py in sorted(folder.glob("*.py")) if folder and folder.is_dir() else []:
        text = py.read_text(errors="replace")
        metrics += _EVALUATE_LOAD.findall(text)
        if re.search(r"from evaluate import\s+(?:.*\b)?load\b", text):
            metrics += _BARE_LOAD.findall(text)
        nltk += _NLTK_DOWNLOAD.findall(text)
    return tuple(dict.fromkeys(metrics)), tuple(dict.fromkeys(nltk))


def _python_task_dataset(cfg: dict, source: str | None) -> tuple[str | None, str | None, str | None]:
    """Dataset of a class-based task, read from the class attributes (the class is not instantiated)."""
    if not source:
        return None, None, "a Python task without a YAML file: fetch its data by hand"
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        spec = load_yaml(Path(source), resolve_func=False, recursive=True).get("class")
    except Exception:  # a broken YAML file: the import below reports it
        spec = None
    attrs = _class_attributes(*str(spec).rsplit(".", 1)) if isinstance(spec, str) and "." in spec else None
    if attrs is not None:  # read from the source: importing 30 task modules takes seconds (and runs their code)
        path = attrs.get("DATASET_PATH")
        return path, attrs.get("DATASET_NAME"), None if path else "its Python class names no DATASET_PATH"
    try:
        cls = load_yaml(Path(source), resolve_func=True, recursive=True)["class"]
    except Exception as e:  # the task module's own import errors, whatever they are
        return None, None, f"its Python class did not import ({type(e).__name__}: {e})"
    path = getattr(cls, "DATASET_PATH", None)
    return path, getattr(cls, "DATASET_NAME", None), None if path else "its Python class names no DATASET_PATH"


@dataclass(frozen=True)
class TaskCheck:
    """Whether one leaf task builds offline (:func:`check_tasks`)."""

    name: str
    """The leaf task's name (``arc_easy``; an inline task of a group is ``group::task``)."""
    ok: bool
    reason: str = ""
    """Why it failed, one line (the exception's type and first line); empty when ``ok``."""
    fix: str = ""
    """The command that fetches what is missing, on a login node; empty when ``ok``."""


def check_tasks(names: Sequence[str], include_path: Sequence[Path] = ()) -> list[TaskCheck]:
    """Build every leaf task of ``names`` from the local caches and render its first example.

    For each leaf (:func:`expand`), lm-eval builds the task (``TaskManager.load``, which loads its
    dataset with ``datasets.load_dataset``), then ``doc_to_text`` of its first evaluation document
    is rendered, and each ``evaluate`` metric and nltk package the task uses is loaded. This must
    run with the offline environment (:func:`titanenv.offline.apply`, before ``datasets`` or
    ``huggingface_hub`` is imported), so nothing is downloaded; a missing asset fails its task.

    Args:
        names: Task, group or tag names, task YAML paths, or ``"all"``.
        include_path: Folders of custom task YAML files (lm-eval's ``--include_path``).

    Returns:
        One :class:`TaskCheck` per leaf task, in order; a failure names the reason and the
        ``titanenv assets fetch`` command that fetches the task's assets.

    Raises:
        RuntimeError: ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is not set (or was set only
            after ``huggingface_hub``/``datasets`` were imported).
        AssetListError: a name is no known task (as :func:`expand`).
    """
    _require_offline()
    paths = tuple(str(p) for p in include_path)
    manager, expanded = _expand(list(names), paths)
    checks: dict[str, TaskCheck] = {}
    groups: dict[str, dict[str, Any] | str] = {}
    for name, leaves in expanded.items():
        for leaf in leaves:
            if leaf.name not in checks:
                checks[leaf.name] = _check_leaf(leaf, name, manager, groups, paths)
    return list(checks.values())


def _require_offline() -> None:
    unset = [f for f in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if f not in offline.is_offline()]
    hub, ds = sys.modules.get("huggingface_hub.constants"), sys.modules.get("datasets.config")
    if hub is not None and not hub.HF_HUB_OFFLINE or ds is not None and not ds.HF_HUB_OFFLINE:
        unset.append("(huggingface_hub or datasets was imported before the flags were set)")
    if unset:
        raise RuntimeError(
            f"check_tasks must run offline, but {', '.join(unset)}: call titanenv.offline.apply() "
            "before importing datasets, or run it through ./container_run.sh"
        )


def _check_leaf(
    leaf: LeafTask, name: str, manager: Any, groups: dict[str, dict[str, Any] | str], paths: tuple[str, ...]
) -> TaskCheck:
    inline = leaf.name not in manager.task_index
    fix = f"{FETCH_TASK} {shlex.quote(f'task:{name if inline else leaf.name}')}"
    fix += "".join(f" --task-path {shlex.quote(p)}" for p in paths)
    if leaf.unsupported:
        fix = f"fetch its data by hand ({leaf.unsupported}), or remove it from the task list"
    try:
        if inline:  # built with its group: only the group knows it
            if name not in groups:
                try:
                    groups[name] = _build(manager, name)
                except Exception as e:  # reported for each of its inline tasks
                    groups[name] = _gist(e)
            built = groups[name]
            if isinstance(built, str):
                raise RuntimeError(built)
            task = built[leaf.name.rsplit("::", 1)[-1]]
        else:
            task = _build(manager, leaf.name)[leaf.name]
        docs = task.eval_docs
        task.doc_to_text(docs[0] if hasattr(docs, "__getitem__") else next(iter(docs)))
        for metric in leaf.metrics:
            _load(f"metric {metric}", LOADERS["metric"], name=metric)
        for package in leaf.nltk:
            _load(f"nltk {package}", LOADERS["nltk"], name=package)
    except Exception as e:  # every failure is a finding, whatever lm-eval or datasets raised
        return TaskCheck(leaf.name, False, _gist(e), fix)
    return TaskCheck(leaf.name, True)


def _build(manager: Any, name: str) -> dict[str, Any]:
    return manager.load([name])["tasks"]


def _load(what: str, loader: Any, **kwargs: Any) -> None:
    try:
        loader(**kwargs)
    except Exception as e:  # re-raised with the asset named
        raise RuntimeError(f"{what}: {_gist(e)}") from e


def _gist(e: BaseException) -> str:
    """``Type: first line`` of an exception (its cause's, when it only wraps one), without secrets."""
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return redact(text.removeprefix("RuntimeError: ")[:300])


_TASK_BASES = {"Task", "ConfigurableTask", "MultipleChoiceTask"}
"""lm-eval's base classes, whose ``DATASET_PATH`` and ``DATASET_NAME`` are None."""


@functools.lru_cache(maxsize=256)
def _class_attributes(module: str, name: str) -> dict[str, Any] | None:
    """Literal ``DATASET_PATH``/``DATASET_NAME`` of class ``name`` in file ``module``.py, with its bases
    in the same file; None when the source does not settle them (a base from elsewhere, a computed value)."""
    try:
        tree = ast.parse(Path(f"{module}.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def attributes(cls_name: str, depth: int) -> dict[str, Any] | None:
        node = classes.get(cls_name)
        if node is None or depth > 10:
            return {} if cls_name in _TASK_BASES else None
        found: dict[str, Any] = {}
        for base in reversed(node.bases):
            inherited = attributes(base.id if isinstance(base, ast.Name) else "", depth + 1)
            if inherited is None:
                return None
            found.update(inherited)
        for stmt in node.body:
            if not isinstance(stmt, ast.Assign):
                continue
            for t in stmt.targets:
                if isinstance(t, ast.Name) and t.id in ("DATASET_PATH", "DATASET_NAME"):
                    if not isinstance(stmt.value, ast.Constant):
                        return None
                    found[t.id] = stmt.value.value
        return found

    return attributes(name, 0)
