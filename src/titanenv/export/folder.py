"""Write a Hugging Face folder for one checkpoint of a titanenv run, whole or not at all.

What is written, by the export's kind (the marker's ``"kind"``):

- ``"full"``: a run without LoRA: a ``LlamaForCausalLM`` folder (``config.json``, weights, ...).
  Default folder ``RUN/export/step-N``.
- ``"adapter"``: a LoRA run, by default: a PEFT adapter of the run's base model (the
  ``--checkpoint.initial-load-path`` it fine-tuned, recorded as an absolute path in
  ``adapter_config.json``'s ``base_model_name_or_path``): ``adapter_config.json`` (PEFT's own
  serialisation), ``adapter_model.safetensors`` (only the LoRA tensors), the tokenizer, README and
  marker. Load it with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)``.
  Default folder ``RUN/export/step-N-adapter``.
- ``"merged"``: a LoRA run with ``merge=True`` (``--merge``): the adapters folded into the base
  weights (:func:`titanenv.export.lora.merge`), written as a ``"full"`` folder is. Default folder
  ``RUN/export/step-N``: a run is either a LoRA run or not, so this never meets a ``"full"`` export.

``-DTYPE`` follows the default folder's name unless float32 (``step-N-adapter-bfloat16``).
``merge=True`` on a run without LoRA is refused (:func:`export_kind`): there is nothing to merge,
and the likelier mistake is the wrong run folder.

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
from titanenv.export import lora as xlora
from titanenv.export.convert import LoadedState, hf_config, load_state, resolve_checkpoint, to_hf
from titanenv.redaction import redact, redacted
from titanenv.train import checkpoints
from titanenv.train.lora import HF_MODULES, LoraOptions
from titanenv.train.model import RunRecord, read_run_record

__all__ = [
    "DTYPES",
    "KINDS",
    "MARKER",
    "ExportResult",
    "cached_export",
    "export_dir",
    "export_kind",
    "export_run",
    "is_current",
]

log = logging.getLogger("titanenv.export")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""``--dtype`` choices: the dtype of the weights written (training keeps float32 masters)."""
MARKER = "titanenv-export.json"
"""Completion marker inside an export: run, step, checkpoint, dtype, files and their sizes."""
DEFAULT_SHARD_SIZE = "5GB"
KINDS = ("full", "merged", "adapter")
"""Marker ``"kind"`` of an export (module docstring); a marker without one is ``"full"``."""


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
        config: the ``config.json`` written (``adapter_config.json`` for an adapter).
        kind: one of :data:`KINDS`.
        base_model: the base model folder of a LoRA run (absolute), else None.
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
    kind: str = "full"
    base_model: Path | None = None


def export_kind(run_dir: str | os.PathLike[str], merge: bool = False) -> str:
    """The kind of export :func:`export_run` writes for ``run_dir``: ``"full"`` without LoRA, else
    ``"adapter"``, or ``"merged"`` with ``merge``.

    Raises:
        FileNotFoundError: no ``trainer_config.json``.
        ValueError: ``merge`` on a run without LoRA.
    """
    run = read_run_record(run_dir)
    if run.lora is None:
        if merge:
            raise ValueError(
                f"--merge: {run_dir} is not a LoRA run (its trainer_config.json has no lora.rank > 0), so it has "
                "no adapters to merge; export it without --merge (a full model), or name the fine-tune's run folder"
            )
        return "full"
    return "merged" if merge else "adapter"


