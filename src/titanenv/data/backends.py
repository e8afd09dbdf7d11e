"""Tokenizer backends: Hugging Face ``tokenizers`` (the reference) and ``gigatoken`` (fast).

Both turn a batch of texts into ``(flat, sizes)``: ``flat`` the token ids of every text
concatenated (int64), ``sizes`` the ids per text (int64), with no special tokens added
(``add_special_tokens=False``). Each encoder uses one thread: parallelism comes from worker
processes, so ``--workers N`` means N cores.

``encode(texts, plain=True)`` (``--special-tokens plain``) tokenizes special-token text such as
``<|endoftext|>`` inside a document as ordinary text; by default (``parse``) it becomes the
special token's id, as in Megatron-LM and ``Tokenizer.encode``. hf does it with
``Tokenizer.encode_special_tokens = True``; gigatoken has no such switch, so it loads the
``tokenizer.json`` without its special added tokens, and the exactness check compares that
with hf's own plain mode.

``choose`` picks the backend for a run: ``auto`` and ``gigatoken`` first check, on a sample
of the run's own documents plus synthetic probes (:func:`probes`), that gigatoken's ids equal
the reference's. ``auto`` falls back
to ``hf`` (and says why) when gigatoken is missing, cannot load the tokenizer, or differs;
an explicit ``gigatoken`` raises instead.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("titanenv.preprocess")
BACKENDS = ("auto", "hf", "gigatoken")


class HFEncoder:
    """Hugging Face ``tokenizers``: ``Tokenizer.encode_batch_fast(texts, add_special_tokens=False)``.

    ``encode_batch_fast`` is ``encode_batch`` without character offsets, which we never use:
    the same ids, about 1.5x faster.
    """

    name = "hf"

    def __init__(self, tokenizer_json: Path, tokenizer: Tokenizer | None = None) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tok = tokenizer
        self._batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast: tokenizers >= 0.21

    def encode(self, texts: list[str], plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(flat, sizes)`` (int64); ``plain``: special-token text stays ordinary text."""
        self.tok.encode_special_tokens = plain  # set on every call: the Tokenizer object may be shared
        ids = [e.ids for e in self._batch(texts, add_special_tokens=False)]
        sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(sizes.sum()))
        return flat, sizes


