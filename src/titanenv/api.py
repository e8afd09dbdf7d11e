"""titanenv from Python: :func:`train`, :func:`finetune`, :func:`evaluate` and :func:`generate`.

Thin, typed wrappers over the stages, with the behaviour of ``titanenv train``, ``titanenv
finetune``, ``titanenv eval`` and ``titanenv generate`` (the same checks, the same files, the same
offline rules)::

    from titanenv import api

    run = api.train(data="data/sample/train", tokenizer="sample_data/gpt2_tokenizer.json",
                    output_dir="runs/sample", steps=40)
    table = api.evaluate([run.output_dir], tasks=["titanenv_wikitext2"], num_fewshot=[0])
    print(api.generate(run.output_dir, ["The history of"], greedy=True)[0])

Training runs where it is called, as ``titanenv train`` does: on one machine (``torchrun`` with one
process per GPU, or one on CPU), or, inside a Slurm allocation, as this node's share of it (so call
it once per node under ``srun``, or submit with ``titanenv train --submit``).
A full example: ``examples/api_example.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from titanenv import config
from titanenv.eval.generate import generate_text
from titanenv.eval.matrix import MatrixConfig, MatrixResults, run_matrix
from titanenv.train import checkpoints, control
from titanenv.train.exitcodes import ExitCode
from titanenv.train.settings import TrainArgs

__all__ = ["EvalResults", "RunResult", "TrainingFailed", "evaluate", "finetune", "generate", "train"]

EvalResults = MatrixResults
"""What :func:`evaluate` returns: ``rows`` (model, step, task, shots, metric, value, stderr), the
paths of ``results.csv``, ``results.md``, the plots and the per-cell lm-eval JSON files."""

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`train`.

    Attributes:
        output_dir: the run folder (checkpoints, TensorBoard logs, provenance).
        exit_code: 0 (completed) or 75 (checkpointed and stopped early on request; run again to resume).
        state: ``completed`` or ``stopped``, from the run's status file.
        step: newest complete checkpoint's step (None if there is none).
        checkpoint: its folder ``OUTPUT/checkpoint/step-N``.
        export: the Hugging Face export (``OUTPUT/export/step-N``) with ``export_at_end``, else None.
    """

    output_dir: Path
    exit_code: int
    state: str
    step: int | None
    checkpoint: Path | None
    export: Path | None = None


class TrainingFailed(RuntimeError):
    """Training exited with an error: ``exit_code`` is 3 (preflight failed) or torchrun's; see ``log``."""

    def __init__(self, exit_code: int, output_dir: Path) -> None:
        self.exit_code = exit_code
        self.log = output_dir / "logs"
        super().__init__(f"training in {output_dir} failed with exit code {exit_code}; logs in {self.log}")


def train(
    data: PathLike,
    tokenizer: PathLike,
    output_dir: PathLike,
    *,
    steps: int | None = None,
    recipe: str = "titanenv_debug",
    export_at_end: bool = False,
    **flags: Any,
) -> RunResult:
    """Train (or resume) a run on this machine, as ``titanenv train`` without ``--submit``.

    Args:
        data: tokenized dataset prefix (``PREFIX.bin``/``PREFIX.idx`` from ``titanenv preprocess``).
        tokenizer: ``tokenizer.json`` or its folder (copied to ``OUTPUT/tokenizer``).
        output_dir: run folder; an existing one resumes from its newest complete checkpoint.
        steps: total optimizer steps. Default: the recipe's.
        recipe: a config function of :mod:`titanenv.train.recipes`.
        export_at_end: write the Hugging Face export of the final checkpoint to ``OUTPUT/export/step-N``.
        flags: any other field of :class:`titanenv.train.settings.TrainArgs` by name (``seq_len``,
            ``batch_size``, ``checkpoint_interval``, ``extra=["--training.lr", "1e-3"]``, ...).

    Raises:
        FileNotFoundError: the dataset or the tokenizer is missing (the message names the path).
        TypeError: a flag that is not a ``TrainArgs`` field.
        TrainingFailed: the preflight or training failed (exit code 3 or torchrun's).
    """
    args = TrainArgs(data=Path(data).absolute(), tokenizer=Path(tokenizer), output_dir=Path(output_dir).absolute(),
                     steps=steps, recipe=recipe, export_at_end=export_at_end, **flags)  # fmt: skip
    for suffix in (".bin", ".idx"):
        path = Path(f"{args.data}{suffix}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; create the dataset with `titanenv preprocess`")
    return _run(args, export_at_end)


def _run(args: TrainArgs, export_at_end: bool) -> RunResult:
    from titanenv.train import runner

    rc, node = runner.run_here(args, config.load())
    if rc not in (ExitCode.DONE, ExitCode.STOPPED):
        raise TrainingFailed(rc, args.output_dir)
    status = control.read_status(node.run.status) or {}
    decision = checkpoints.choose_resume(args.output_dir / "checkpoint")
    exported = None
    if export_at_end and rc == ExitCode.DONE and node.node_index == 0 and status.get("state") == "completed":
        from titanenv import export

        exported = export.cached_export(args.output_dir)
    return RunResult(
        output_dir=args.output_dir,
        exit_code=rc,
        state=str(status.get("state", "completed" if rc == ExitCode.DONE else "stopped")),
        step=decision.step if decision.path else None,
        checkpoint=decision.path,
        export=exported,
    )


