"""Tokenize corpora into Megatron-LM indexed datasets, in parallel, resumably, in bounded memory.

Flags follow Megatron-LM's ``tools/preprocess_data.py``: ``--input``, ``--output-prefix``,
``--json-keys``, ``--append-eod``, ``--workers``, ``--tokenizer-model``.

Each document becomes one sequence: ``tokenizer.encode(text, add_special_tokens=False).ids``
plus EOD when asked. The run:

1. expands the inputs (:mod:`~titanenv.data.sources`) and cuts them into pieces
   (:mod:`~titanenv.data.pieces`) from file sizes alone; an array task takes a contiguous
   block of pieces (``--shard-index``/``--num-shards``, default from ``SLURM_ARRAY_TASK_*``);
2. picks the tokenizer backend, checking gigatoken against the reference on a sample
   (:mod:`~titanenv.data.backends`);
3. lets worker processes tokenize whole pieces into their own part files under
   ``PREFIX.parts/`` (:mod:`~titanenv.data.worker`), skipping pieces a killed run finished;
4. joins the parts in piece order into ``PREFIX.bin``/``.idx`` (streaming), writes
   ``PREFIX.manifest.json`` last (:mod:`~titanenv.data.manifest`) and removes the parts.

The bytes depend only on the inputs and the settings, never on ``--workers`` or the number of
array tasks: ``merge`` joins the tasks' outputs in task order, which is piece order.

Empty outputs are errors (:class:`EmptyOutput`, unless ``allow_empty``): a single run fails when
an output gets no tokens; an array task fails when it read documents and rejected every one, but
a task that got no pieces (a small input split over many tasks) or an empty validation share
succeeds with empty outputs, and :func:`merge` fails when the total of an output is empty.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from titanenv.data import backends, indexed, manifest, outputs, pieces, readers, sources, worker
from titanenv.data import merge as merging
from titanenv.data import tokenizer as toklib
from titanenv.data.documents import DEFAULT_MAX_DOCUMENT_CHARS, MissingKey
from titanenv.data.outputs import prefix_for, shard_prefix
from titanenv.data.pieces import Piece
from titanenv.data.pool import Pool, WorkerDied
from titanenv.data.progress import Progress
from titanenv.data.settings import PreprocessConfig
from titanenv.data.worker import BadDocument

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "PreprocessConfig",
    "run",
    "merge",
    "dry_run",
    "BadDocument",
    "EmptyOutput",
    "MissingKey",
    "DEFAULT_MAX_DOCUMENT_CHARS",
    "WorkerDied",
    "shard_prefix",
    "prefix_for",
]
log = logging.getLogger("titanenv.preprocess")
MANIFEST_SUFFIX = manifest.SUFFIX
_SAMPLE_CHARS = 1 << 18  # text checked against the reference before a gigatoken run (~0.2 s of hf)
_SAMPLE_PIECES = 8


class EmptyOutput(ValueError):
    """An output would hold no tokens (every document rejected, or none read); ``allow_empty`` permits it."""


@dataclass
class _Plan:
    """The inputs, their pieces, this task's block of them, and the output prefix per (split, key index)."""

    files: list[sources.InputFile]
    piece_bytes: int
    pieces: list[Piece]
    mine: list[Piece]
    outputs: dict[tuple[str, int], Path]
    skipped: list[Path]
    """Files in folder inputs that are not read (hidden, tokenized outputs)."""


def _plan(cfg: PreprocessConfig) -> _Plan:
    skipped: list[Path] = []
    files = sources.expand(cfg.inputs, skipped)
    piece_bytes = piece_size(cfg.piece_mb, sum(f.size for f in files))
    planned = pieces.plan(files, piece_bytes, cfg.text_document)
    ordered = pieces.shuffled(planned, cfg.seed) if cfg.shuffle else planned
    mine = pieces.assign(ordered, cfg.shard_index, cfg.num_shards)
    shard = (cfg.shard_index, cfg.num_shards) if cfg.num_shards > 1 else None
    targets = {
        (split, j): outputs.prefix_for(base, key, cfg.json_keys, shard)
        for split, base in cfg.bases().items()
        for j, key in enumerate(cfg.json_keys)
    }
    return _Plan(files, piece_bytes, planned, mine, targets, skipped)


