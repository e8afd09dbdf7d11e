"""One table of training settings (:mod:`titanenv.train.settings`) drives the typer options of
``titanenv train``, :class:`TrainArgs`, the batch job's argv, the torchrun command and the
provenance record; the launch is planned once per node; ``eval --prompt`` loads the model once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import typer
import typer.main
from typer.testing import CliRunner

from titanenv import eval as ev
from titanenv.eval import cli as eval_cli
from titanenv.eval import loss as eval_loss
from titanenv.train import cli, job, launch, provenance, settings
from titanenv.train.settings import SubmitArgs, TrainArgs, option

# A value other than the default for every row of TrainArgs.
SET = {
    "steps": 7, "recipe": "titanenv_1b", "seq_len": 128, "batch_size": 3, "checkpoint_interval": 5,
    "nproc_per_node": 2, "rdzv_host": "{node}-ib", "rdzv_port": 30001, "eod_token": "<|eod|>", "preflight": False,
    "preflight_timeout_s": 7.5, "resume_from": 4, "trust_unmarked": True, "export_at_end": True,
    "extra": ("--debug.seed", "0"),
}  # fmt: skip


def paths(tmp: Path) -> dict[str, Path]:
    return {"data": tmp / "data" / "wiki", "tokenizer": tmp / "tok", "output_dir": tmp / "run"}


def dataset(tmp: Path) -> Path:
    prefix = paths(tmp)["data"]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx"):
        prefix.with_name(prefix.name + suffix).write_bytes(b"")
    return prefix


def click_command(fn) -> typer.main.TyperCommand:
    app = typer.Typer()
    app.command("train")(fn)
    app.command("other")(lambda: None)  # two commands: `train` stays a subcommand
    return typer.main.get_command(app).commands["train"]


def options(fn) -> dict[str, object]:
    return {opt: p for p in click_command(fn).params for opt in (*p.opts, *p.secondary_opts)}


def test_every_field_of_trainargs_is_a_row_and_every_row_a_typer_option_with_its_help():
    rows = settings.table(TrainArgs)
    assert [r.name for r in rows] == [f.name for f in dataclasses.fields(TrainArgs)]
    assert set(SET) == {r.name for r in rows} - {"data", "tokenizer", "output_dir"}
    found = options(cli.train)
    for r in (*rows, *settings.table(SubmitArgs)):
        if r.argument:
            (param,) = [p for p in click_command(cli.train).params if p.name == r.param]
        else:
            param = found[r.flag.split("/")[0]]
            assert all(flag in found for flag in r.flag.split("/")), r.flag
        assert param.name == r.param and param.help == r.help, r.name
        assert param.required == r.required, r.name
    assert {r.titan for r in rows if r.titan} == {"--training.steps", "--training.seq-len",
                                                  "--training.local-batch-size", "--checkpoint.interval",
                                                  "--dataloader.eod-token"}  # fmt: skip


def test_every_row_appears_in_argv_when_set_and_the_argv_parses_back(tmp_path):
    args = TrainArgs(**paths(tmp_path), **SET)
    argv = args.argv()
    for r in settings.table(TrainArgs):
        if not r.argument:
            assert r.argv(getattr(args, r.name))[0] in argv, r.name
    assert argv[-3:] == ["--", "--debug.seed", "0"]
    assert argv[argv.index("--resume-from") + 1] == "step-4" and "--no-preflight" in argv
    assert TrainArgs(**paths(tmp_path)).argv() == [
        "--data", str(tmp_path / "data" / "wiki"), "--tokenizer", str(tmp_path / "tok"),
        "--output-dir", str(tmp_path / "run"), "--recipe", "titanenv_debug",
    ]  # fmt: skip

    seen = []
    command = settings.command(lambda a, o: seen.append((a, o)), TrainArgs, SubmitArgs)
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert seen == [(args, SubmitArgs())]  # the batch job gets back exactly these settings


def test_python_calls_fill_in_the_defaults(tmp_path):
    seen = []
    command = settings.command(lambda a, o: seen.append((a, o)), TrainArgs, SubmitArgs)
    command(**paths(tmp_path), steps=3, preflight_timeout=9.0, resume_from="step-2", submit=True)
    assert seen == [(TrainArgs(**paths(tmp_path), steps=3, preflight_timeout_s=9.0, resume_from=2),
                     SubmitArgs(submit=True))]  # fmt: skip
    with pytest.raises(typer.BadParameter, match="step-N"):
        command(**paths(tmp_path), resume_from="latest")


def test_titan_rows_reach_the_torchrun_command_and_every_row_the_provenance_record(tmp_path):
    args = TrainArgs(**paths(tmp_path), **SET)
    node = job.node_run(args, env={}, cuda_devices=0, site=None, torchrun="torchrun")
    cmd = list(node.command)
    for r in settings.table(TrainArgs):
        if r.titan:
            assert cmd[cmd.index(r.titan) + 1] == str(SET[r.name]), r.name
    assert cmd[cmd.index("--config") + 1] == "titanenv_1b" and cmd[-2:] == ["--debug.seed", "0"]
    assert node.plan.nproc_per_node == 2
    record = node.settings
    assert list(record) == [r.name for r in settings.table(TrainArgs)]
    assert record["data"] == str(tmp_path / "data" / "wiki") and record["extra"] == ["--debug.seed", "0"]
    assert record["resume_from"] == 4 and json.loads(json.dumps(record)) == record
    folder = provenance.Recorder(node.run, {}).start(command=node.command, plan=node.plan, data=node.data, site=None,
                                                     worker_env={}, settings=record)  # fmt: skip
    assert json.loads((folder / "provenance.json").read_text())["settings"] == record


def test_node_run_plans_the_launch_once(tmp_path, monkeypatch):
    calls = []
    real = launch.plan_launch

    def counting(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(launch, "plan_launch", counting)
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODEID": "0"}
    node = job.node_run(TrainArgs(**paths(tmp_path)), env=env, cuda_devices=0, site=None, torchrun="torchrun")
    assert len(calls) == 1
    assert node.plan.rdzv_endpoint in " ".join(node.command)


@dataclass(frozen=True, kw_only=True)
class Wider(TrainArgs):
    """TrainArgs with one more row: the only place a new flag is written."""

    lr: float | None = field(default=None, metadata=option("--lr", titan="--optimizer.lr", help="Peak learning rate."))


def test_adding_a_row_adds_the_flag_everywhere(tmp_path):
    train = cli.make_train(Wider)
    assert options(train)["--lr"].help == "Peak learning rate."
    assert set(options(cli.train)) < set(options(train))
    args = Wider(**paths(tmp_path), lr=0.001)
    assert args.argv()[-2:] == ["--lr", "0.001"]
    assert settings.titan_args(args) == ["--optimizer.lr", "0.001"]
    assert job.node_run(args, env={}, cuda_devices=0, site=None).settings["lr"] == 0.001

    dataset(tmp_path)
    app = typer.Typer()
    app.command()(train)
    result = CliRunner().invoke(app, [*args.argv(), "--dry-run"])
    assert result.exit_code == 0, result.output
    cmd = result.output.split()
    assert cmd[cmd.index("--optimizer.lr") + 1] == "0.001"


def test_the_table_builds_the_same_train_command_as_the_cli(tmp_path):
    dataset(tmp_path)
    app = typer.Typer()
    app.command()(cli.train)
    argv = TrainArgs(**paths(tmp_path), steps=3, checkpoint_interval=2).argv()
    result = CliRunner().invoke(app, [*argv, "--dry-run", "--", "--debug.seed", "0"])
    assert result.exit_code == 0, result.output
    cmd = result.output.split()
    assert cmd[cmd.index("--training.steps") + 1] == "3" and cmd[cmd.index("--checkpoint.interval") + 1] == "2"
    assert cmd[-2:] == ["--debug.seed", "0"]
    result = CliRunner().invoke(app, [*argv, "--trust-unmarked", "--dry-run"])
    assert result.exit_code == 2 and "--trust-unmarked needs --resume-from" in result.output


class Zeros(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


def test_eval_with_a_prompt_loads_the_model_once(tmp_path, sample, monkeypatch):
    tokenizer = sample / "torchtitan_test_tokenizer"
    run = ev.RunRecord(recipe="titanenv_debug", vocab_size=2048, seq_len=16, tokenizer_dir=tokenizer)
    loads = []

    def load_model(output_dir, *, step=None):
        loads.append(step)
        return Zeros(run.vocab_size), run, 5, tmp_path / "checkpoint" / "step-5"

    monkeypatch.setattr(ev, "read_run_record", lambda output_dir: run)
    monkeypatch.setattr(ev, "load_model", load_model)
    monkeypatch.setattr(eval_loss, "validation_loss", lambda model, data, seq_len, **kw: (1.0, 16, 1))
    eval_cli.evaluate(output_dir=tmp_path, data=dataset(tmp_path), prompt="The", max_new_tokens=2)
    assert loads == [None]
    assert json.loads((tmp_path / "eval.json").read_text())["step"] == 5
