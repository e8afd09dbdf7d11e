"""Write a Hugging Face folder for one checkpoint of a titanenv run, whole or not at all.

The folder is assembled in a hidden sibling ``.OUT.tmp.PID.HOST`` and renamed into place, so a
reader sees no folder, the previous export, or the complete new one. :data:`MARKER` is written
last; its presence means the folder is complete. ``OUT`` may be replaced only when it is
missing, empty, or holds a titanenv export (:data:`MARKER`) of the same run (any step or dtype);
anything else is refused before work starts. Leftover temporary folders of dead processes on
this host are removed on the next export to the same place.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tokenizers import Tokenizer

from titanenv import __version__, atomic
from titanenv.data import manifest as manifestlib
from titanenv.data import tokenizer as toklib
from titanenv.digest import sha256_file
from titanenv.export.convert import hf_config, load_state, resolve_checkpoint, to_hf
from titanenv.redaction import redact, redacted
from titanenv.train import checkpoints

__all__ = ["DTYPES", "MARKER", "ExportResult", "cached_export", "export_dir", "export_run", "is_current"]

log = logging.getLogger("titanenv.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``--dtype`` choices: the dtype of the weights written (training keeps float32 masters)."""
MARKER = "titanenv-export.json"
"""Completion marker inside an export: run, step, checkpoint, dtype, files and their sizes."""
DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes:
        out: the export folder.
        run_dir: the run folder (absolute).
        step: the checkpoint's step.
        checkpoint: ``RUN/checkpoint/step-N``.
        dtype: ``"float32"`` or ``"bfloat16"``.
        files: file name -> bytes, every file in ``out``.
        parameters: number of weights written (tied embeddings once).
        seconds: wall time of the export.
        replaced: ``out`` held an earlier export of this run, now replaced.
        config: the ``config.json`` written.
    """

    out: Path
    run_dir: Path
    step: int
    checkpoint: Path
    dtype: str
    files: dict[str, int]
    parameters: int
    seconds: float
    replaced: bool
    config: dict[str, Any] = field(repr=False)


def export_dir(run_dir: str | os.PathLike[str], step: int, dtype: str = "float32") -> Path:
    """Where :func:`cached_export` keeps an export: ``RUN/export/step-N`` (``step-N-bfloat16`` for bfloat16)."""
    return Path(run_dir).resolve() / "export" / (f"step-{step}" if dtype == "float32" else f"step-{step}-{dtype}")


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def is_current(out: str | os.PathLike[str], run_dir: str | os.PathLike[str], step: int, dtype: str) -> bool:
    """Whether ``out`` is a complete export of ``run_dir``'s checkpoint ``step`` in ``dtype``: its
    marker names them and the checkpoint's own marker unchanged, and every file has its recorded size."""
    out = Path(out)
    mark = _read_marker(out)
    ckpt = Path(run_dir).resolve() / "checkpoint" / f"step-{step}"
    if mark is None or not (ckpt / checkpoints.MARKER).is_file() or not _same_run(mark, out, Path(run_dir)):
        return False
    same = (mark.get("step"), mark.get("dtype"), mark.get("checkpoint_marker_sha256")) == (
        step,
        dtype,
        sha256_file(ckpt / checkpoints.MARKER),
    )
    files = mark.get("files", {})
    return same and all((out / n).is_file() and (out / n).stat().st_size == size for n, size in files.items())


def _same_run(mark: dict[str, Any], out: Path, run_dir: Path) -> bool:
    """Whether the export ``out`` with marker ``mark`` is of ``run_dir``: the recorded run is the same
    folder (symlinks and ``..`` resolved), or ``out`` is inside the run's ``export/`` (a moved run)."""
    run = run_dir.resolve()
    recorded = mark.get("run_dir")
    return (isinstance(recorded, str) and Path(recorded).resolve() == run) or out.resolve().parent == run / "export"


