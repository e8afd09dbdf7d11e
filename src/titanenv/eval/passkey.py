"""Passkey retrieval: can the model repeat a number hidden in long filler text?

The test of the long-context papers (Mohtashami & Jaggi 2023, arXiv:2305.16300) that nanotron's
infinite-context (Infini-attention) experiments run: a needle

    `` The pass key is {K}. Remember it. {K} is the pass key.``

sits at a depth of 0-100 % of filler text, the prompt ends with the question
`` What is the pass key? The pass key is``, and the model answers by greedy decoding. ``K`` is a
random 5-digit number. The filler is the literature's sentence cycle
`` The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.``
repeated: text with nothing to remember, so only the needle can give the answer.

A prompt is put together in tokens, so that it has exactly the target length:

1. each piece (filler sentence, needle, question) is encoded alone with the model's
   :attr:`~titanenv.eval.generate.TextModel.encode`; tokens a tokenizer puts before any text
   (a Hugging Face BOS) are taken off the pieces and put once at the start of the prompt;
2. the filler is the sentence cycle, cut to ``length - start - needle - question`` tokens (the
   first sentence may lose its first words; the filler ends with a whole sentence);
3. the needle goes at the sentence boundary nearest to ``depth %`` of the filler tokens.

Scoring: at most ``max_new_tokens`` greedy tokens (:func:`~titanenv.eval.generate.continue_ids`);
a trial is correct when the generated text, leading spaces stripped, starts with ``K`` and no
digit follows it (``123456`` is not ``12345``). A prompt of the model's full context has its
first tokens slide out of the window while the later answer tokens are generated (no KV cache).

Keys: trial ``t`` of the cell (length, depth) draws its key from ``random.Random`` seeded with
``"SEED:LENGTH:DEPTH:t"``, so two models (an Infini-attention run and its baseline) get the same
keys in the same cells, and a cell's keys do not depend on the rest of the grid.

Files (:func:`write_passkey`), both atomic:

- ``OUT/passkey.json``: ``{"model": str, "step": int | null, "lengths": [int], "depths": [int],
  "trials": int, "seed": int, "accuracy": [[float per length] per depth],
  "prompt_tokens": [[[int per trial] per length] per depth], "skipped_lengths": [int]}``;
  ``accuracy[i][j]`` is the share of correct trials at ``depths[i]`` and ``lengths[j]``;
- ``OUT/passkey.png``: the accuracy heatmap, depth (rows) x length (columns), 0-1, each cell annotated.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from titanenv import atomic
from titanenv.eval.generate import RUN_MARKER, Sampler, TextModel, continue_ids, load_text_model

__all__ = [
    "FILLER",
    "JSON_FILE",
    "NEEDLE",
    "PLOT_FILE",
    "QUESTION",
    "PasskeyConfig",
    "PasskeyPrompt",
    "PasskeyResult",
    "build_prompt",
    "default_out",
    "evaluate_passkey",
    "is_correct",
    "keys",
    "run_passkey",
    "write_passkey",
]

JSON_FILE, PLOT_FILE = "passkey.json", "passkey.png"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
"""The filler sentences, cycled (Mohtashami & Jaggi 2023; nanotron's passkey data)."""

Encode = Callable[[str], list[int]]


@dataclass(frozen=True, kw_only=True)
class PasskeyConfig:
    """The grid of a passkey run: one cell per (depth, length), ``trials`` prompts each."""

    lengths: tuple[int, ...] = (64, 128, 256)
    """Prompt lengths in tokens; those above the model's context are skipped (and listed)."""
    depths: tuple[int, ...] = (0, 25, 50, 75, 100)
    """Where the needle goes, in percent of the filler (0: first, 100: last before the question)."""
    trials: int = 5
    """Prompts (keys) per cell."""
    seed: int = 0
    """Seeds the keys (module docstring)."""
    max_new_tokens: int = 8
    """Greedy tokens generated per prompt: enough for a space, five digits one token each, and one more."""

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"--passkey-lengths {_csv(self.lengths)}: give one or more positive token counts")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"--passkey-depths {_csv(self.depths)}: give one or more percentages in 0..100")
        if self.trials < 1:
            raise ValueError(f"--passkey-trials {self.trials}: must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {self.max_new_tokens}: must be >= 1")


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt of :func:`build_prompt`.

    Attributes:
        ids: the prompt's token ids (start tokens, filler, needle, filler, question).
        key: the 5-digit pass key as text.
        needle_start: index in ``ids`` of the needle's first token.
        filler_before: filler tokens before the needle.
        filler_tokens: filler tokens in all.
    """

    ids: list[int]
    key: str
    needle_start: int
    filler_before: int
    filler_tokens: int


@dataclass(frozen=True)
class PasskeyResult:
    """Accuracy of each cell; the fields of ``passkey.json`` (module docstring)."""

    model: str
    step: int | None
    lengths: list[int]
    depths: list[int]
    trials: int
    seed: int
    accuracy: list[list[float]]
    """``accuracy[depth index][length index]`` in [0, 1]."""
    prompt_tokens: list[list[list[int]]]
    """``prompt_tokens[depth index][length index][trial]``: the prompt's actual length in tokens."""
    skipped_lengths: list[int] = field(default_factory=list)
    """Requested lengths above the model's context, not run."""