def export_dir(run_dir: str | os.PathLike[str], step: int, dtype: str = "float32", kind: str = "full") -> Path:
    """Where :func:`cached_export` keeps an export: ``RUN/export/step-N``, ``step-N-adapter`` for an adapter,
    then ``-bfloat16`` for bfloat16 weights."""
    name = f"step-{step}" + ("-adapter" if kind == "adapter" else "") + ("" if dtype == "float32" else f"-{dtype}")
    return Path(run_dir).resolve() / "export" / name


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def is_current(
    out: str | os.PathLike[str], run_dir: str | os.PathLike[str], step: int, dtype: str, kind: str | None = None
) -> bool:
    """Whether ``out`` is a complete export of ``run_dir``'s checkpoint ``step`` in ``dtype`` and of ``kind``
    (default: the run's default kind, :func:`export_kind`): its marker names them and the checkpoint's own
    marker unchanged, and every file has its recorded size."""
    out = Path(out)
    mark = _read_marker(out)
    ckpt = Path(run_dir).resolve() / "checkpoint" / f"step-{step}"
    if mark is None or not (ckpt / checkpoints.MARKER).is_file() or not _same_run(mark, out, Path(run_dir)):
        return False
    if kind is None:
        try:
            kind = export_kind(run_dir)
        except (OSError, ValueError):
            return False
    same = (mark.get("step"), mark.get("dtype"), mark.get("kind", "full"), mark.get("checkpoint_marker_sha256")) == (
        step,
        dtype,
        kind,
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


def _lora_text(options: LoraOptions) -> str:
    """``r 8, alpha 16, dropout 0, on wqkv (q_proj, k_proj, v_proj), wo (o_proj)``."""
    targets = ", ".join(f"{t} ({', '.join(HF_MODULES[t])})" for t in options.target_modules)
    return f"r {options.rank}, alpha {options.alpha:g}, dropout {options.dropout:g}, on {targets}"


def _what(facts: dict[str, Any]) -> list[str]:
    """The README's opening sentence and its LoRA rows, by kind."""
    kind, ckpt, when = facts["kind"], f"`{facts['checkpoint']}`", f"written by `titanenv export` on {facts['time']}"
    if kind == "full":
        return [f"`LlamaForCausalLM` weights of checkpoint {ckpt}, {when}.", "", "| | |", "| --- | --- |"]
    lora = _lora_text(facts["lora"])
    base = f"`{facts['base_model']}`" if facts["base_model"] else "(none recorded: the run initialised its own)"
    if kind == "merged":
        opening = (f"`LlamaForCausalLM` weights of LoRA checkpoint {ckpt}: the base model {base} with the adapters "
                   f"merged in (W + alpha / r * B A), {when}.")  # fmt: skip
    else:
        opening = (f"A PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) of checkpoint {ckpt} "
                   f"for the base model {base}, {when}. It holds only the adapters: load it on top of that "
                   "base (below).")  # fmt: skip
    return [opening, "", "| | |", "| --- | --- |", f"| base model | {base} |", f"| LoRA | {lora} |"]


def _load_lines(kind: str, base: str) -> list[str]:
    if kind != "adapter":
        return [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        ]
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")  # .merge_and_unload() for a plain model',
    ]


def _readme(facts: dict[str, Any], prov: dict[str, Any]) -> str:
    t = prov.get("titanenv", {})
    data = prov.get("data") or [{"prefix": facts["data"]}]
    kind = facts["kind"]
    lines = [
        f"# {facts['name']}: step {facts['step']} (titanenv {'LoRA adapter' if kind == 'adapter' else 'export'})",
        "",
        *_what(facts),
        f"| recipe | `{facts['recipe']}` |",
        f"| step | {facts['step']} |",
        f"| {'adapter parameters' if kind == 'adapter' else 'parameters'} | {facts['parameters']:,} |",
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
        *_load_lines(kind, str(facts.get("base_model"))),
        "```",
        "",
        "Provenance of the run: `provenance/` in the run folder.",
        "",
    ]
    return redact("\n".join(lines))


def _base_model(run: RunRecord, run_dir: Path) -> Path:
    """The absolute base model folder a LoRA run fine-tuned (for ``adapter_config.json``).

    Raises:
        ValueError: the run records none (it trained its adapters on a base it initialised itself).
    """
    if run.base_model is None:
        raise ValueError(
            f"{run_dir}: a LoRA run without a base model (no checkpoint.initial_load_path in trainer_config.json): "
            "a PEFT adapter needs its base; export with --merge for a full model"
        )
    base = run.base_model.absolute()
    if not (base / "config.json").is_file():
        log.warning("%s: the base model of %s is not a Hugging Face folder here; the adapter names it anyway",
                    base, run_dir)  # fmt: skip
    return base


def _weights(kind: str, loaded: LoadedState, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(tensors to write, the TorchTitan state they describe)`` for an export of ``kind``.

    ``"adapter"``: PEFT's adapter tensors (the state is the run's own); ``"merged"``: the merged model
    under Hugging Face names (and the merged TorchTitan state); ``"full"``: the model as it is.
    """
    state, lora = loaded.state, loaded.run.lora
    tied = bool(loaded.model_config.enable_weight_tying)
    if kind == "adapter" and lora is not None:
        tensors = xlora.peft_state(state, loaded.model_config, loaded.adapter, lora)
    else:
        if kind == "merged" and lora is not None:
            state = xlora.merge(state, loaded.model_config, lora)
        tensors = to_hf(loaded.adapter, state, tied=tied)
    return {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, state


def _architecture(loaded: LoadedState, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``config.json``'s model fields (a LoRA run's merged model has its base's architecture)."""
    return hf_config(loaded.model_config, state, loaded.run.seq_len)