def _claim(out: Path, run_dir: Path) -> bool:
    """Whether ``out`` holds an export to replace (False: missing or empty).

    Raises:
        FileExistsError: ``out`` is something else.
    """
    if not out.exists():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    mark = _read_marker(out) if out.is_dir() else None
    if mark is not None and _same_run(mark, out, run_dir):
        return True
    whose = f"a titanenv export of {mark.get('run_dir')}" if mark else "not a titanenv export"
    raise FileExistsError(
        f"{out}: exists and is {whose}; an export replaces only an empty folder or an export of the same "
        f"run ({run_dir}): pass another --out, or remove it"
    )


def _sweep(out: Path) -> None:
    """Remove ``.OUT.tmp.PID.HOST`` / ``.OUT.old.PID.HOST`` folders of dead processes of this host."""
    me = socket.gethostname().replace(".", "_") or "localhost"
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}.*"):
            pid, _, host = path.name.removeprefix(f".{out.name}.{kind}.").partition(".")
            if host == me and pid.isdigit() and not atomic.pid_alive(int(pid)):
                if kind == "old" and not out.exists():  # killed between the two renames: theirs is the export
                    os.rename(path, out)
                    log.warning("%s: restored the previous export from %s (pid %s died mid-swap)", out, path, pid)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                log.warning("%s: removed a partial export left by pid %s, which is no longer running", path, pid)