def keys(seed: int, length: int, depth: int, trials: int) -> list[str]:
    """The pass keys of one cell: 5-digit numbers, one per trial (module docstring)."""
    return [str(random.Random(f"{seed}:{length}:{depth}:{t}").randint(10_000, 99_999)) for t in range(trials)]


def build_prompt(encode: Encode, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with the needle for ``key`` at ``depth`` % of the filler.

    Raises:
        ValueError: ``length`` leaves no room for the needle and the question (the minimum is named).
    """
    start = _start_tokens(encode)
    needle, question = _piece(encode, start, NEEDLE.format(key=key)), _piece(encode, start, QUESTION)
    budget = length - len(start) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(
            f"--passkey-lengths {length}: the needle and the question alone take {length - budget} tokens; "
            "use longer prompts"
        )
    filler, bounds = _filler(encode, start, budget)
    before = min(bounds, key=lambda b: (abs(b - depth / 100 * budget), b))
    ids = [*start, *filler[:before], *needle, *filler[before:], *question]
    return PasskeyPrompt(ids, key, len(start) + before, before, budget)


def is_correct(answer: str, key: str) -> bool:
    """Whether ``answer`` (leading spaces stripped) starts with ``key`` and no digit follows it."""
    text = answer.lstrip()
    return text.startswith(key) and not text[len(key) : len(key) + 1].isdigit()


def run_passkey(
    model: TextModel,
    config: PasskeyConfig,
    *,
    name: str = "",
    step: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PasskeyResult:
    """Score every cell of ``config`` with ``model`` (greedy; deterministic for ``config.seed``).

    ``name`` and ``step`` are recorded as ``model`` and ``step`` (default name: the model's description).

    Raises:
        ValueError: every length is above the model's context, or one is too short for the needle.
    """
    lengths = [n for n in config.lengths if n <= model.context]
    skipped = [n for n in config.lengths if n > model.context]
    if not lengths:
        raise ValueError(
            f"--passkey-lengths {_csv(config.lengths)}: all above the model's context of {model.context} tokens"
        )
    sampler = Sampler(greedy=True)
    accuracy: list[list[float]] = []
    tokens: list[list[list[int]]] = []
    for depth in config.depths:
        accuracy.append([])
        tokens.append([])
        for length in lengths:
            prompts = [
                build_prompt(model.encode, length, depth, k) for k in keys(config.seed, length, depth, config.trials)
            ]
            answers = [
                model.decode(continue_ids(model, p.ids, max_new_tokens=config.max_new_tokens, sampler=sampler))
                for p in prompts
            ]
            right = sum(is_correct(a, p.key) for a, p in zip(answers, prompts, strict=True))
            accuracy[-1].append(right / config.trials)
            tokens[-1].append([len(p.ids) for p in prompts])
            if progress:
                progress(f"depth {depth}% length {length}: {right}/{config.trials} (e.g. {answers[0]!r})")
    return PasskeyResult(
        model=name or model.description,
        step=step,
        lengths=lengths,
        depths=list(config.depths),
        trials=config.trials,
        seed=config.seed,
        accuracy=accuracy,
        prompt_tokens=tokens,
        skipped_lengths=skipped,
    )


def write_passkey(result: PasskeyResult, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``OUT/passkey.json`` and the heatmap ``OUT/passkey.png``, atomically.

    Returns:
        ``(json path, png path)``.
    """
    out = Path(out)
    return atomic.write_json(out / JSON_FILE, asdict(result)), atomic.write_bytes(out / PLOT_FILE, _heatmap(result))


def default_out(model: str | os.PathLike[str]) -> Path:
    """``RUN/eval/passkey`` for a run folder, ``./eval_results/passkey`` for a Hugging Face folder."""
    path = Path(model)
    return path / "eval" / "passkey" if (path / RUN_MARKER).is_file() else Path("eval_results") / "passkey"


def evaluate_passkey(
    model: str | os.PathLike[str],
    config: PasskeyConfig,
    *,
    step: int | None = None,
    device: str = "cpu",
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[PasskeyResult, tuple[Path, Path]]:
    """Load ``model`` (run folder or Hugging Face folder, offline), run the grid, write the files.

    Args:
        model: see :func:`titanenv.eval.generate.load_text_model`.
        config: the grid.
        step: checkpoint step of a run (default: the latest complete one).
        device: ``cpu`` or ``cuda``.
        out: output folder (default: :func:`default_out`).
        progress: called with one line per cell.

    Returns:
        The result and ``(json path, png path)``.

    Raises:
        ModelNotFound, FileNotFoundError, ValueError, RuntimeError: as :func:`load_text_model`
        and :func:`run_passkey`.
    """
    from titanenv import offline
    from titanenv.train.model import latest_checkpoint

    offline.apply()
    path = Path(model)
    if step is None and (path / RUN_MARKER).is_file():
        step = latest_checkpoint(path)[0]  # recorded, and loaded, as this step
    loaded = load_text_model(path, step=step, device=device)
    result = run_passkey(loaded, config, name=str(path), step=step, progress=progress)
    return result, write_passkey(result, default_out(path) if out is None else out)


def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def _start_tokens(encode: Encode) -> list[int]:
    """Tokens the tokenizer puts before any text (a BOS): the common start of two unrelated texts."""
    a, b = encode("a"), encode("b")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _piece(encode: Encode, start: list[int], text: str) -> list[int]:
    ids = encode(text)
    return ids[len(start) :] if ids[: len(start)] == start else ids


def _filler(encode: Encode, start: list[int], tokens: int) -> tuple[list[int], list[int]]:
    """The last ``tokens`` ids of the sentence cycle and the sentence boundaries in them (0 and ``tokens`` included).

    The cut is at the start (the first sentence may lack its first words), so the filler ends
    with a whole sentence and a needle at depth 100 % comes just before the question.
    """
    sentences = [_piece(encode, start, s) for s in FILLER]
    ids: list[int] = []
    bounds = [0]
    while len(ids) < tokens:
        ids += sentences[(len(bounds) - 1) % len(sentences)]
        bounds.append(len(ids))
    cut = len(ids) - tokens
    return ids[cut:], sorted({0, *(b - cut for b in bounds if b >= cut)})


def _heatmap(result: PasskeyResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on compute nodes
    import matplotlib.pyplot as plt

    rows, cols = len(result.depths), len(result.lengths)
    fig, ax = plt.subplots(figsize=(1.4 + 0.9 * cols, 1.2 + 0.55 * rows))
    image = ax.imshow(result.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(result.accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(cols), [str(n) for n in result.lengths])
    ax.set_yticks(range(rows), [f"{d}%" for d in result.depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    step = "" if result.step is None else f" step {result.step}"
    ax.set_title(f"{Path(result.model).name or result.model}{step}\npasskey, {result.trials} trials", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
