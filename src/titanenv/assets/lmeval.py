"""lm-eval task names expanded into the datasets, metrics and nltk data their leaf tasks load.

Groups and tags are walked through ``lm_eval.tasks.TaskManager``'s index, the same YAML configs
lm-eval reads, without building ``Task`` objects: building one loads its dataset, which needs
the network. Task functions (``!function``) are not imported either, since some modules
download at import (ifeval's ``nltk.download``); extra assets are found by reading the task's
Python files instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titanenv.assets.spec import AssetListError, Dataset, Item, Metric, NltkData

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
        from lm_eval.tasks import TaskManager  # import and index take seconds; only when tasks are asked for
    except ImportError:
        raise AssetListError(
            "lm-eval tasks are named, but lm-eval is not installed: install titanenv's assets extra"
        ) from None

    names, paths = list(names), [str(p) for p in include_path]
    registered = _registered_metrics()
    if paths:  # indexing lm-eval's thousands of built-in YAML files is slow: the custom folders alone first
        try:
            return _expand_in(names, TaskManager(include_path=paths, include_defaults=False).task_index, registered)
        except AssetListError:
            pass  # a name or a group member is built in
    return _expand_in(names, TaskManager(include_path=paths or None).task_index, registered)


def _expand_in(names: list[str], index: dict, registered: set[str]) -> dict[str, list[LeafTask]]:
    leaves: dict[str, LeafTask] = {}
    out: dict[str, list[LeafTask]] = {}
    for name in names:
        found = {}
        for task_name, cfg in _walk(name, {}, index, group=None):
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
    metrics: list[str] = []
    nltk: list[str] = []
    for py in sorted(folder.glob("*.py")) if folder and folder.is_dir() else []:
        text = py.read_text(errors="replace")
        metrics += _EVALUATE_LOAD.findall(text)
        if re.search(r"from evaluate import\s+(?:.*\b)?load\b", text):
            metrics += _BARE_LOAD.findall(text)
        nltk += _NLTK_DOWNLOAD.findall(text)
    return list(dict.fromkeys(metrics)), list(dict.fromkeys(nltk))


def _python_task_dataset(cfg: dict, source: str | None) -> tuple[str | None, str | None, str | None]:
    """Dataset of a class-based task, read from the class attributes (the class is not instantiated)."""
    if not source:
        return None, None, "a Python task without a YAML file: fetch its data by hand"
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cls = load_yaml(Path(source), resolve_func=True, recursive=True)["class"]
    except Exception as e:  # the task module's own import errors, whatever they are
        return None, None, f"its Python class did not import ({type(e).__name__}: {e})"
    path = getattr(cls, "DATASET_PATH", None)
    return path, getattr(cls, "DATASET_NAME", None), None if path else "its Python class names no DATASET_PATH"
