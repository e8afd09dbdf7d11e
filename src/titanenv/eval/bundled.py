"""lm-eval tasks shipped with titanenv: small, local, no Hub access (``eval/lm_eval_tasks/``).

``titanenv_wikitext2``
    Rolling-window perplexity (``loglikelihood_rolling``: word and byte perplexity, bits per
    byte) on 10 WikiText-2 articles, each cut to its first ~3,000 characters at a line end.
    Zero-shot only (its YAML pins ``num_fewshot: 0``; lm-eval ignores other shot counts).
``titanenv_next_sentence``
    Multiple choice (acc, acc_norm): which of four sentences continues a WikiText-2 sentence;
    the three distractors come from other articles. 40 test items, 16 few-shot items (train split).

Both read JSON lines with ``dataset_path: json``. Their YAMLs name the data files relative to
the YAML's folder, which lm-eval does not resolve (``datasets`` reads relative paths against
the working directory); :func:`render_tasks` writes copies with absolute paths, so the tasks
work from any working directory, for titanenv and for a plain ``lm_eval --include_path``.
The data are derived from ``sample_data/wikitext2_valid_test_docs.jsonl`` (CC BY-SA 3.0) by
:func:`build_data`, deterministically.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from titanenv import atomic

__all__ = ["BUNDLED_TASKS", "TASKS_DIR", "build_data", "render_tasks"]

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
"""The bundled task YAMLs and their JSON-lines data (package data)."""
BUNDLED_TASKS = ("titanenv_wikitext2", "titanenv_next_sentence")

_PPL_DOCS, _PPL_CHARS = 10, 3000
_MC_TEST, _MC_TRAIN, _MC_CHOICES = 40, 16, 4
_SENTENCE = re.compile(r"(?<= \.) ")  # WikiText keeps " . " between sentences


def render_tasks(dest: str | Path, source: str | Path = TASKS_DIR) -> Path:
    """Copy the task YAMLs of ``source`` into ``dest``, with relative ``data_files`` made absolute.

    A relative data file is resolved against the folder of its YAML. Written atomically;
    rerunning overwrites. The copies are JSON (which is YAML); ``!function`` tags are not supported.

    Returns:
        ``dest``, to pass as an lm-eval include path.

    Raises:
        FileNotFoundError: a data file named by a YAML does not exist.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own reader of task YAMLs

    dest, source = Path(dest), Path(source)
    for path in sorted(source.glob("*.yaml")):
        cfg: dict[str, Any] = dict(load_yaml(path, resolve_func=False, recursive=False))
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            cfg["dataset_kwargs"]["data_files"] = {k: _absolute(path.parent, v) for k, v in files.items()}
        elif isinstance(files, str):
            cfg["dataset_kwargs"]["data_files"] = _absolute(path.parent, files)
        atomic.write_text(dest / path.name, f"# rendered by titanenv from {path}\n" + json.dumps(cfg, indent=2) + "\n")
    return dest


def _absolute(folder: Path, name: str) -> str:
    path = (folder / name).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file of a bundled lm-eval task is missing (reinstall titanenv)")
    return str(path)


def build_data(wikitext_jsonl: str | Path, dest: str | Path = TASKS_DIR) -> list[Path]:
    """Write the bundled tasks' data files from the WikiText-2 articles (JSON lines with ``text``).

    Deterministic: the same input gives the same bytes.

    Returns:
        The files written: ``wikitext2_small.jsonl``, ``next_sentence_{train,test}.jsonl``.
    """
    docs = [json.loads(line)["text"] for line in Path(wikitext_jsonl).read_text().splitlines() if line.strip()]
    dest = Path(dest)
    ppl = [{"text": _head(d, _PPL_CHARS)} for d in docs[:_PPL_DOCS]]
    items = _next_sentence_items(docs, _MC_TEST + _MC_TRAIN)
    return [
        _write_jsonl(dest / "wikitext2_small.jsonl", ppl),
        _write_jsonl(dest / "next_sentence_train.jsonl", items[_MC_TEST:]),
        _write_jsonl(dest / "next_sentence_test.jsonl", items[:_MC_TEST]),
    ]


def _head(text: str, chars: int) -> str:
    """The first lines of ``text`` up to about ``chars`` characters (whole lines, at least one)."""
    out: list[str] = []
    for line in text.splitlines(keepends=True):
        if out and sum(map(len, out)) + len(line) > chars:
            break
        out.append(line)
    return "".join(out)


def _sentences(doc: str) -> list[list[str]]:
    """Paragraphs (not headings) of a WikiText article, each as its sentences of 8 to 40 words."""
    paragraphs = [p.strip() for p in doc.split("\n") if p.strip() and not p.strip().startswith("=")]
    return [[s.strip() for s in _SENTENCE.split(p) if 8 <= len(s.split()) <= 40] for p in paragraphs]


def _next_sentence_items(docs: list[str], n: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    pairs: list[tuple[int, str, str]] = []  # (article, sentence, next sentence), first pair of each article
    for i, doc in enumerate(docs):
        pair = next(((p[j], p[j + 1]) for p in _sentences(doc) for j in range(len(p) - 1)), None)
        if pair:
            pairs.append((i, *pair))
    pool = [(i, s) for i, doc in enumerate(docs) for p in _sentences(doc) for s in p]
    items = []
    for i, context, answer in pairs[:n]:
        distractors = rng.sample([s for j, s in pool if j != i], _MC_CHOICES - 1)
        label = rng.randrange(_MC_CHOICES)
        items.append(
            {"context": context, "choices": [*distractors[:label], answer, *distractors[label:]], "label": label}
        )
    return items


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    return atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