def piece_size(piece_mb: float | None, total_bytes: int) -> int:
    """Bytes per piece: ``piece_mb`` when given, else ``total_bytes / 64`` clamped to 4..256 MB:
    enough pieces to keep many workers busy, few enough that opening, renaming and removing
    each piece's files stays small next to tokenizing it (about 40 ms per MB with ``tokenizers``,
    1 ms with gigatoken)."""
    if piece_mb is not None:
        return max(1, round(piece_mb * 1e6))
    return int(min(256e6, max(4e6, total_bytes // 64)))


def dry_run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Print the inputs, the pieces each array task would take and the outputs; write nothing.

    Returns:
        ``{"inputs": [...], "skipped": [...], "pieces": n, "shards": [[piece indices] per task],
        "outputs": [...]}``; ``skipped`` lists every file of a folder input that is not read.

    Raises:
        sources.InputError, toklib.TokenizerNotFound: as :func:`run`.
    """
    plan = _plan(cfg)
    tok = toklib.resolve(cfg.tokenizer_model)
    total = sum(f.size for f in plan.files)
    print(f"tokenizer: {tok}")
    print(f"inputs: {len(plan.files)} files, {total / 1e6:,.1f} MB")
    for f in plan.files[:20]:
        print(f"  {f.path}  ({f.format}{', ' + f.compression if f.compression else ''}, {f.size / 1e6:,.1f} MB)")
    if len(plan.files) > 20:
        print(f"  ... and {len(plan.files) - 20} more")
    if plan.skipped:
        print(
            f"skipped {len(plan.skipped)} files in folder inputs (hidden, or .bin/.idx/.manifest.json/.parts outputs):"
        )
        for p in plan.skipped:
            print(f"  {p}")
    ordered = pieces.shuffled(plan.pieces, cfg.seed) if cfg.shuffle else plan.pieces
    print(
        f"pieces: {len(plan.pieces)} of about {plan.piece_bytes / 1e6:g} MB{' (shuffled order)' if cfg.shuffle else ''}"
    )
    shards = []
    for i in range(cfg.num_shards):
        block = pieces.assign(ordered, i, cfg.num_shards)
        shards.append([p.index for p in block])
        mark = "  <- this task" if cfg.num_shards > 1 and i == cfg.shard_index else ""
        span = f"pieces {block[0].index}..{block[-1].index}" if block else "no pieces"
        print(f"  task {i}: {span} ({len(block)} pieces, {sum(p.size for p in block) / 1e6:,.1f} MB){mark}")
        for shown in block[:3] if cfg.num_shards <= 8 else []:
            print(f"      {shown.index}: {shown.describe()}")
    print("outputs (.bin, .idx, .manifest.json):")
    for (split, j), prefix in plan.outputs.items():
        print(f"  {split} {cfg.json_keys[j]}: {prefix}")
    if cfg.num_shards > 1:
        print(
            f"  merged by `titanenv preprocess --merge --output-prefix {shlex.quote(str(cfg.output_prefix))} "
            f"--num-shards {cfg.num_shards}`"
        )
    print("dry run: nothing written")
    return {
        "inputs": [str(f.path) for f in plan.files],
        "skipped": [str(p) for p in plan.skipped],
        "pieces": len(plan.pieces),
        "shards": shards,
        "outputs": [str(p) for p in plan.outputs.values()],
    }


def run(cfg: PreprocessConfig) -> manifest.Manifest:
    """Tokenize this array task's pieces and write ``.bin``/``.idx`` plus a manifest per output.

    Returns:
        The manifest of the first output (train split, first key), as written.

    Raises:
        sources.InputError: an input is missing or unreadable (named).
        toklib.TokenizerNotFound, ValueError: the tokenizer is missing or invalid (named);
            ``--append-eod`` without a findable EOD token; bad settings.
        backends.BackendMismatch: ``--tokenizer-backend gigatoken`` differs from the reference.
        BadDocument: a bad document with ``on_error="fail"``.
        MissingKey: a ``--json-keys`` field is in none of the first documents of an input.
        EmptyOutput: an output would hold no tokens (see the module doc); finished pieces are kept,
            so a rerun with ``allow_empty`` only writes the outputs.
        WorkerDied: a worker process was killed; a rerun resumes.
        lock.PrefixInUse: another run writes this output prefix (its pid and host are named).
        atomic.DiskFull: the disk is full (path, bytes needed and free named); no temporary file stays.
    """
    # One run per output prefix; stale temporary files of dead runs go first (outputs.claim).
    shard = (cfg.shard_index, cfg.num_shards) if cfg.num_shards > 1 else None
    with outputs.claim(Path(cfg.output_prefix), cfg.bases().values(), shard):
        return _run(cfg)


def _run(cfg: PreprocessConfig) -> manifest.Manifest:
    plan = _plan(cfg)
    info = toklib.load(cfg.tokenizer_model, cfg.eod_token)
    if cfg.append_eod and info.eod_id is None:
        raise ValueError(f"{info.path}: no EOD token found; pass --eod-token TOKEN")
    backends.adopt(info.path, info.tokenizer)  # loading a large tokenizer.json takes a while: once is enough
    dtype = indexed.dtype_for_vocab(info.vocab_size)
    settings = _settings(cfg, plan, info, dtype)
    run_fingerprint = manifest.fingerprint({**settings, "shard": [cfg.shard_index, cfg.num_shards]})
    primary = plan.outputs[("train", 0)]
    old = _finished_manifest(primary)
    if old and old.fingerprint == run_fingerprint and all(outputs.complete(p) for p in plan.outputs.values()):
        log.info("%s: already complete, skipping (delete it to redo)", manifest.path_for(primary))
        return old

    job = worker.PieceJob(
        cfg=cfg,
        tokenizer_json=str(info.path),
        backend="hf",
        eod=settings["eod"],
        dtype=dtype.str,
        parts_dir=f"{cfg.output_prefix}.parts",
        fingerprint=manifest.fingerprint(settings),
        special_texts=_special_texts(info.tokenizer),
    )
    Path(job.parts_dir).mkdir(parents=True, exist_ok=True)
    try:
        stats, choice, inputs = _tokenize(plan, cfg, job)
    except BaseException:
        _rmdir_if_empty(Path(job.parts_dir))  # e.g. a wrong --json-keys stopped the first piece
        raise
    mine = [stats[p.index] for p in plan.mine]
    counts = manifest.Counts.of_pieces(mine)
    per_output = _per_output(mine, plan.outputs)
    _check_not_empty(cfg, plan, counts, per_output)
    common = manifest.Manifest.build(
        cfg,
        tokenizer=info,
        backend=manifest.BackendRecord.of(choice, _backends_used(list(stats.values()), choice.used)),
        dtype=dtype.name,
        outputs=outputs.outputs_json(plan.outputs, cfg.json_keys),
        pieces=manifest.PiecesRecord(len(plan.mine), len(plan.pieces), plan.piece_bytes, cfg.text_document),
        counts=counts,
        inputs=inputs,
        skipped=plan.skipped,
        fingerprint=run_fingerprint,
    )
    parts = {(s, j): [worker.part_prefix(job, p.index, s, j) for p in plan.mine] for s, j in plan.outputs}
    result = outputs.write(plan.outputs, cfg.json_keys, dtype, common, parts, per_output)
    for p in plan.mine:
        for f in Path(job.parts_dir).glob(f"{p.index:06d}.*"):
            f.unlink()
    _rmdir_if_empty(Path(job.parts_dir))
    return result


def _tokenize(
    plan: _Plan, cfg: PreprocessConfig, job: worker.PieceJob
) -> tuple[dict[int, dict[str, Any]], backends.Choice, list[manifest.InputRecord]]:
    """Tokenize the pieces a killed run did not finish. Returns (counts per piece, backend, inputs with sha256)."""
    stats = {p.index: s for p in plan.mine if (s := worker.finished(job, p.index)) is not None}
    todo = [p for p in plan.mine if p.index not in stats]
    if stats:
        log.info("resuming: %d of %d pieces already finished", len(stats), len(plan.mine))
    if todo:
        sample = _sample(todo, cfg) if cfg.tokenizer_backend != "hf" else []
        plain = cfg.special_tokens == "plain"
        choice = backends.choose(cfg.tokenizer_backend, Path(job.tokenizer_json), sample, plain)
        log.info("tokenizer backend: %s (%s)", choice.used, choice.reason)
    elif plan.mine:
        choice = backends.Choice(cfg.tokenizer_backend, "hf", "every piece was finished by an earlier run")
    else:
        choice = backends.Choice(cfg.tokenizer_backend, "none", "this array task has no pieces")
    job = dataclasses.replace(job, backend=choice.used)
    with Pool(min(cfg.workers, len(todo)), job) as pool, ThreadPoolExecutor(1) as hasher:
        hashes = {f.path: hasher.submit(manifest.file_sha256, f.path) for f in _files_to_hash(plan.mine)}
        with Progress(sum(p.size for p in todo)) as progress:
            for index, piece_stats in pool.execute(todo, progress):
                stats[index] = piece_stats
        inputs = _inputs_meta(plan.mine, {p: h.result() for p, h in hashes.items()})
    log.info("tokenized %d pieces in %.1f s: %s", len(todo), progress.elapsed(), progress.rates())
    return stats, choice, inputs


def _sample(mine: list[Piece], cfg: PreprocessConfig) -> list[tuple[object, str]]:
    """Documents from up to 8 pieces spread over this task, about 256 kB of text in all."""
    if not mine:
        return []
    spread = np.linspace(0, len(mine) - 1, min(_SAMPLE_PIECES, len(mine))).round().astype(int)
    picks = [mine[i] for i in sorted(set(spread))]
    budget = _SAMPLE_CHARS // len(picks)
    sample: list[tuple[object, str]] = []
    for piece in picks:
        reader = readers.read(piece, cfg.json_keys, cfg.text_document, cfg.max_document_chars)
        used = 0
        for path, n, result in reader:
            if isinstance(result, str):
                continue
            for text in result.values():
                text = text[: max(budget - used, 1 << 12)]  # both backends see the same prefix: still a fair check
                sample.append((_Where(reader, path, n), text))
                used += len(text)
            if used >= budget:
                break
    return sample


@dataclasses.dataclass(frozen=True)
class _Where:
    """``file:line`` of a sample document, worked out only if a mismatch is reported."""

    reader: readers.PieceReader
    path: str
    number: int

    def __str__(self) -> str:
        return self.reader.where(self.path, self.number)


def _settings(cfg: PreprocessConfig, plan: _Plan, info: toklib.TokenizerInfo, dtype: np.dtype[Any]) -> dict[str, Any]:
    """Everything that decides the output bytes; its hash marks finished pieces and outputs.

    The config's fields that change the bytes as they are (``settings.BYTE_FIELDS``), plus what
    the run derived from the others (``settings.DERIVED_BYTE_FIELDS``)."""
    return {
        **cfg.byte_settings(),
        "tokenizer_sha256": info.sha256,  # tokenizer_model
        "eod": info.eod_id if cfg.append_eod else None,  # append_eod, eod_token
        "dtype": dtype.name,  # the tokenizer's vocabulary size
        "piece_bytes": plan.piece_bytes,  # piece_mb
        "inputs": [[str(f.path), f.format, f.compression, f.size, f.mtime_ns] for f in plan.files],
    }


def _finished_manifest(prefix: Path) -> manifest.Manifest | None:
    """The manifest an earlier run left at ``prefix``; None when there is none or a field is missing
    or mistyped (the run redoes it). Raises ValueError when it is not JSON."""
    try:
        return manifest.read(prefix)
    except manifest.ManifestError as e:
        log.warning("%s; it is written again", e)
        return None


def _special_texts(tok: Tokenizer) -> tuple[str, ...]:
    """The strings of the tokenizer's special added tokens (``<|endoftext|>``...)."""
    return tuple(sorted({t.content for t in tok.get_added_tokens_decoder().values() if t.special and t.content}))


def _per_output(
    piece_stats: list[dict[str, Any]], targets: dict[tuple[str, int], Path]
) -> dict[tuple[str, int], dict[str, int]]:
    """``{(split, key index): {"max_token_id": int (-1: no tokens), "tokens": int}}`` summed over pieces."""
    out = {k: {"max_token_id": -1, "tokens": 0} for k in targets}
    for s in piece_stats:
        for (split, j), o in out.items():
            o["max_token_id"] = max(o["max_token_id"], s["max_token_id"][split][j])
            o["tokens"] += s["tokens_by_key"][split][j]
    return out


def _check_not_empty(
    cfg: PreprocessConfig, plan: _Plan, totals: manifest.Counts, per_output: dict[tuple[str, int], dict[str, int]]
) -> None:
    """Raise :class:`EmptyOutput` for an output without tokens (see the module doc for array tasks)."""
    if cfg.allow_empty:
        return
    empty = [plan.outputs[k] for k, o in per_output.items() if o["tokens"] == 0]
    if not empty:
        return
    read, rejected = totals.documents_in, totals.documents_rejected
    if cfg.num_shards > 1:
        if not plan.mine:
            log.info("array task %d has no pieces (a small input): its outputs are empty", cfg.shard_index)
            return
        if not (read and rejected == read):
            for prefix in empty:  # e.g. a validation share too small to get a document: merge checks the total
                log.warning("%s: no tokens in this array task; the merge fails if every task's is empty", prefix)
            return
    reasons = ", ".join(f"{r} {n}" for r, n in totals.rejected_by_reason.items())
    examples = "; ".join(f"{r}: {', '.join(w[:2])}" for r, w in totals.rejected_examples.items())
    what = (
        f"every document was rejected: {read} documents ({reasons}; e.g. {examples})"
        if read and rejected == read
        else f"{read} documents read, {rejected} rejected"
    )
    raise EmptyOutput(
        f"{empty[0]}: no tokens to write: {what}. Check --input, --json-keys and "
        "--max-document-chars, or pass --allow-empty to write empty outputs anyway"
        + (f" ({len(empty)} outputs empty)" if len(empty) > 1 else "")
    )


def merge(output_prefix: Path, num_shards: int, allow_empty: bool = False) -> manifest.Manifest:
    """Join the array tasks' outputs into ``output_prefix`` (:func:`titanenv.data.merge.merge`).

    Raises:
        EmptyOutput: the tasks' total for an output holds no tokens, unless ``allow_empty``;
            nothing is written.
        FileNotFoundError, ValueError: as :func:`titanenv.data.merge.merge`.
    """
    if not allow_empty:
        _check_shards_not_empty(Path(output_prefix), num_shards)
    return merging.merge(output_prefix, num_shards)


def _check_shards_not_empty(output_prefix: Path, num_shards: int) -> None:
    tokens: dict[tuple[str, str], int] = {}
    read = rejected = 0
    for i in range(num_shards):
        first = merging._shard_manifest(output_prefix, i, num_shards)
        read += first.counts.documents_in
        rejected += first.counts.documents_rejected
        for split, keys in first.outputs.items():
            for key, prefix in keys.items():
                m = manifest.read(prefix)
                n = m.output.tokens if m is not None and m.output is not None else 0
                tokens[(split, key)] = tokens.get((split, key), 0) + n
    empty = [f"{split} {key}" for (split, key), n in tokens.items() if n == 0]
    if empty:
        raise EmptyOutput(
            f"{output_prefix}: no tokens in any of the {num_shards} array tasks for {', '.join(empty)} "
            f"({read} documents read, {rejected} rejected; see the tasks' manifests). Check the tasks' "
            "inputs and flags, or pass --allow-empty to merge anyway"
        )


def _backends_used(piece_stats: list[dict[str, Any]], default: str) -> str:
    """``hf``, ``gigatoken`` or ``gigatoken+hf`` when a resumed run mixed them (their ids are equal)."""
    return "+".join(sorted({s.get("backend", default) for s in piece_stats})) or default


def _files_to_hash(mine: list[Piece]) -> list[sources.InputFile]:
    """Files this task reads from their start: each file is hashed by exactly one array task."""
    return [f for p in mine if p.start == 0 for f in p.files]


def _inputs_meta(mine: list[Piece], hashes: dict[Path, str]) -> list[manifest.InputRecord]:
    seen: dict[Path, manifest.InputRecord] = {}
    for p in mine:
        for f in p.files:
            seen.setdefault(f.path, manifest.InputRecord(str(f.path), f.size, hashes.get(f.path)))
    return list(seen.values())


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # other array tasks still hold pieces there
