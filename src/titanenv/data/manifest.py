"""``PREFIX.manifest.json``: what made a tokenized dataset, and the checks that read it back.

The data -> train contract, typed: :class:`Manifest` (with :class:`Counts` that add up and a
small record per nested object) is built from a run (:meth:`Manifest.build`), merged from array
tasks (:meth:`Manifest.merge`), written (:meth:`Manifest.write`) and read back
(:meth:`Manifest.read`, which names the file and the field when one is missing or mistyped).
Every reader in titanenv uses its attributes; the JSON on disk keeps the keys below.

Written last and atomically beside each output prefix, so its presence marks the output
complete. Fields (schema 1):

``titanenv_version``, ``schema``
``output``            this prefix: ``{"prefix", "split", "key", "documents", "tokens", "max_token_id"}``;
                      ``max_token_id`` is the largest id in this output's ``.bin`` (int, -1 when it
                      holds no tokens), for the vocabulary check before training
``outputs``           every prefix the run wrote: ``{split: {key: prefix}}``
``tokenizer``         ``{"path", "sha256", "vocab_size", "eod_id"}`` (sha256 of ``tokenizer.json``)
``backend``           ``{"requested", "used", "reason", "checked_documents", "checked_tokens"}``
``dtype``             ``uint16`` or ``int32`` (Megatron codes 8 and 4); ``append_eod``; ``json_keys``
``special_tokens``    ``parse`` or ``plain`` (``--special-tokens``); ``max_document_chars``
``split``             ``{"val_fraction", "seed", "shuffle"}``
``shard``             ``{"index", "count"}``, or ``{"merged_from": n}`` after ``--merge``
``documents_in`` = ``documents_written`` + ``documents_rejected`` (whole run, all splits)
``documents_written_by_split``, ``tokens`` (whole run), ``rejected_by_reason``,
``rejected_examples`` (first few ``file:line`` per reason), ``bom_stripped``,
``documents_with_special_text`` (written documents holding a special token's text, e.g. ``<|endoftext|>``)
``inputs``            ``[{"path", "size", "sha256"}]``, each file this run read (sha256 is null
                      in an array task for a file whose first piece another task read)
``files_skipped``     ``{"count", "examples"}``: files in folder inputs not read (hidden files,
                      ``.bin``/``.idx``/``.manifest.json`` outputs, ``*.parts/``); ``--dry-run`` lists all
``fingerprint``       hash of the settings and input sizes/mtimes; a rerun with the same one skips

Keys added after the first release (``special_tokens``, ``max_document_chars``, ``files_skipped``,
``documents_with_special_text``, ``output.max_token_id``) may be absent: they read as their defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
import typing
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from titanenv import __version__, atomic
from titanenv.digest import sha256_file

if TYPE_CHECKING:
    from titanenv.data.backends import Choice
    from titanenv.data.settings import PreprocessConfig
    from titanenv.data.tokenizer import TokenizerInfo

SUFFIX = ".manifest.json"
SCHEMA = 1
MAX_EXAMPLES = 5
"""Rejected documents kept per reason as ``file:line`` (``rejected_examples``)."""
_SKIPPED_EXAMPLES = 5  # files a folder input skipped, named in ``files_skipped.examples``

_OMIT_NONE = {"omit_none": True}  # a key newer manifests add: absent from the JSON while None
_FLAT = {"flatten": True}  # the record's keys sit at the top level of the JSON


class TokenizerMismatch(ValueError):
    """The data was tokenized with a different tokenizer than the one given for training."""


class ManifestError(ValueError):
    """A manifest field is missing or of the wrong type, or its document counts do not add up.

    Attributes:
        field: the field's path in the JSON (``tokenizer.eod_id``, ``inputs[2].size``).
        problem: what is wrong with it.
        path: the manifest file (None for a manifest being built).
    """

    def __init__(self, field: str, problem: str, path: Path | None = None) -> None:
        self.field, self.problem, self.path = field, problem, path
        text = f"field {field!r} {problem}"
        if path is not None:
            text = f"{path}: {text}; rerun `titanenv preprocess` for this prefix to write it again"
        super().__init__(text)

    def at(self, path: Path | None) -> ManifestError:
        """The same error, naming the file."""
        return ManifestError(self.field, self.problem, path)


@dataclass(frozen=True)
class TokenizerRecord:
    """``tokenizer``: the ``tokenizer.json`` the data was made with."""

    path: str
    sha256: str
    """sha256 hex digest of the ``tokenizer.json`` file."""
    vocab_size: int
    """Ids in use, special tokens included."""
    eod_id: int | None
    """The end-of-document id (None: the tokenizer has none)."""

    @classmethod
    def of(cls, info: TokenizerInfo) -> TokenizerRecord:
        return cls(str(info.path), info.sha256, info.vocab_size, info.eod_id)


@dataclass(frozen=True)
class BackendRecord:
    """``backend``: the tokenizer backend asked for, the one used (``hf``, ``gigatoken``, ``gigatoken+hf``
    when a resumed run mixed them, ``none``) and why; the sample it was checked on (documents, tokens)."""

    requested: str
    used: str
    reason: str
    checked_documents: int = 0
    checked_tokens: int = 0

    @classmethod
    def of(cls, choice: Choice, used: str) -> BackendRecord:
        return cls(choice.requested, used, choice.reason, choice.checked_documents, choice.checked_tokens)


@dataclass(frozen=True)
class SplitRecord:
    """``split``: ``--val-fraction`` (0 to 1), ``--seed`` and ``--shuffle``."""

    val_fraction: float
    seed: int
    shuffle: bool


@dataclass(frozen=True)
class ShardRecord:
    """``shard``: ``{"index", "count"}`` of an array task, or ``{"merged_from": n}`` after ``--merge``."""

    index: int | None = field(default=None, metadata=_OMIT_NONE)
    count: int | None = field(default=None, metadata=_OMIT_NONE)
    merged_from: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass(frozen=True)
class PiecesRecord:
    """``pieces``: pieces this task (or all merged tasks) tokenized, pieces planned, bytes per piece."""

    count: int
    planned: int
    piece_bytes: int
    text_document: str


@dataclass(frozen=True)
class InputRecord:
    """One ``inputs`` entry: a file the run read, its size in bytes and sha256 (None in an array
    task for a file whose first piece another task read)."""

    path: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class SkippedRecord:
    """``files_skipped``: files in folder inputs not read, counted, with the first few named."""

    count: int = 0
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputRecord:
    """``output``: the prefix this manifest sits beside, its split and key, documents and tokens in it."""

    prefix: str
    split: str
    key: str
    documents: int
    tokens: int
    max_token_id: int | None = field(default=None, metadata=_OMIT_NONE)
    """The largest id in this ``.bin`` (-1: no tokens; None in manifests older than the field)."""


@dataclass(frozen=True, kw_only=True)
class Counts:
    """The document and token counts of a run, over all its splits; they add up.

    ``documents_in = documents_written + documents_rejected``, ``documents_written`` is the sum
    of ``documents_written_by_split``, ``documents_rejected`` of ``rejected_by_reason`` and
    ``tokens`` of ``tokens_by_split``. In the JSON these keys sit at the top level.

    Raises:
        ManifestError: on construction, when the counts do not add up or one is negative.
    """

    documents_in: int
    documents_written: int
    documents_rejected: int
    documents_written_by_split: dict[str, int]
    tokens: int
    tokens_by_split: dict[str, int]
    rejected_by_reason: dict[str, int]
    rejected_examples: dict[str, list[str]]
    """The first :data:`MAX_EXAMPLES` rejected documents per reason, as ``file:line``."""
    bom_stripped: int
    documents_with_special_text: int = 0
    """Written documents holding a special token's text (``<|endoftext|>``)."""

    def __post_init__(self) -> None:
        sums = (
            (
                "documents_written",
                self.documents_written,
                "documents_written_by_split",
                self.documents_written_by_split,
            ),
            ("documents_rejected", self.documents_rejected, "rejected_by_reason", self.rejected_by_reason),
            ("tokens", self.tokens, "tokens_by_split", self.tokens_by_split),
        )
        for name, total, parts_name, parts in sums:
            if total != sum(parts.values()):
                raise ManifestError(name, f"is {total}, but {parts_name} adds up to {sum(parts.values())}")
        if self.documents_in != self.documents_written + self.documents_rejected:
            raise ManifestError(
                "documents_in",
                f"is {self.documents_in}, but documents_written {self.documents_written} + "
                f"documents_rejected {self.documents_rejected} = {self.documents_written + self.documents_rejected}",
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value.values() if isinstance(value, dict) else [value]
            if any(isinstance(v, int) and v < 0 for v in values):
                raise ManifestError(f.name, f"is negative ({value})")

    @classmethod
    def add(cls, parts: Iterable[Counts]) -> Counts:
        """The counts of several pieces or array tasks together; examples keep the first few per
        reason, in the order given."""
        written: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        docs_in = bom = special = 0
        for c in parts:
            docs_in += c.documents_in
            bom += c.bom_stripped
            special += c.documents_with_special_text
            written.update(c.documents_written_by_split)
            tokens.update(c.tokens_by_split)
            rejected.update(c.rejected_by_reason)
            for reason, where in c.rejected_examples.items():
                kept = examples.setdefault(reason, [])
                kept += where[: MAX_EXAMPLES - len(kept)]
        return cls(
            documents_in=docs_in,
            documents_written=sum(written.values()),
            documents_rejected=sum(rejected.values()),
            documents_written_by_split=dict(written),
            tokens=sum(tokens.values()),
            tokens_by_split=dict(tokens),
            rejected_by_reason=dict(rejected),
            rejected_examples=examples,
            bom_stripped=bom,
            documents_with_special_text=special,
        )

    @classmethod
    def of_pieces(cls, piece_stats: Iterable[dict[str, Any]]) -> Counts:
        """:meth:`add` of pieces' counts as :func:`titanenv.data.worker.process` returns them
        (``documents_in``, ``written`` and ``tokens`` per split, ``rejected`` and ``examples`` per reason...)."""
        return cls.add(
            cls(
                documents_in=s["documents_in"],
                documents_written=sum(s["written"].values()),
                documents_rejected=sum(s["rejected"].values()),
                documents_written_by_split=s["written"],
                tokens=sum(s["tokens"].values()),
                tokens_by_split=s["tokens"],
                rejected_by_reason=s["rejected"],
                rejected_examples=s["examples"],
                bom_stripped=s.get("bom_stripped", 0),
                documents_with_special_text=s.get("documents_with_special_text", 0),
            )
            for s in piece_stats
        )


# Settings every array task of one merge must share (a difference means they were run with other flags).
_MUST_AGREE = (
    "tokenizer", "dtype", "append_eod", "json_keys", "special_tokens", "max_document_chars", "split", "bases", "schema",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class Manifest(Mapping[str, Any]):
    """``PREFIX.manifest.json``, typed: what made a tokenized dataset (fields in the module doc).

    A dataclass, not a pydantic model: the data stage is stdlib dataclasses throughout
    (``PreprocessConfig``, ``PieceJob``, ``Choice``), the records are plain values that pickle
    and compare, and the one rule beyond types (counts that add) is a ``__post_init__`` either
    way. Reading checks every field's JSON type itself (:meth:`from_json`), so an error names
    the file and the field.

    Read-only mapping too: ``m["tokenizer"]["eod_id"]`` is the JSON view (as on disk), for
    scripts and tests that index the JSON; titanenv's own code reads attributes.

    Raises:
        ManifestError: on construction, when the counts do not add up (see :class:`Counts`).
    """

    schema: int
    titanenv_version: str
    outputs: dict[str, dict[str, str]]
    """Every prefix the run wrote: ``{split: {key: prefix}}``."""
    bases: dict[str, str]
    """Output base per split, before shard and key suffixes."""
    tokenizer: TokenizerRecord
    backend: BackendRecord
    dtype: str
    """``uint16`` or ``int32``."""
    append_eod: bool
    json_keys: tuple[str, ...]
    special_tokens: str = "parse"
    """``parse`` or ``plain`` (manifests older than the field: ``parse``, the only mode then)."""
    max_document_chars: int | None = field(default=None, metadata=_OMIT_NONE)
    split: SplitRecord
    shard: ShardRecord
    pieces: PiecesRecord
    counts: Counts = field(metadata=_FLAT)
    inputs: tuple[InputRecord, ...]
    files_skipped: SkippedRecord = SkippedRecord()
    fingerprint: str
    """Hash of the settings and input sizes/mtimes; a rerun with the same one skips."""
    output: OutputRecord | None = field(default=None, metadata=_OMIT_NONE)
    """This prefix; None only in the run-wide manifest before :meth:`for_output` (never on disk)."""

    # --- the JSON view -------------------------------------------------------------------------

    @functools.cached_property
    def _json(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], _dump(self))

    def __getitem__(self, key: str) -> Any:
        return self._json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-able dicts and lists, keys as on disk (a fresh copy)."""
        return typing.cast(dict[str, Any], _dump(self))

    @classmethod
    def from_json(cls, obj: Any, path: Path | None = None) -> Manifest:
        """Check and convert parsed JSON. Unknown keys are ignored; keys newer manifests added
        (``special_tokens``, ``max_document_chars``, ``files_skipped``, ``documents_with_special_text``,
        ``output.max_token_id``) take their defaults when absent.

        Raises:
            ManifestError: a required field is missing or has the wrong JSON type, or the counts
                do not add up; the message names ``path`` and the field.
        """
        try:
            m = typing.cast(Manifest, _load(cls, obj, ""))
            if m.output is None:
                raise ManifestError("output", "is missing")
        except ManifestError as e:
            raise e.at(path) from None
        return m

    # --- build, read, write, merge -------------------------------------------------------------

    @classmethod
    def build(
        cls,
        cfg: PreprocessConfig,
        *,
        tokenizer: TokenizerInfo,
        backend: BackendRecord,
        dtype: str,
        outputs: dict[str, dict[str, str]],
        pieces: PiecesRecord,
        counts: Counts,
        inputs: Sequence[InputRecord],
        skipped: Sequence[os.PathLike[str] | str],
        fingerprint: str,
    ) -> Manifest:
        """The run-wide manifest of one ``titanenv preprocess`` run (array task); :meth:`for_output`
        completes it per output. ``skipped``: every file folder inputs skipped (the first few are named).

        Raises:
            ManifestError: the counts do not add up (a bug).
        """
        shard = ShardRecord(index=cfg.shard_index, count=cfg.num_shards)
        return cls(
            schema=SCHEMA,
            titanenv_version=__version__,
            outputs=outputs,
            bases={s: str(b) for s, b in cfg.bases().items()},
            tokenizer=TokenizerRecord.of(tokenizer),
            backend=backend,
            dtype=dtype,
            append_eod=cfg.append_eod,
            json_keys=tuple(cfg.json_keys),
            special_tokens=cfg.special_tokens,
            max_document_chars=cfg.max_document_chars,
            split=SplitRecord(cfg.val_fraction, cfg.seed, cfg.shuffle),
            shard=shard,
            pieces=pieces,
            counts=counts,
            inputs=tuple(inputs),
            files_skipped=SkippedRecord(len(skipped), tuple(os.fspath(p) for p in skipped[:_SKIPPED_EXAMPLES])),
            fingerprint=fingerprint,
        )

    def for_output(self, output: OutputRecord) -> Manifest:
        """This manifest for one of its outputs."""
        return dataclasses.replace(self, output=output)

    @classmethod
    def read(cls, prefix: str | os.PathLike[str]) -> Manifest | None:
        """The manifest beside ``prefix`` (or the ``.manifest.json`` file itself), or None when there
        is none (data from another tool).

        Raises:
            ValueError: the file is not valid JSON (named).
            ManifestError: a required field is missing or mistyped, or the counts do not add up
                (file and field named).
        """
        path = path_for(prefix)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); rerun `titanenv preprocess`") from None
        return cls.from_json(obj, path)

    def write(self, prefix: str | os.PathLike[str] | None = None) -> Path:
        """Write ``PREFIX.manifest.json`` atomically (:mod:`titanenv.atomic`: a temporary name, then
        a rename; the temporary file is removed on errors such as a full disk).

        Args:
            prefix: where; default ``output.prefix``.

        Returns:
            The manifest's path.

        Raises:
            ValueError: neither ``prefix`` nor ``output`` is set.
            atomic.DiskFull, OSError: the write failed.
        """
        if prefix is None:
            if self.output is None:
                raise ValueError("a manifest without an output needs a prefix to be written")
            prefix = self.output.prefix
        path = path_for(prefix)
        atomic.write_text(path, json.dumps(self._json, indent=2) + "\n")
        return path

    @classmethod
    def merge(cls, manifests: Sequence[Manifest], outputs: dict[str, dict[str, str]], what: str) -> Manifest:
        """The run-wide manifest of array tasks' outputs joined in task order (``--merge``).

        Settings come from the first task (all must agree); counts, pieces and the backends used
        add up; inputs are the union (a file's sha256 from the task that read its start);
        ``shard`` becomes ``{"merged_from": n}`` and the fingerprint covers the tasks' fingerprints.

        Args:
            manifests: one per task, in task order (at least one).
            outputs: the merged prefixes, ``{split: {key: prefix}}``.
            what: the merged output prefix, for the error message.

        Raises:
            ValueError: the tasks disagree on a setting (named): they were run with other flags.
        """
        for key in _MUST_AGREE:
            if len({repr(getattr(m, key)) for m in manifests}) > 1:
                raise ValueError(f"the array tasks of {what} disagree on {key}: rerun them with the same flags")
        first = manifests[0]
        used = sorted({u for m in manifests for u in m.backend.used.split("+") if u != "none"}) or ["none"]
        inputs: dict[str, InputRecord] = {}
        for m in manifests:
            for item in m.inputs:
                if item.path not in inputs or inputs[item.path].sha256 is None:
                    inputs[item.path] = item
        return dataclasses.replace(
            first,
            outputs=outputs,
            backend=dataclasses.replace(first.backend, used="+".join(used)),
            shard=ShardRecord(merged_from=len(manifests)),
            pieces=dataclasses.replace(first.pieces, count=sum(m.pieces.count for m in manifests)),
            counts=Counts.add(m.counts for m in manifests),
            inputs=tuple(inputs.values()),
            # every task expands the same --input, so each saw the same skipped files
            files_skipped=max((m.files_skipped for m in manifests), key=lambda r: r.count),
            fingerprint=fingerprint([m.fingerprint for m in manifests]),
            output=None,
        )


read = Manifest.read


def path_for(prefix: str | os.PathLike[str]) -> Path:
    """``PREFIX.manifest.json`` for an output prefix (a path ending in ``.manifest.json`` is kept)."""
    text = os.fspath(prefix)
    return Path(text if text.endswith(SUFFIX) else text + SUFFIX)


def check_tokenizer(
    manifest_path_or_prefix: str | os.PathLike[str], tokenizer_info: TokenizerInfo | str
) -> Manifest | None:
    """Refuse data tokenized with a different tokenizer than ``tokenizer_info``.

    Args:
        manifest_path_or_prefix: a dataset prefix (``PREFIX`` of ``PREFIX.bin``) or its
            ``PREFIX.manifest.json``.
        tokenizer_info: a :class:`titanenv.data.tokenizer.TokenizerInfo` (from
            ``titanenv.data.tokenizer.load``), or the sha256 hex digest of a ``tokenizer.json``.

    Returns:
        The manifest when its tokenizer sha256 matches; None when the data has no manifest
        (made by another tool), so there is nothing to compare: the caller may warn.

    Raises:
        TokenizerMismatch: the manifest names another tokenizer; the message gives both.
        ValueError: the manifest is not valid JSON.
        ManifestError: a field is missing or mistyped (file and field named).
    """
    manifest = read(manifest_path_or_prefix)
    if manifest is None:
        return None
    given = tokenizer_info if isinstance(tokenizer_info, str) else tokenizer_info.sha256
    given_path = "" if isinstance(tokenizer_info, str) else f" ({tokenizer_info.path})"
    used = manifest.tokenizer
    if used.sha256 != given:
        raise TokenizerMismatch(
            f"{path_for(manifest_path_or_prefix)}: the data was tokenized with {used.path} "
            f"(sha256 {used.sha256}), but the tokenizer given is sha256 {given}{given_path}. "
            "Pass the tokenizer the data was made with, or tokenize the data again with this one."
        )
    return manifest


file_sha256 = sha256_file  # the one file hash: titanenv.digest


def fingerprint(settings: Any) -> str:
    """A short stable hash (32 hex digits) of JSON-able ``settings``."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --- JSON <-> records: each field's type is checked against its annotation ------------------------

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _load(tp: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``. Raises ManifestError naming ``where``."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _load_record(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        return _load_union(args, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ManifestError(where, f"must be a list, not {_kind(value)}")
        items = [_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(where, f"must be an object, not {_kind(value)}")
        return {k: _load(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ManifestError(where, f"must be {_TYPE_NAMES[tp]}, not {_kind(value)} ({json.dumps(value)[:40]})")
    return float(value) if tp is float else value


def _load_record(tp: type, value: Any, where: str) -> Any:
    """A dataclass record from a JSON object (see :func:`_load`)."""
    if not isinstance(value, dict):
        raise ManifestError(where or "(top level)", f"must be an object, not {_kind(value)}")
    hints = _hints(tp)
    kwargs = {}
    for f in dataclasses.fields(tp):
        name = f"{where}.{f.name}" if where else f.name
        if f.metadata.get("flatten"):
            kwargs[f.name] = _load(hints[f.name], value, where)
        elif f.name in value:
            kwargs[f.name] = _load(hints[f.name], value[f.name], name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ManifestError(name, "is missing")
    try:
        return tp(**kwargs)
    except ManifestError as e:  # a record's own check (counts that add)
        raise ManifestError(f"{where}.{e.field}" if where else e.field, e.problem) from None


def _load_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """An optional ``X | None`` from JSON (see :func:`_load`)."""
    if value is None and type(None) in args:
        return None
    (inner,) = [a for a in args if a is not type(None)]
    try:
        return _load(inner, value, where)
    except ManifestError as e:
        if e.field != where or type(None) not in args:
            raise
        raise ManifestError(where, f"{e.problem.replace(', not', ' or null, not')}") from None


def _dump(value: Any) -> Any:
    """Records as JSON-able dicts (flattened and omitted fields as their metadata says)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("flatten"):
                out.update(_dump(v))
            elif not (v is None and f.metadata.get("omit_none")):
                out[f.name] = _dump(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
