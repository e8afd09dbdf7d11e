"""``titanenv workflow``: raw text to an Infini-attention Llama trained beside its baseline, compared.

One command chains the stages that exist on their own, each as its own command:

1. **preprocess** ``--raw-data`` into ``OUT/data/train`` (+ ``_val``) with ``titanenv preprocess``
   (a rerun with the same inputs and tokenizer skips: the manifest's fingerprint), or use
   ``--preprocessed-data PREFIX``, checked against the tokenizer first;
2. **train** the Infini model (``RECIPE_infini``), the baseline (``RECIPE``; ``--disable-infini-attn``),
   or both (``--run-both-models``) with ``titanenv train`` into ``OUT/runs/{infini,baseline}``; the two
   recipes differ only in the attention (a test compares them field by field);
3. **eval**: validation loss by position bucket (``titanenv eval --data VAL --by-position``) and
   passkey retrieval (``titanenv eval --passkey``) of each model;
4. **report**: ``OUT/report/report.{md,png}`` (:mod:`titanenv.workflow.report`).

With ``--local`` the stages run here, one after the other (both models at once with
``--run-both-models``: two processes, on disjoint GPUs with ``--gpu 0,1``). Without it they are
Slurm jobs chained with ``--dependency=afterok``: the preprocessing job, one training job per
model (the training sbatch script, requeued at the time limit), and one job for eval and report
(``titanenv workflow --only eval,report --local`` on the saved ``OUT/workflow.json``).
``--dry-run`` prints the whole chain and writes nothing.

Settings come from flags and ``--config-file`` (TOML or YAML): the same names (``seq-len`` or
``seq_len``), flags win, an unknown key is an error naming it; a ``torchtitan`` table passes
TorchTitan flags through (``{"lr-scheduler.warmup-steps": 10}`` -> ``--lr-scheduler.warmup-steps 10``).
Everything is checked before anything runs or is submitted: the tokenizer exists, the
preprocessed data was made with it, the config keys are known.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["MODELS", "Plan", "Step", "WorkflowConfig", "WorkflowError", "load_config", "plan"]

MODELS = ("baseline", "infini")
STAGES = ("preprocess", "train", "eval", "report")


class WorkflowError(ValueError):
    """A setting that cannot work; the message names the flag or key and the fix."""


class WorkflowConfig(BaseModel):
    """Every setting of ``titanenv workflow`` (flag ``--seq-len`` = key ``seq_len`` or ``seq-len``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    raw_data: list[Path] = Field(default_factory=list)
    """Raw text inputs (anything ``titanenv preprocess --input`` takes)."""
    preprocessed_data: Path | None = None
    """A tokenized prefix (``PREFIX.bin/.idx`` + manifest) to train on instead."""
    force_preprocess: bool = False
    """Tokenize ``raw_data`` again even when ``OUT/data`` already holds it."""
    tokenizer: Path
    """``tokenizer.json`` or its folder (real, local: a missing one stops the workflow)."""
    output_dir: Path
    """Root of everything written: ``data/``, ``runs/{baseline,infini}/``, ``report/``, ``workflow.json``."""
    tensorboard_dir: Path | None = None
    """TensorBoard runs go to ``TENSORBOARD_DIR/{baseline,infini}``. Default: each run's ``tb/``."""
    verbose: bool = False
    disable_infini_attn: bool = False
    """Train the baseline only."""
    run_both_models: bool = False
    """Train the baseline and the Infini model at the same time."""
    gpu: str | None = None
    """GPU ids for --local, e.g. ``0,1``: split between the two models with --run-both-models."""
    disable_flash_attn: bool = False
    """Force causal SDPA attention (TorchTitan's FlexAttention otherwise, on CUDA)."""
    enable_fused_adam: bool = False
    """TorchTitan's fused AdamW where CUDA has it."""
    offline_mode: bool = True
    """Run every stage with the offline flags set (HF_HUB_OFFLINE=1, ...). It is the default."""
    recipe: Literal["titanenv_debug", "titanenv_1b"] = "titanenv_debug"
    """Baseline recipe; the Infini model uses RECIPE_infini."""
    steps: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    checkpoint_interval: int | None = None
    segment_len: int | None = None
    """Infini segment length in tokens. Default: the recipe's (seq_len / 16)."""
    update: Literal["linear", "delta"] | None = None
    """Infini memory update rule. Default: the recipe's."""
    val_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of raw documents kept for validation (by document hash)."""
    eval_windows: int = Field(default=32, ge=1)
    """Validation windows of seq_len tokens scored per model."""
    passkey_lengths: list[int] = Field(default_factory=list)
    """Passkey context lengths in tokens. Default: 4 lengths up to the training seq_len."""
    passkey_depths: list[int] = Field(default_factory=lambda: [0, 25, 50, 75, 100])
    passkey_trials: int = Field(default=4, ge=1)
    local: bool = False
    """Run the stages here instead of as Slurm jobs."""
    nodes: int = Field(default=1, ge=1)
    time: str = "02:00:00"
    account: str | None = None
    partition: str | None = None
    torchtitan: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """TorchTitan flags for both trainings, without the leading ``--``."""

    @model_validator(mode="after")
    def _one_data_source(self) -> WorkflowConfig:
        if bool(self.raw_data) == (self.preprocessed_data is not None):
            raise ValueError("give exactly one of raw_data (--raw-data) and preprocessed_data (--preprocessed-data)")
        return self

    @property
    def models(self) -> tuple[str, ...]:
        """The models this workflow trains."""
        if self.run_both_models:
            return MODELS
        return ("baseline",) if self.disable_infini_attn else ("infini",)


def _normalise(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Keys with ``-`` as ``_``; unknown keys are an error naming them and the nearest known ones."""
    known = set(WorkflowConfig.model_fields)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            unknown.append(f"{key!r}" + (f" (did you mean {near[0].replace('_', '-')!r}?)" if near else ""))
        out[name] = value
    if unknown:
        raise WorkflowError(f"{source}: unknown setting {', '.join(unknown)}; see `titanenv workflow --help`")
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, keys normalised.

    Raises:
        WorkflowError: unreadable, not a mapping, or an unknown key (named).
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise WorkflowError(f"--config-file {path}: {e.strerror or e}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError: both name the line
        raise WorkflowError(f"--config-file {path}: {e}") from None
    if not isinstance(data, dict):
        raise WorkflowError(f"--config-file {path}: expected a mapping of settings, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != "_resolved"}  # OUT/workflow.json, written by save()
    return _normalise(data, str(path))


def load_config(config_file: Path | None, flags: Mapping[str, Any]) -> WorkflowConfig:
    """Settings from ``config_file`` overridden by the ``flags`` that were given (not None).

    Raises:
        WorkflowError: an unknown key, a bad value (the field named), or a missing required setting.
    """
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    base = config_file.parent if config_file else Path.cwd()
    for key in ("raw_data", "preprocessed_data", "tokenizer", "output_dir", "tensorboard_dir"):
        value = data.get(key)  # relative paths in a file are relative to the file
        if isinstance(value, str):
            data[key] = os.path.normpath(base / value) if not Path(value).is_absolute() else value
        elif isinstance(value, list):
            data[key] = [os.path.normpath(base / v) if not Path(str(v)).is_absolute() else v for v in value]
    given = _normalise({k: v for k, v in flags.items() if v is not None and v != [] and v != ()}, "flags")
    for key in ("raw_data", "preprocessed_data", "tokenizer", "output_dir", "tensorboard_dir"):
        value = given.get(key)  # flags: relative to here; stored absolute (OUT/workflow.json is read elsewhere)
        if isinstance(value, str | Path):
            given[key] = Path(value).absolute()
        elif isinstance(value, list):
            given[key] = [v if str(v).startswith(("hf:", "@")) else Path(v).absolute() for v in value]
    try:
        return WorkflowConfig(**{**data, **given})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])).replace('_', '-') or 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise WorkflowError(f"workflow settings: {problems}") from None


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Step:
    """One command of the chain: what runs, where, and after what.

    Attributes:
        stage: ``preprocess``, ``train``, ``eval`` or ``report``.
        name: ``data``, ``baseline``, ``infini`` or ``report``.
        argv: the ``titanenv`` command (local) or the sbatch options and script (Slurm).
        env: extra environment for the command (e.g. ``CUDA_VISIBLE_DEVICES``).
        after: names of the steps it waits for (``--dependency=afterok`` on Slurm).
    """

    stage: str
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The resolved workflow: its settings, folders and steps."""

    config: WorkflowConfig
    data: Path
    val: Path | None
    runs: dict[str, Path]
    report: Path
    steps: list[Step]

    def text(self) -> str:
        """The chain, one command per line, for ``--dry-run`` and the log."""
        lines = []
        for s in self.steps:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.env.items())
            after = f"   # after {', '.join(s.after)}" if s.after else ""
            lines.append(f"[{s.stage}:{s.name}] {env + ' ' if env else ''}{shlex.join(s.argv)}{after}")
        return "\n".join(lines)


def _titanenv() -> list[str]:
    return [sys.executable, "-m", "titanenv.cli"]


def check_inputs(config: WorkflowConfig) -> None:
    """Everything that can be checked before a job: tokenizer, data, recipe settings.

    Raises:
        WorkflowError: naming the setting and the fix.
    """
    from titanenv.data import manifest as manifestlib
    from titanenv.data import tokenizer as toklib

    tok = config.tokenizer
    tok_json = tok if tok.is_file() else tok / "tokenizer.json"
    if not tok_json.is_file():
        raise WorkflowError(
            f"--tokenizer {tok}: no tokenizer.json there; titanenv never invents one. Fetch a real one on a login "
            "node: TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch --add tokenizer:ORG/NAME, "
            "or pass a local tokenizer.json"
        )
    if config.preprocessed_data is not None:
        prefix = config.preprocessed_data
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise WorkflowError(f"--preprocessed-data {prefix}: no {prefix}{suffix}; make it with --raw-data")
        try:
            manifestlib.check_tokenizer(prefix, toklib.load(tok_json))
        except manifestlib.TokenizerMismatch as e:
            fix = "With the workflow: --raw-data FILES (tokenized again)."
            raise WorkflowError(f"--preprocessed-data: {e} {fix}") from None
    for path in config.raw_data:
        if not any(ch in str(path) for ch in "*?[") and not str(path).startswith(("hf:", "@")) and not path.exists():
            raise WorkflowError(f"--raw-data {path}: no such file or folder")
    if config.gpu and config.local:
        ids = [g for g in config.gpu.split(",") if g.strip()]
        if config.run_both_models and len(ids) < 2:
            raise WorkflowError(f"--gpu {config.gpu}: --run-both-models needs 2 or more GPUs (e.g. --gpu 0,1)")


def _train_flags(config: WorkflowConfig, model: str, data: Path, out: Path) -> list[str]:
    recipe = config.recipe if model == "baseline" else f"{config.recipe}_infini"
    flags = ["--data", str(data), "--tokenizer", str(config.tokenizer.absolute()), "--output-dir", str(out),
             "--recipe", recipe]  # fmt: skip
    for name in ("steps", "seq_len", "batch_size", "checkpoint_interval"):
        value = getattr(config, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if not config.local:
        flags += ["--nodes", str(config.nodes), "--time", config.time]
        flags += [f for k in ("account", "partition") if getattr(config, k) for f in (f"--{k}", getattr(config, k))]
    titan: list[str] = []
    if model == "infini":
        if config.segment_len is not None:
            titan += ["--infini.segment-len", str(config.segment_len)]
        if config.update is not None:
            titan += ["--infini.update", config.update]
    if config.disable_flash_attn:
        titan += ["--attn-backend", "sdpa"]
    if config.enable_fused_adam:
        titan += ["--fused-adam"]
    if config.tensorboard_dir is not None:
        titan += ["--metrics.save-tb-folder", str((config.tensorboard_dir / model).absolute())]
    for key, value in config.torchtitan.items():
        flag = f"--{key.lstrip('-')}"
        titan += [flag] if value is True else [flag, str(value)]
    return flags + (["--", *titan] if titan else [])


def plan(config: WorkflowConfig, *, only: tuple[str, ...] = STAGES) -> Plan:
    """The commands of the workflow, local or as Slurm jobs (nothing is run or written).

    Raises:
        WorkflowError: bad inputs (see :func:`check_inputs`).
    """
    check_inputs(config)
    out = config.output_dir.absolute()
    if config.preprocessed_data is not None:
        data, val = config.preprocessed_data.absolute(), None
        val_candidate = Path(f"{data}_val")
        if Path(f"{val_candidate}.bin").is_file():
            val = val_candidate
    else:
        data = out / "data" / "train"
        val = out / "data" / "train_val" if config.val_fraction > 0 else None
    runs = {m: out / "runs" / m for m in config.models}
    report = out / "report"
    te = _titanenv()
    steps: list[Step] = []
    if "preprocess" in only and config.raw_data:
        inputs = [p if str(p).startswith(("hf:", "@")) else p.absolute() for p in config.raw_data]
        argv = [*te, "preprocess", *[a for p in inputs for a in ("--input", str(p))], "--output-prefix", str(data),
                "--tokenizer-model", str(config.tokenizer.absolute()), "--append-eod"]  # fmt: skip
        if config.val_fraction > 0:
            argv += ["--val-fraction", f"{config.val_fraction:g}"]
        steps.append(Step("preprocess", "data", argv))
    gpus = [g.strip() for g in (config.gpu or "").split(",") if g.strip()]
    if "train" in only:
        for i, model in enumerate(config.models):
            env = {}
            if gpus and config.local:
                share = gpus[i :: len(config.models)] if config.run_both_models else gpus
                env["CUDA_VISIBLE_DEVICES"] = ",".join(share)
            after = ("data",) if any(s.stage == "preprocess" for s in steps) else ()
            steps.append(Step("train", model, [*te, "train", *_train_flags(config, model, data, runs[model])], env,
                              after))  # fmt: skip
    trained = tuple(s.name for s in steps if s.stage == "train")
    if "eval" in only:
        for model, run in runs.items():
            if val is not None:
                steps.append(Step("eval", f"{model}-loss", [*te, "eval", "--output-dir", str(run), "--data", str(val),
                                  "--max-windows", str(config.eval_windows), "--by-position", "8"],
                                  after=trained))  # fmt: skip
            lengths = config.passkey_lengths
            depths = ",".join(map(str, config.passkey_depths))
            argv = [*te, "eval", "--passkey", "--model", str(run), "--passkey-depths", depths,
                    "--passkey-trials", str(config.passkey_trials)]  # fmt: skip
            if lengths:
                argv += ["--passkey-lengths", ",".join(map(str, lengths))]
            steps.append(Step("eval", f"{model}-passkey", argv, after=trained))
    if "report" in only:
        argv = [sys.executable, "-m", "titanenv.workflow.report",
                *[a for m, r in runs.items() for a in ("--run", f"{m}={r}")], "--out", str(report)]  # fmt: skip
        steps.append(Step("report", "report", argv, after=tuple(s.name for s in steps if s.stage == "eval")))
    return Plan(config, data, val, runs, report, steps)


def environment(config: WorkflowConfig, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every local step: this one, offline flags (``offline_mode``), ``extra``."""
    env = dict(os.environ)
    if config.offline_mode:
        from titanenv import offline

        to_set, to_unset = offline.offline_environment()
        env = {k: v for k, v in env.items() if k not in to_unset}
        env.update(to_set)
    env.update(extra or {})
    return env


