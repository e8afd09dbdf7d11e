"""What to fetch: the asset list, the experiment's Hub ids and ``--add`` keys, with lm-eval tasks expanded.

Each item is listed once, with every origin that asked for it (``models[0]``,
``experiment.tokenizer``, ``task:mmlu``, ``task:mmlu_anatomy``, ``--add``), so ``--only`` can
pick it by its key or by any origin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from titanenv.assets.spec import AssetList, AssetListError, HubModel, Item, Tokenizer, parse_key


@dataclass
class Planned:
    """One item to fetch and who asked for it."""

    item: Item
    origins: list[str] = field(default_factory=list)
    from_file: bool = False
    """Asked for by the asset list file (so ``fetch FILE --only KEY`` fetches it as the file describes it)."""


@dataclass
class Plan:
    """Items to fetch, by key, and lm-eval tasks that cannot be fetched (with why)."""

    items: dict[str, Planned] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    """``task:NAME`` -> reason."""
    tasks: dict[str, list[str]] = field(default_factory=dict)
    """Each lm-eval task name asked for (``all`` too) -> its leaf tasks, in order."""

    def add(self, item: Item, origin: str, from_file: bool) -> None:
        planned = self.items.setdefault(item.key, Planned(item))
        planned.from_file |= from_file
        if origin not in planned.origins:
            planned.origins.append(origin)

    def select(self, only: list[str]) -> Plan:
        """The items whose key or one of whose origins is in ``only`` (all when ``only`` is empty).

        Raises:
            AssetListError: a key in ``only`` matches nothing.
        """
        if not only:
            return self
        wanted = set(only)
        picked = Plan(
            {k: p for k, p in self.items.items() if k in wanted or wanted & set(p.origins)},
            {k: r for k, r in self.unsupported.items() if k in wanted},
            {k: t for k, t in self.tasks.items() if f"task:{k}" in wanted},
        )
        matched = set(picked.items) | {o for p in picked.items.values() for o in p.origins} | set(picked.unsupported)
        if missing := sorted(wanted - matched):
            raise AssetListError(
                f"--only {', '.join(missing)}: no such asset in the plan; "
                "`titanenv assets fetch --dry-run` lists the keys"
            )
        return picked


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not an existing local path (the rule of ``titanenv.data.tokenizer.resolve``)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def build(assets: AssetList | None, add: Sequence[str] = (), include_path: Sequence[Path] = ()) -> Plan:
    """The plan for an asset list (may be None) plus ``--add`` keys.

    lm-eval tasks (``lm_eval.tasks``, ``task_file``, ``experiment.eval_tasks``, ``task:`` keys) are
    expanded into leaf tasks; each leaf's dataset, metrics and nltk data become items.

    Raises:
        AssetListError: an invalid key, or an unknown task name.
    """
    plan = Plan()
    file_tasks: list[str] = []
    added_tasks: list[str] = []
    paths = list(include_path)
    if assets is not None:
        for group in ("models", "tokenizers", "datasets", "metrics", "nltk", "files"):
            for i, item in enumerate(getattr(assets, group)):
                plan.add(item, f"{group}[{i}]", from_file=True)
        exp = assets.experiment
        if exp.tokenizer and is_hub_id(exp.tokenizer):
            plan.add(Tokenizer(repo=exp.tokenizer), "experiment.tokenizer", from_file=True)
        if exp.model and is_hub_id(exp.model):
            plan.add(HubModel(repo=exp.model), "experiment.model", from_file=True)
        file_tasks += assets.lm_eval.all_tasks() + exp.eval_tasks
        paths += assets.lm_eval.include_path
    for key in add:
        parsed = parse_key(key)
        if isinstance(parsed, str):
            added_tasks.append(parsed)
        else:
            plan.add(parsed, "--add", from_file=False)
    if file_tasks or added_tasks:
        _add_tasks(plan, file_tasks, added_tasks, paths)
    return plan


def _add_tasks(plan: Plan, file_tasks: list[str], added_tasks: list[str], include_path: list[Path]) -> None:
    from titanenv.assets import lmeval  # imports lm_eval: only when tasks are named

    expanded = lmeval.expand(list(dict.fromkeys(file_tasks + added_tasks)), include_path)
    for name, leaves in expanded.items():
        plan.tasks[name] = [leaf.name for leaf in leaves]
        for leaf in leaves:
            if leaf.unsupported:
                plan.unsupported[f"task:{leaf.name}"] = leaf.unsupported
                continue
            for item in leaf.assets():
                plan.add(item, f"task:{name}", from_file=name in file_tasks)
                plan.add(item, f"task:{leaf.name}", from_file=name in file_tasks)
