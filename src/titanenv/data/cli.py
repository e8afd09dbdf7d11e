"""``titanenv preprocess``: the data stage's command line."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from titanenv import sbatch
from titanenv.data.documents import DEFAULT_MAX_DOCUMENT_CHARS
from titanenv.data.manifest import Manifest
from titanenv.slurmenv import SlurmEnv

log = logging.getLogger("titanenv.preprocess")

_INPUT_HELP = (
    "Input: a file (.jsonl/.json[.gz|.zst|.bz2|.xz], .parquet, .arrow, anything else plain text), a quoted glob, "
    "a folder (every file below it, or a datasets save_to_disk folder), @LIST (a file of such specs, one per line, "
    "relative to the list's folder) or hf:NAME[?name=CONFIG&split=SPLIT] (a Hugging Face dataset in the local "
    "cache). Repeat the flag, or pass inputs as arguments."
)


def preprocess(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="More inputs, as for --input (lets the shell expand globs).", show_default=False),
    ] = None,
    input: Annotated[list[str] | None, typer.Option("--input", help=_INPUT_HELP)] = None,
    # `= ...` is typer's marker for a required option after optional ones; mypy sees an Ellipsis default
    output_prefix: Annotated[Path, typer.Option("--output-prefix", help="Output path without extension.")] = ...,  # type: ignore[assignment]
    tokenizer_model: Annotated[
        str | None,
        typer.Option(
            "--tokenizer-model",
            help="tokenizer.json, a folder holding one, or a Hub id in the local cache (not needed with --merge).",
        ),
    ] = None,
    json_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--json-keys",
            help="JSON field(s) or table column(s) to tokenize; repeat for several (each goes to PREFIX_<key>).",
            show_default="text",
        ),
    ] = None,
    append_eod: Annotated[bool, typer.Option("--append-eod", help="Append the EOD token after each document.")] = False,
    eod_token: Annotated[
        str | None, typer.Option("--eod-token", help="EOD token (default: the tokenizer's EOS).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="Worker processes, one core each; each tokenizes whole pieces into its own files."
        ),
    ] = 1,
    tokenizer_backend: Annotated[
        str,
        typer.Option(
            "--tokenizer-backend",
            help="hf: Hugging Face tokenizers (the reference). gigatoken: the fast Rust tokenizer, checked "
            "against hf on a sample first (error if it differs). auto: gigatoken when it matches hf on the sample, "
            "else hf with a warning.",
        ),
    ] = "auto",
    text_document: Annotated[
        str,
        typer.Option(
            "--text-document", help="Plain-text inputs: one document per 'file' or per 'line' (blank lines skipped)."
        ),
    ] = "file",
    piece_mb: Annotated[
        float | None,
        typer.Option(
            "--piece-mb",
            help="MB of input per piece, the unit a worker tokenizes and a rerun resumes from; compressed files "
            "are one piece each. Default: input size / 64, within 4..256 MB.",
            show_default=False,
        ),
    ] = None,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle",
            help="Shuffle documents with --seed: pieces in random order, documents within each piece permuted.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --shuffle and --val-fraction.")] = 1234,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Send this fraction of documents, chosen by a seeded hash of their text, to a validation output.",
        ),
    ] = 0.0,
    val_output_prefix: Annotated[
        Path | None,
        typer.Option("--val-output-prefix", help="Where --val-fraction's documents go (default: <output-prefix>_val)."),
    ] = None,
    shard_index: Annotated[
        int | None, typer.Option("--shard-index", help="This array task (default: $SLURM_ARRAY_TASK_ID, else 0).")
    ] = None,
    num_shards: Annotated[
        int | None, typer.Option("--num-shards", help="Array task count (default: $SLURM_ARRAY_TASK_COUNT, else 1).")
    ] = None,
    on_error: Annotated[
        str, typer.Option("--on-error", help="skip: count and drop bad documents; fail: stop at the first.")
    ] = "skip",
    special_tokens: Annotated[
        str,
        typer.Option(
            "--special-tokens",
            help="Special-token text inside a document (e.g. '<|endoftext|>'): 'parse' makes it that token's id, "
            "as Megatron-LM and Tokenizer.encode do, so it acts as a document boundary; 'plain' tokenizes it as "
            "ordinary text. Documents holding such text are counted in the manifest (documents_with_special_text).",
        ),
    ] = "parse",
    max_document_chars: Annotated[
        int,
        typer.Option(
            "--max-document-chars",
            min=1,
            help="Reject longer documents (characters per --json-keys field) as too_long: tokenizing one takes "
            "about 110 bytes of memory per character with hf, 8 with gigatoken (10M characters: ~1.3 GB per worker).",
        ),
    ] = DEFAULT_MAX_DOCUMENT_CHARS,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Write (or --merge) outputs with no tokens instead of failing (every document rejected, none read).",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the inputs, each task's pieces and the outputs; write nothing.")
    ] = False,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge", help="Join the finished array tasks' outputs of --output-prefix instead of tokenizing."
        ),
    ] = False,
    submit_merge: Annotated[
        bool, typer.Option("--submit-merge", help="In a Slurm array, task 0 submits the merge as an afterok job.")
    ] = False,
) -> None:
    """Tokenize text into a Megatron-LM indexed dataset (PREFIX.bin, PREFIX.idx) plus PREFIX.manifest.json.

    Flags follow Megatron-LM's tools/preprocess_data.py. Workers write their own pieces under
    PREFIX.parts/; a killed run resumes where it stopped. In a Slurm job array each task takes a
    contiguous block of the pieces; --merge (or --submit-merge) joins the tasks' outputs in order.
    The bytes are the same whatever --workers and the array size.
    """
    from titanenv.data import preprocess as pp
    from titanenv.data.pool import Stopped

    slurm = SlurmEnv.from_env()
    array_tasks = slurm.array_task_count
    shards = num_shards if num_shards is not None else (1 if array_tasks is None else array_tasks)
    if merge:
        report(pp.merge(output_prefix, shards, allow_empty=allow_empty))
        return
    inputs = [*(input or []), *(paths or [])]
    if not inputs:
        raise typer.BadParameter("at least one input is required", param_hint="--input")
    if tokenizer_model is None:
        raise typer.BadParameter("required unless --merge", param_hint="--tokenizer-model")
    index = shard_index if shard_index is not None else slurm.array_index
    try:
        cfg = pp.PreprocessConfig(
            inputs=[*inputs],
            output_prefix=output_prefix,
            tokenizer_model=tokenizer_model,
            json_keys=tuple(json_keys or ["text"]),
            append_eod=append_eod,
            eod_token=eod_token,
            workers=workers,
            shard_index=index,
            num_shards=shards,
            on_error=on_error,
            tokenizer_backend=tokenizer_backend,
            text_document=text_document,
            piece_mb=piece_mb,
            shuffle=shuffle,
            seed=seed,
            val_fraction=val_fraction,
            val_output_prefix=val_output_prefix,
            special_tokens=special_tokens,
            max_document_chars=max_document_chars,
            allow_empty=allow_empty,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if dry_run:
        pp.dry_run(cfg)
        return
    if submit_merge and index == 0 and shards > 1:
        _submit_merge(slurm, output_prefix, shards, allow_empty)
    try:
        result = pp.run(cfg)
    except Stopped as e:
        # Workers are killed and the lock released. Exit now: ProcessPoolExecutor's exit hook
        # can wait forever on the queues of killed workers (seen with SIGINT).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(e.code or 1))
    report(result)


def _submit_merge(slurm: SlurmEnv, prefix: Path, shards: int, allow_empty: bool = False) -> None:
    """Submit `titanenv preprocess --merge` to run after every task of this array succeeds."""
    job = slurm.array_job_id
    if job is None:
        raise typer.BadParameter("needs a Slurm job array (SLURM_ARRAY_JOB_ID is unset)", param_hint="--submit-merge")
    root = os.environ.get("TITANENV_ROOT", str(Path.cwd()))
    cmd = shlex.join(
        [
            f"{root}/container_run.sh",
            "titanenv",
            "preprocess",
            "--merge",
            "--output-prefix",
            str(prefix),
            "--num-shards",
            str(shards),
            *(["--allow-empty"] if allow_empty else []),
        ]
    )
    args = [
        "--kill-on-invalid-dep=yes",
        f"--job-name={slurm.job_name or 'titanenv'}-merge",
        "--nodes=1",
        "--ntasks=1",
        f"--output={prefix}.merge-%j.out",
        f"--wrap={cmd}",
        *([f"--partition={slurm.partition}"] if slurm.partition else []),
        *([f"--account={slurm.account}"] if slurm.account else []),
    ]
    merge_job = sbatch.submit(args, dependency=f"afterok:{job}", what=f"the merge job of {prefix}")
    log.info("submitted merge job %s (afterok:%s): %s", merge_job, job, cmd)


def report(manifest: Manifest) -> None:
    """Print the balance (documents in = written + rejected), the reasons and the outputs."""
    m, c = manifest, manifest.counts
    by_split = c.documents_written_by_split
    split_text = f" ({', '.join(f'{s} {n}' for s, n in by_split.items())})" if len(by_split) > 1 else ""
    reasons = f" {c.rejected_by_reason}" if c.rejected_by_reason else ""
    print(
        f"documents in {c.documents_in} = written {c.documents_written}{split_text} + rejected {c.documents_rejected}"
        f"{reasons}; tokens {c.tokens}; dtype {m.dtype}; backend {m.backend.used}"
    )
    if c.bom_stripped:
        print(f"  byte-order marks removed: {c.bom_stripped}")
    if c.documents_with_special_text:
        how = (
            "tokenized as plain text"
            if m.special_tokens == "plain"
            else "parsed into special-token ids (e.g. a document boundary); --special-tokens plain keeps them text"
        )
        print(f"  documents holding special-token text: {c.documents_with_special_text}, {how}")
    if m.files_skipped.count:
        examples = ", ".join(m.files_skipped.examples[:3])
        print(f"  files skipped in folder inputs: {m.files_skipped.count} (e.g. {examples})")
    for reason, where in c.rejected_examples.items():
        print(f"  {reason}: {', '.join(where)}")
    for split, keys in m.outputs.items():
        for key, prefix in keys.items():
            print(f"  {split} {key}: {prefix}.bin, {prefix}.idx, {prefix}.manifest.json")