def save(plan_: Plan) -> Path:
    """Write the resolved settings to ``OUT/workflow.json`` (the eval/report job reads them)."""
    from titanenv import atomic

    path = plan_.config.output_dir.absolute() / "workflow.json"
    data = json.loads(plan_.config.model_dump_json())
    data["_resolved"] = True
    atomic.write_json(path, data)
    return path


# ------------------------------------------------------------------ running it


def run_local(plan_: Plan, say: Any = print) -> int:
    """Run the steps here, in order; the training steps of both models at once. Returns 0 or the failing exit code.

    Each step's output goes to ``OUT/logs/STAGE-NAME.log`` (and to this terminal with ``verbose``).
    """
    import subprocess
    import time

    logs = plan_.config.output_dir.absolute() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(plan_.steps)
    while pending:
        batch = [pending.pop(0)]
        if batch[0].stage == "train":  # both models at once (disjoint GPUs, or half the cores each)
            while pending and pending[0].stage == "train":
                batch.append(pending.pop(0))
        procs = []
        for step in batch:
            extra = dict(step.env)
            if len(batch) > 1 and "CUDA_VISIBLE_DEVICES" not in extra and "OMP_NUM_THREADS" not in os.environ:
                extra["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // len(batch)))
            log = logs / f"{step.stage}-{step.name}.log"
            say(f"[{step.stage}:{step.name}] {shlex.join(step.argv)}  (log: {log})")
            f = log.open("w")
            out = None if plan_.config.verbose else f
            procs.append((step, log, f, subprocess.Popen(step.argv, env=environment(plan_.config, extra),
                                                         stdout=out, stderr=subprocess.STDOUT if out else None),
                          time.monotonic()))  # fmt: skip
        failed = 0
        for step, log, f, proc, start in procs:
            rc = proc.wait()
            f.close()
            say(f"[{step.stage}:{step.name}] exit {rc} in {time.monotonic() - start:.0f} s")
            if rc != 0:
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
                say(f"[{step.stage}:{step.name}] failed; the end of {log}:\n{tail}")
                failed = failed or rc
        if failed:
            return failed
    return 0


def submit_chain(plan_: Plan, site: Any, say: Any = print, *, dry_run: bool = False) -> dict[str, str]:
    """Submit the steps as Slurm jobs chained with ``--dependency=afterok``; returns step name -> job id.

    The preprocessing job uses the tokenizing sbatch script of the configured machine, each training
    job the training script (``titanenv train --submit --dependency ...``), and one last job runs
    eval and report from ``OUT/workflow.json``. With ``dry_run`` nothing is written or submitted;
    job ids are shown as ``<NAME>``.
    """
    import re
    import subprocess

    from titanenv import sbatch as sbatchlib
    from titanenv.slurm.render import PreprocessSpec, render

    cfg = plan_.config
    out = cfg.output_dir.absolute()
    root = site.config.root
    machine = site.config.machine
    account = cfg.account or site.config.account or "CHANGE_ME"
    env = {**environment(cfg), "TITANENV_ROOT": str(root)}
    ids: dict[str, str] = {}

    def dependency(after: tuple[str, ...]) -> str | None:
        return "afterok:" + ":".join(ids[a] for a in after) if after else None

    for step in plan_.steps:
        if step.stage == "preprocess":
            spec = PreprocessSpec(machine=machine, account=account, job_name="titanenv-workflow-preprocess",
                                  output=f"{out}/logs/%x-%j.out")  # fmt: skip
            script = out / "jobs" / "preprocess.sbatch"
            args = [str(script), *step.argv[4:]]  # the script runs `titanenv preprocess --workers N "$@"`
            if dry_run:
                say(f"sbatch {shlex.join(args)}")
                ids[step.name] = "<data>"
                continue
            script.parent.mkdir(parents=True, exist_ok=True)
            (out / "logs").mkdir(parents=True, exist_ok=True)
            script.write_text(render(spec))
            ids[step.name] = sbatchlib.submit(args, cwd=root, env=env, what=str(script))
        elif step.stage == "train":
            dep = dependency(step.after)
            argv = [*step.argv[:4], "--submit", *(["--dependency", dep] if dep else []),
                    *(["--dry-run"] if dry_run else []), *step.argv[4:]]  # fmt: skip
            if dry_run:
                say(shlex.join(argv))
                ids[step.name] = f"<{step.name}>"
                continue
            p = subprocess.run(argv, env=env, capture_output=True, text=True)
            found = re.search(r"submitted job (\S+):", p.stdout)
            if p.returncode != 0 or found is None:
                raise WorkflowError(f"submitting {step.name} failed (exit {p.returncode}): {p.stderr[-2000:]}")
            ids[step.name] = found.group(1)
        else:
            continue
        say(f"[{step.stage}:{step.name}] job {ids[step.name]}")
    rest = [s for s in plan_.steps if s.stage in ("eval", "report")]
    if rest:
        after = tuple(s.name for s in plan_.steps if s.stage == "train")
        wrap = shlex.join([str(root / "container_run.sh"), "titanenv", "workflow", "--config-file",
                           str(out / "workflow.json"), "--local", "--only", "eval,report"])  # fmt: skip
        profile = site.config.profile
        gres = ["--gres=gpu:1"] if profile.gpus_per_node else []
        partition = cfg.partition or (site.config.gpu_partition if profile.gpus_per_node else site.config.cpu_partition)
        options = ["--job-name=titanenv-workflow-report", f"--output={out}/logs/%x-%j.out", "--nodes=1",
                   "--ntasks=1", f"--time={cfg.time}", f"--account={account}", f"--partition={partition}", *gres,
                   f"--wrap={wrap}"]  # fmt: skip
        dep = dependency(after)
        if dry_run:
            say(shlex.join(["sbatch", *([f"--dependency={dep}"] if dep else []), *options]))
            ids["report"] = "<report>"
        else:
            save(plan_)
            ids["report"] = sbatchlib.submit(options, dependency=dep, cwd=root, env=env, what="the eval/report job")
            say(f"[eval+report] job {ids['report']} (after {', '.join(after) or 'nothing'})")
    return ids