def finetune(
    base: PathLike,
    output_dir: PathLike,
    *,
    data: PathLike | None = None,
    sft: PathLike | None = None,
    steps: int | None = None,
    recipe: str = "",
    export_at_end: bool = False,
    **flags: Any,
) -> RunResult:
    """LoRA fine-tune on this machine, as ``titanenv finetune`` without ``--submit``.

    Args:
        base: a Hugging Face Llama folder, a repo id in the local Hub cache, or a ``titanenv train``
            run folder (exported first).
        output_dir: run folder; an existing one resumes from its newest complete checkpoint.
        data: tokenized dataset prefix (every token trains), or
        sft: a JSONL of ``{"prompt", "response"}`` or ``{"messages"}`` lines (loss masked on the prompt).
        steps: total optimizer steps. Default: the recipe's.
        recipe: default ``titanenv_1b_lora`` for a Hugging Face base, ``RECIPE_lora`` for a run of ``RECIPE``.
        export_at_end: write the PEFT adapter export of the final checkpoint.
        flags: any other field of :class:`titanenv.finetune.FinetuneArgs` by name (``lora_rank``,
            ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``seq_len``, ``batch_size``, ``extra``, ...).

    Raises:
        titanenv.finetune.FinetuneError: a bad setting, before anything starts (a ``ValueError``;
            ``flag`` names the ``titanenv finetune`` flag): the base's config.json differs from the
            recipe, no or both data arguments, a bad SFT line (``FILE:LINE``), bad LoRA settings.
        TrainingFailed: the preflight or training failed (exit code 3 or torchrun's).
    """
    from titanenv.finetune import FinetuneArgs, check_data, resolve

    args = FinetuneArgs(base=Path(base), output_dir=Path(output_dir).absolute(),
                        data=None if data is None else Path(data).absolute(),
                        sft=None if sft is None else Path(sft).absolute(), steps=steps, recipe=recipe,
                        export_at_end=export_at_end, **flags)  # fmt: skip
    check_data(args)
    return _run(resolve(args), export_at_end)


def evaluate(
    models: Sequence[PathLike],
    *,
    tasks: Sequence[str] = ("titanenv_wikitext2", "titanenv_next_sentence"),
    num_fewshot: Sequence[int] = (0,),
    limit: float | None = None,
    include_path: Sequence[PathLike] = (),
    step: int | None = None,
    steps: Sequence[int] | Literal["all"] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    out: PathLike | None = None,
) -> EvalResults:
    """The lm-eval matrix, models x tasks x few-shot counts, offline; as ``titanenv eval``.

    Every task is first built from the local caches; then each model is loaded once and all its
    cells run through ``lm_eval.simple_evaluate``. Run folders are exported on the fly
    (``RUN/export/step-N``) and scored without a BOS token, as they were trained.

    Args:
        models: run folders, titanenv exports or local Hugging Face folders.
        tasks: lm-eval task, group or tag names, task YAML paths, or ``["all"]``.
            Default: the bundled local tasks (no download needed).
        num_fewshot: few-shot counts.
        limit: at most this many documents per task (< 1: a fraction).
        include_path: folders of custom task YAMLs.
        step, steps: checkpoint step(s) of run folders (``"all"``: every complete one).
        batch_size: requests per forward pass.
        device: ``cpu`` or ``cuda``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        out: output folder. Default: ``RUN/eval`` for one run, else ``./eval_results``.

    Raises:
        titanenv.eval.matrix.TasksNotOffline: a task's data is not in the local caches (raised
            before any model loads; the message has the ``titanenv assets fetch`` line).
        FileNotFoundError: a model folder or checkpoint does not exist.
        ValueError: a bad setting (the message names it).
    """
    return run_matrix(
        MatrixConfig(
            models=[Path(m) for m in models],
            tasks=list(tasks),
            num_fewshot=list(num_fewshot),
            limit=limit,
            include_path=[Path(p) for p in include_path],
            step=step,
            steps=steps if steps == "all" or steps is None else list(steps),
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            out=Path(out) if out is not None else None,
        )
    )


def generate(
    model: PathLike,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    step: int | None = None,
    device: str = "cpu",
) -> list[str]:
    """Continue each prompt, offline; as ``titanenv generate``. Deterministic for a given ``seed``.

    Args:
        model: a run folder (its model code, as in training; ``step`` picks the checkpoint), a
            titanenv export or a local Hugging Face folder.
        prompts: texts to continue (no BOS is added for titanenv models).
        max_new_tokens: upper bound on generated tokens; generation stops at EOS/EOD.
        temperature, top_p: sampling (softmax temperature, nucleus mass); ignored with ``greedy``.
        seed: seed of the sampler (each prompt gets its own generator).
        greedy: argmax decoding.
        device: ``cpu`` or ``cuda``.

    Returns:
        The continuations, without their prompts, in prompt order.

    Raises:
        titanenv.eval.generate.ModelNotFound: ``model`` is not a run or a model folder.
        ValueError: a bad setting.
    """
    return generate_text(model, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, greedy=greedy, step=step, device=device)  # fmt: skip