def _write_weights(folder: Path, state: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
    """``model.safetensors``, or ``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``."""
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": split.tensor_to_filename}  # fmt: skip
        atomic.write_json(folder / "model.safetensors.index.json", index)


def _token_ids(run_dir: Path, tok_dir: Path) -> tuple[int, int | None, dict[str, Any], str]:
    """``(eod id, pad id or None, the run's tokenizer_config.json or {}, the training data prefix)``.

    The EOD id is the one the data manifest recorded (what preprocess appended), else the one
    :func:`titanenv.data.tokenizer.load` finds by the same rule.
    """
    cfg_path = tok_dir / "tokenizer_config.json"
    tok_cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    trainer = json.loads((run_dir / "trainer_config.json").read_text())
    prefix = trainer.get("dataloader", {}).get("path") or ""
    found = manifestlib.read(prefix) if prefix else None
    info = toklib.load(tok_dir)
    eod = found.tokenizer.eod_id if found is not None and found.tokenizer.eod_id is not None else info.eod_id
    if eod is None:
        raise ValueError(f"{tok_dir}: no end-of-document token found; the export needs the data's EOD id")
    pad = tok_cfg.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return eod, (info.tokenizer.token_to_id(pad) if pad else None), tok_cfg, str(prefix)


def _tokenizer_config(tok_cfg: dict[str, Any], eod_token: str, seq_len: int) -> dict[str, Any]:
    """The run's ``tokenizer_config.json`` made to say what training did: no BOS; EOD begins and ends documents."""
    return {
        **{k: v for k, v in tok_cfg.items() if k not in ("auto_map", "tokenizer_file")},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod_token,
        "eos_token": eod_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": seq_len,
    }


def _provenance(run_dir: Path) -> dict[str, Any]:
    """The newest ``RUN/provenance/*/provenance.json`` (by its start time), or {}."""
    records = []
    for path in (run_dir / "provenance").glob("*/provenance.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return max(records, key=lambda r: str(r.get("start") or ""), default={})


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _readme(facts: dict[str, Any], prov: dict[str, Any]) -> str:
    t = prov.get("titanenv", {})
    data = prov.get("data") or [{"prefix": facts["data"]}]
    lines = [
        f"# {facts['name']}: step {facts['step']} (titanenv export)",
        "",
        f"`LlamaForCausalLM` weights of checkpoint `{facts['checkpoint']}`, written by `titanenv export` "
        f"on {facts['time']}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| recipe | `{facts['recipe']}` |",
        f"| step | {facts['step']} |",
        f"| parameters | {facts['parameters']:,} |",
        f"| dtype | {facts['dtype']} |",
        f"| sequence length | {facts['seq_len']} tokens (`max_position_embeddings`) |",
        f"| vocabulary | {facts['vocab_size']} rows |",
        *[
            f"| data | `{d.get('prefix')}` ({d.get('tokens') or '?'} tokens, manifest sha256 "
            f"{d.get('manifest_sha256') or '?'}) |"
            for d in data
        ],  # fmt: skip
        f"| titanenv | {t.get('version', __version__)} (git {t.get('sha') or '?'}"
        f"{', uncommitted changes' if t.get('dirty') else ''}) |",
        f"| torchtitan | {facts['torchtitan']} |",
        f"| torch | {torch.__version__} |",
        f"| training ended | {json.dumps(prov.get('status'))} |",
        "",
        "## Tokens",
        "",
        f"The training data (titanenv's Megatron format) separates documents with the EOD token "
        f"`{facts['eod_token']}` (id {facts['eod_id']}) and never held a BOS token. So the tokenizer adds no BOS "
        "(`add_bos_token: false`), and `bos_token`/`bos_token_id` (tokenizer, `config.json`, "
        "`generation_config.json`) are the EOD token, the token that preceded every training document: "
        "start an unconditional sample with it, or give the prompt as it is.",
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        "```",
        "",
        "Provenance of the run: `provenance/` in the run folder.",
        "",
    ]
    return redact("\n".join(lines))


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> ExportResult:
    """Export checkpoint ``step`` (default: the newest complete one) of ``run_dir`` to a Hugging Face folder ``out``.

    ``out`` receives ``config.json``, ``generation_config.json``, ``model.safetensors`` (sharded
    with ``model.safetensors.index.json`` above ``max_shard_size``), ``tokenizer.json``,
    ``tokenizer_config.json``, ``README.md`` and :data:`MARKER`, all at once (module docstring).

    Args:
        run_dir: a ``titanenv train --output-dir``.
        out: the folder to write (missing, empty, or an earlier export of this run).
        step: the checkpoint step; None for the newest complete one.
        dtype: ``"float32"`` or ``"bfloat16"`` (:data:`DTYPES`).
        max_shard_size: bytes per safetensors file (int, or text like ``"5GB"``).

    Raises:
        ValueError: an unknown ``dtype``; a model or tokenizer the export cannot express.
        ExportRefused: some model state would be dropped (the keys are named).
        FileNotFoundError: no training record, no complete checkpoint, no tokenizer.
        FileExistsError: ``out`` exists and is not an export of this run.
        atomic.DiskFull: the disk filled up; nothing is left behind.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    start = time.monotonic()
    run_path, out = Path(run_dir).resolve(), Path(out).absolute()
    step, ckpt = resolve_checkpoint(run_path, step)
    _claim(out, run_path)
    loaded = load_state(run_path, step=step)
    tied = bool(loaded.model_config.enable_weight_tying)
    hf_state = {k: v.to(DTYPES[dtype]) for k, v in to_hf(loaded.adapter, loaded.state, tied=tied).items()}
    tok_dir = (
        run_path / "tokenizer" if (run_path / "tokenizer" / "tokenizer.json").is_file() else loaded.run.tokenizer_dir
    )
    eod, pad, tok_cfg, prefix = _token_ids(run_path, tok_dir)
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    if tokenizer.get_vocab_size(with_added_tokens=True) > loaded.run.vocab_size:
        raise ValueError(f"{tok_dir}: the tokenizer has more ids than the model's {loaded.run.vocab_size} rows")
    eod_token = tokenizer.id_to_token(eod)
    if eod_token is None:
        raise ValueError(f"{tok_dir}: the data's EOD id {eod} is not in the tokenizer")
    config = {**hf_config(loaded.model_config, loaded.state, loaded.run.seq_len), "bos_token_id": eod,
              "eos_token_id": eod, "pad_token_id": pad, "torch_dtype": dtype, "dtype": dtype}  # fmt: skip
    parameters = sum(t.numel() for t in hf_state.values())
    facts = {"name": run_path.name, "step": step, "checkpoint": str(ckpt), "recipe": loaded.run.recipe,
             "parameters": parameters, "dtype": dtype, "seq_len": loaded.run.seq_len,
             "vocab_size": loaded.run.vocab_size, "data": prefix, "torchtitan": _version("torchtitan"),
             "eod_token": eod_token, "eod_id": eod, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip

    _sweep(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_") or "localhost"
    tmp = out.parent / f".{out.name}.tmp.{os.getpid()}.{host}"
    try:
        tmp.mkdir()
        _write_weights(tmp, hf_state, max_shard_size)
        del hf_state
        atomic.write_json(tmp / "config.json", config)
        atomic.write_json(tmp / "generation_config.json", {
            "bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod if pad is None else pad})  # fmt: skip
        atomic.write_bytes(tmp / "tokenizer.json", (tok_dir / "tokenizer.json").read_bytes())
        atomic.write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok_cfg, eod_token, loaded.run.seq_len))
        atomic.write_text(tmp / "README.md", _readme(facts, _provenance(run_path)))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        mark = {"schema": 1, "run_dir": str(run_path), "step": step, "checkpoint": str(ckpt),
                "checkpoint_marker_sha256": sha256_file(ckpt / checkpoints.MARKER), "dtype": dtype, "files": files,
                "titanenv": __version__, "torchtitan": facts["torchtitan"], "time": facts["time"],
                "seconds": round(time.monotonic() - start, 3)}  # fmt: skip
        atomic.write_json(tmp / MARKER, redacted(mark), durable=True)
        files[MARKER] = (tmp / MARKER).stat().st_size
        replaced = _swap_in(tmp, out, run_path, step, dtype)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if atomic.is_disk_full(e) and not isinstance(e, atomic.DiskFull):
            raise atomic.disk_full(out, what="writing the export") from e
        raise
    return ExportResult(out, run_path, step, ckpt, dtype, files, parameters, time.monotonic() - start, replaced,
                        config)  # fmt: skip


def _swap_in(tmp: Path, out: Path, run_dir: Path, step: int, dtype: str) -> bool:
    """Rename ``tmp`` to ``out``, moving an earlier export of the run aside first; returns whether one was replaced.

    When another process finished the very same export meanwhile (two eval jobs on one run), theirs
    stays: a reader of ``out`` may already be loading it.
    """
    if is_current(out, run_dir, step, dtype):
        shutil.rmtree(tmp)
        return False
    replaced = _claim(out, run_dir)  # again: another process may have written it meanwhile
    if not replaced:
        if out.is_dir():
            out.rmdir()  # empty
        try:
            os.rename(tmp, out)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if is_current(out, run_dir, step, dtype):  # lost a race to the same export: keep theirs
                shutil.rmtree(tmp)
                return False
            replaced = _claim(out, run_dir)  # lost a race: replace theirs, it is an export of this run
        else:
            return False
    old = out.parent / tmp.name.replace(".tmp.", ".old.", 1)
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return replaced


def cached_export(run_dir: str | os.PathLike[str], *, step: int | None = None, dtype: str = "float32") -> Path:
    """The Hugging Face folder of ``run_dir``'s checkpoint ``step`` (default: newest complete), exported once.

    Exports into :func:`export_dir` (``RUN/export/step-N``) unless a complete export of that
    very checkpoint is already there (:func:`is_current`), which is then reused as it is.

    Raises:
        See :func:`export_run`.
    """
    step, _ = resolve_checkpoint(run_dir, step)
    out = export_dir(run_dir, step, dtype)
    if is_current(out, run_dir, step, dtype):
        return out
    return export_run(run_dir, out, step=step, dtype=dtype).out