class GigatokenEncoder:
    """``gigatoken`` (Rust), loaded from the same ``tokenizer.json`` bytes, single-threaded."""

    name = "gigatoken"

    def __init__(self, tokenizer_json: Path) -> None:
        import gigatoken

        self.raw = Path(tokenizer_json).read_bytes()
        self.tok = gigatoken.Tokenizer.from_json(self.raw)
        self._plain: Any = None  # a gigatoken.Tokenizer without the special tokens, made on first use

    def encode(self, texts: list[str], plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(flat, sizes)`` (int64); ``plain``: special-token text stays ordinary text."""
        import awkward as ak

        if plain and self._plain is None:
            import gigatoken

            self._plain = gigatoken.Tokenizer.from_json(without_special_tokens(self.raw))
        out = (self._plain if plain else self.tok).encode_batch(texts, parallel=False)
        sizes = np.asarray(ak.num(out, axis=1), dtype=np.int64)
        flat = np.asarray(ak.flatten(out, axis=None), dtype=np.int64) if len(texts) else np.zeros(0, np.int64)
        return flat, sizes


ENCODERS: dict[str, type[HFEncoder] | type[GigatokenEncoder]] = {"hf": HFEncoder, "gigatoken": GigatokenEncoder}
Encoder = HFEncoder | GigatokenEncoder


def without_special_tokens(tokenizer_json: bytes) -> bytes:
    """``tokenizer.json`` bytes with the special added tokens removed (their ids stay in the model's
    vocabulary): what ``encode_special_tokens = True`` means, for tokenizers that lack the switch."""
    spec = json.loads(tokenizer_json)
    spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
    return json.dumps(spec).encode()


def build(name: str, tokenizer_json: Path) -> Encoder:
    """The encoder ``name`` (``hf`` or ``gigatoken``) for ``tokenizer_json``; reused while the file is unchanged."""
    key = _key(name, tokenizer_json)
    if key not in _encoders:
        if len(_encoders) >= 4:
            _encoders.pop(next(iter(_encoders)))
        _encoders[key] = ENCODERS[name](Path(tokenizer_json))
    return _encoders[key]


def adopt(tokenizer_json: Path, tokenizer: Tokenizer) -> None:
    """Reuse an already loaded ``tokenizers.Tokenizer`` as the ``hf`` encoder of ``tokenizer_json``."""
    _encoders[_key("hf", tokenizer_json)] = HFEncoder(tokenizer_json, tokenizer)


def release() -> None:
    """Drop the encoders :func:`build` keeps for reuse."""
    _encoders.clear()


_encoders: dict[tuple[str, str, int, int], Encoder] = {}


def _key(name: str, tokenizer_json: Path) -> tuple[str, str, int, int]:
    st = Path(tokenizer_json).stat()
    return name, str(tokenizer_json), st.st_mtime_ns, st.st_size


@dataclass(frozen=True)
class Choice:
    """The backend a run uses, and why (recorded in the manifest)."""

    requested: str
    used: str
    reason: str
    checked_documents: int = 0
    checked_tokens: int = 0


class BackendMismatch(ValueError):
    """``--tokenizer-backend gigatoken`` was asked for, but it cannot give the reference's ids."""


def choose(requested: str, tokenizer_json: Path, sample: list[tuple[object, str]], plain: bool = False) -> Choice:
    """Pick the backend: ``hf`` as asked, or gigatoken once it matched the reference on ``sample``.

    Args:
        requested: ``auto``, ``hf`` or ``gigatoken``.
        sample: ``(where, text)`` documents from this run's own input; ``str(where)`` names one.
        plain: compare in ``--special-tokens plain`` mode (hf's ``encode_special_tokens``).

    Raises:
        BackendMismatch: ``requested == "gigatoken"`` and gigatoken is unavailable or differs.
        ValueError: ``requested`` is not a known backend.
    """
    if requested not in BACKENDS:
        raise ValueError(f"--tokenizer-backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    if requested == "hf":
        return Choice("hf", "hf", "requested")
    problem, docs, tokens = _check_gigatoken(tokenizer_json, sample, plain)
    if problem is not None and plain:
        problem += " (with --special-tokens plain)"
    if problem is None:
        mode = " (special-token text as plain text)" if plain else ""
        return Choice(requested, "gigatoken", f"ids equal the hf reference{mode} on the sample", docs, tokens)
    if requested == "gigatoken":
        raise BackendMismatch(f"--tokenizer-backend gigatoken: {problem}; use --tokenizer-backend hf")
    # A difference deserves a warning; a tokenizer gigatoken does not support is routine.
    level = logging.WARNING if "differ" in problem else logging.INFO
    log.log(level, "tokenizer backend: using hf, not gigatoken: %s", problem)
    return Choice(requested, "hf", f"gigatoken not used: {problem}", docs, tokens)


# Edge cases of pre-tokenizer regexes: whitespace runs, line ends, digits, contractions, scripts.
_EDGE_PROBES = (
    "  two  spaces\t\ttabs \u00a0nbsp\r\nCRLF\n\n\nblank   ",
    "1234567890 3.14159 1,000,000 x2y3",
    "I'll've we'RE you'd it's O'Neil's",
    "Ünïcödé naïve café — “quotes” …",
    "中文字符 日本語のテキスト 한국어 텍스트 Ελληνικά русский עברית العربية",
    "emoji 🤗👍🏽 e\u0301 combining, zero\u200bwidth",
    "code: def f(x): return x**2  # comment\n\tif a != b { c[i] += 1; }",
)


def probes(tok: Tokenizer) -> list[str]:
    """Synthetic texts where fast tokenizers tend to differ: :data:`_EDGE_PROBES`, and every
    added token (up to 256) glued to words, spaced, doubled and between lines."""
    added = [t.content for t in list(tok.get_added_tokens_decoder().values())[:256] if t.content]
    return [*_EDGE_PROBES, *(p for t in added for p in (f"a{t}b", f"a {t} b", f" {t}", f"{t}{t}", f"x\n{t}\ny"))]


def _check_gigatoken(
    tokenizer_json: Path, sample: list[tuple[object, str]], plain: bool = False
) -> tuple[str | None, int, int]:
    """(None, documents, tokens) when gigatoken equals the reference on ``sample``, else (why, ...)."""
    try:
        fast = build("gigatoken", tokenizer_json)
        fast.encode(["probe"], plain=plain)  # plain mode loads a second tokenizer: fail here, not in a worker
    except ImportError:
        return "the gigatoken package is not installed", 0, 0
    except Exception as e:  # gigatoken raises plain exceptions for tokenizers it does not support
        return f"gigatoken cannot load {tokenizer_json} ({str(e).splitlines()[0]})", 0, 0
    ref = build("hf", tokenizer_json)
    assert isinstance(ref, HFEncoder)
    sample = [*sample, *(("probe " + repr(t), t) for t in probes(ref.tok))]
    texts = [t for _, t in sample]
    got_flat, got_sizes = fast.encode(texts, plain=plain)
    ref_flat, ref_sizes = ref.encode(texts, plain=plain)
    if np.array_equal(got_sizes, ref_sizes) and np.array_equal(got_flat, ref_flat):
        return None, len(texts), int(ref_sizes.sum())
    ends_got, ends_ref = np.cumsum(got_sizes), np.cumsum(ref_sizes)
    for i, (where, _) in enumerate(sample):
        a = got_flat[ends_got[i] - got_sizes[i] : ends_got[i]]
        b = ref_flat[ends_ref[i] - ref_sizes[i] : ends_ref[i]]
        if not np.array_equal(a, b):
            k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
            return f"its ids differ from the hf reference at {where}, token {k}", len(texts), int(ref_sizes.sum())
    return "its ids differ from the hf reference", len(texts), int(ref_sizes.sum())