def export_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    merge: bool = False,
) -> ExportResult:
    """Export checkpoint ``step`` (default: the newest complete one) of ``run_dir`` to a Hugging Face folder ``out``.

    ``out`` receives ``config.json``, ``generation_config.json``, ``model.safetensors`` (sharded
    with ``model.safetensors.index.json`` above ``max_shard_size``), ``tokenizer.json``,
    ``tokenizer_config.json``, ``README.md`` and :data:`MARKER`, all at once (module docstring).
    A LoRA run's default export is a PEFT adapter instead: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (never sharded) replace the config and weight files.

    Args:
        run_dir: a ``titanenv train --output-dir``.
        out: the folder to write (missing, empty, or an earlier export of this run).
        step: the checkpoint step; None for the newest complete one.
        dtype: ``"float32"`` or ``"bfloat16"`` (:data:`DTYPES`).
        max_shard_size: bytes per safetensors file (int, or text like ``"5GB"``).
        merge: a LoRA run: write the base with the adapters merged in, a full model (:func:`export_kind`).

    Raises:
        ValueError: an unknown ``dtype``; a model or tokenizer the export cannot express; ``merge`` on a run
            without LoRA; an adapter export of a LoRA run that records no base model.
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
    kind = export_kind(run_path, merge)
    run = read_run_record(run_path)
    base = _base_model(run, run_path) if kind == "adapter" else run.base_model and run.base_model.absolute()
    _claim(out, run_path)
    loaded = load_state(run_path, step=step)
    tensors, state = _weights(kind, loaded, dtype)
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
    config: dict[str, Any] = {}
    if kind != "adapter":
        config = {**_architecture(loaded, state), "bos_token_id": eod, "eos_token_id": eod, "pad_token_id": pad,
                  "torch_dtype": dtype, "dtype": dtype}  # fmt: skip
    parameters = sum(t.numel() for t in tensors.values())
    facts = {"name": run_path.name, "step": step, "checkpoint": str(ckpt), "recipe": loaded.run.recipe,
             "parameters": parameters, "dtype": dtype, "seq_len": loaded.run.seq_len,
             "vocab_size": loaded.run.vocab_size, "data": prefix, "torchtitan": _version("torchtitan"),
             "eod_token": eod_token, "eod_id": eod, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind,
             "lora": loaded.run.lora, "base_model": base}  # fmt: skip

    _sweep(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_") or "localhost"
    tmp = out.parent / f".{out.name}.tmp.{os.getpid()}.{host}"
    try:
        tmp.mkdir()
        if kind == "adapter" and base is not None and run.lora is not None:
            save_file(tensors, str(tmp / xlora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
            config = xlora.write_adapter_config(tmp, run.lora, base)
        else:
            _write_weights(tmp, tensors, max_shard_size)
            atomic.write_json(tmp / "config.json", config)
            atomic.write_json(tmp / "generation_config.json", {
                "bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod if pad is None else pad})  # fmt: skip
        del tensors, state
        atomic.write_bytes(tmp / "tokenizer.json", (tok_dir / "tokenizer.json").read_bytes())
        atomic.write_json(tmp / "tokenizer_config.json", _tokenizer_config(tok_cfg, eod_token, loaded.run.seq_len))
        atomic.write_text(tmp / "README.md", _readme(facts, _provenance(run_path)))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        mark = {"schema": 1, "kind": kind, "run_dir": str(run_path), "step": step, "checkpoint": str(ckpt),
                "checkpoint_marker_sha256": sha256_file(ckpt / checkpoints.MARKER), "dtype": dtype, "files": files,
                "titanenv": __version__, "torchtitan": facts["torchtitan"], "time": facts["time"],
                "seconds": round(time.monotonic() - start, 3)}  # fmt: skip
        if loaded.run.lora is not None:
            lora = loaded.run.lora
            mark["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                            "target_modules": list(lora.target_modules)}  # fmt: skip
            mark["base_model"] = None if base is None else str(base)
        atomic.write_json(tmp / MARKER, redacted(mark), durable=True)
        files[MARKER] = (tmp / MARKER).stat().st_size
        replaced = _swap_in(tmp, out, run_path, step, dtype, kind)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if atomic.is_disk_full(e) and not isinstance(e, atomic.DiskFull):
            raise atomic.disk_full(out, what="writing the export") from e
        raise
    return ExportResult(out, run_path, step, ckpt, dtype, files, parameters, time.monotonic() - start, replaced,
                        config, kind, base)  # fmt: skip


def _swap_in(tmp: Path, out: Path, run_dir: Path, step: int, dtype: str, kind: str) -> bool:
    """Rename ``tmp`` to ``out``, moving an earlier export of the run aside first; returns whether one was replaced.

    When another process finished the very same export meanwhile (two eval jobs on one run), theirs
    stays: a reader of ``out`` may already be loading it.
    """
    if is_current(out, run_dir, step, dtype, kind):
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
            if is_current(out, run_dir, step, dtype, kind):  # lost a race to the same export: keep theirs
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


def cached_export(
    run_dir: str | os.PathLike[str], *, step: int | None = None, dtype: str = "float32", merge: bool = False
) -> Path:
    """The Hugging Face folder of ``run_dir``'s checkpoint ``step`` (default: newest complete), exported once.

    Exports into :func:`export_dir` (``RUN/export/step-N``; ``step-N-adapter`` for a LoRA run's
    adapter, its default; ``merge``: the merged full model in ``step-N``) unless a complete export
    of that very checkpoint and kind is already there (:func:`is_current`), which is then reused as it is.

    Raises:
        See :func:`export_run`.
    """
    step, _ = resolve_checkpoint(run_dir, step)
    kind = export_kind(run_dir, merge)
    out = export_dir(run_dir, step, dtype, kind)
    if is_current(out, run_dir, step, dtype, kind):
        return out
    return export_run(run_dir, out, step=step, dtype=dtype, merge=merge).out
