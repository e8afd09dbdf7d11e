"""``titanenv``: one subcommand per stage (config, preprocess, train, eval, demo)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from titanenv import __version__
from titanenv import config as configlib
from titanenv.assets import cli as assets_cli
from titanenv.container import cli as container_cli
from titanenv.data import cli as data_cli
from titanenv.eval import cli as eval_cli
from titanenv.export import cli as export_cli
from titanenv.finetune import cli as finetune_cli
from titanenv.slurm import cli as slurm_cli
from titanenv.train import cli as train_cli
from titanenv.workflow import cli as workflow_cli

app = typer.Typer(
    help="Offline-first LLM pre-training with TorchTitan on Slurm supercomputers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Site configuration (configuration.sh).", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(stderr=True)
log = logging.getLogger("titanenv")


def _version(value: bool) -> None:
    if value:
        print(f"titanenv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every detail.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    else:  # batch jobs: one unwrapped, timestamped line per record
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise


@config_app.command("show")
def config_show(
    path: Annotated[
        Path | None, typer.Option("--file", help="configuration.sh to read (default: the repository's).")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Unknown TITANENV_* names are errors, not warnings.")
    ] = False,
) -> None:
    """Print every resolved site setting and where its value came from."""
    resolved = _load(path, strict=strict)
    table = Table("variable", "value", "from")
    for field, var in configlib._aliases().items():
        table.add_row(var, str(getattr(resolved.config, field)), resolved.origins.get(var, ""))
    Console().print(table)
    m = resolved.config.profile
    print(f"machine profile {m.name}: {m.description}; rendezvous host {m.rdzv_host}; {m.gpus_per_node} GPUs/node")


app.add_typer(container_cli.app, name="container")
app.add_typer(assets_cli.app, name="assets")
app.add_typer(slurm_cli.app, name="slurm")
app.command("doctor")(assets_cli.doctor)
app.command("preprocess")(data_cli.preprocess)
app.command("train")(train_cli.train)
app.command("finetune")(finetune_cli.finetune)
app.command("workflow")(workflow_cli.workflow)
app.command("eval")(eval_cli.evaluate)
app.command("export")(export_cli.export)
app.command("generate")(eval_cli.generate)


DEMO_PROMPT = "The history of the city"
DEMO_EVAL_ARTICLES = 10
"""The first WikiText-2 articles, which the bundled lm-eval task scores (titanenv_wikitext2): the demo
trains on the others."""


@app.command()
def demo(
    steps: Annotated[int, typer.Option(help="Training steps.")] = 100,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output root (default: TITANENV_DATA_DIR and TITANENV_CHECKPOINT_DIR)."),
    ] = None,
) -> None:
    """Run the main job on the bundled sample: preprocess, train, evaluate, export, lm-eval, generate.

    Real text (WikiText-2 and C4 samples) tokenized with GPT-2's tokenizer, a small Llama trained
    with TorchTitan on the CPU, its validation loss, a Hugging Face export, an offline lm-eval run
    on the bundled WikiText-2 perplexity task (articles kept out of training) and a sampled
    continuation (fixed seed); then where every output went. A rerun resumes from the existing outputs.
    """
    from titanenv.data import preprocess as pp

    cfg = _load(None).config
    sample = cfg.root / "sample_data"
    tokenizer = sample / "gpt2_tokenizer.json"
    data = (out / "data" if out else cfg.data_dir) / "sample"
    run_dir = (out / "runs" if out else cfg.checkpoint_dir) / "sample"
    wikitext = _demo_training_articles(sample / "wikitext2_valid_test_docs.jsonl", data / "wikitext2_train_part.jsonl")
    train_inputs: list[str | Path] = [wikitext, *sorted(sample.glob("c4-sample.*.json.gz"))]
    splits: dict[str, list[str | Path]] = {"train": train_inputs, "val": [sample / "c4-guardian-val.jsonl.gz"]}
    for split, inputs in splits.items():
        console.rule(f"preprocess {split}")
        cfg_pp = pp.PreprocessConfig(
            inputs=inputs, output_prefix=data / split, tokenizer_model=str(tokenizer), append_eod=True, workers=2
        )
        data_cli.report(pp.run(cfg_pp))
    console.rule("train")
    train_cli.train(data=data / "train", tokenizer=tokenizer, output_dir=run_dir, steps=steps, seq_len=256,
                    batch_size=4)  # fmt: skip
    console.rule("validation loss")
    eval_cli.evaluate(output_dir=run_dir, data=data / "val", tokenizer=tokenizer)
    console.rule("export")
    export_cli.export(run_dir)
    console.rule("lm-eval (offline)")
    eval_cli.evaluate(model=[run_dir], tasks="titanenv_wikitext2", limit=5)
    console.rule("generate")
    # Sampled with a fixed seed (the same text on every rerun): greedy decoding of so small a model loops.
    eval_cli.generate(model=run_dir, prompt=[DEMO_PROMPT], max_new_tokens=24, temperature=0.8, top_p=0.9, seed=0)
    console.rule("outputs")
    print("\n".join(_output_lines(data, run_dir)))


def _demo_training_articles(source: Path, dest: Path) -> Path:
    """``dest``: the WikiText-2 articles of ``source`` after the first :data:`DEMO_EVAL_ARTICLES`."""
    from titanenv import atomic

    lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    text = "".join(lines[DEMO_EVAL_ARTICLES:])
    if not dest.is_file() or dest.read_text(encoding="utf-8") != text:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(dest, text)
    return dest


def _output_lines(data: Path, run_dir: Path) -> list[str]:
    """Where the demo's outputs went; the command in parentheses is quoted for copying."""
    return [
        f"tokenized data:   {data}/{{train,val}}.{{bin,idx,manifest.json}}",
        f"checkpoints:      {run_dir}/checkpoint",
        f"tensorboard logs: {run_dir}/tb  ({shlex.join(['tensorboard', '--logdir', str(run_dir / 'tb')])})",
        f"validation loss:  {run_dir}/eval.json",
        f"HF export:        {run_dir}/export/step-N  (transformers, vLLM and lm-eval load it)",
        f"lm-eval results:  {run_dir}/eval/results.md, results.csv, lm_eval/",
        f"per-rank logs:    {run_dir}/logs",
        f"provenance:       {run_dir}/provenance  (config, sbatch script, versions, pip freeze, nodes)",
    ]


def _load(path: Path | None, strict: bool = False) -> configlib.Resolved:
    try:
        return configlib.load(path, strict=strict)
    except configlib.ConfigError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None


def main() -> None:
    """Console entry point: clear one-line errors for user mistakes, not tracebacks."""
    try:
        app()
    except (FileNotFoundError, ValueError, OSError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
