"""``titanenv eval``'s lm-eval matrix, with real lm-eval on the bundled local tasks, network cut.

The end-to-end tests run ``python -m titanenv.cli eval`` in ``unshare -n`` (no network at all;
root, required under CI=true) with the offline flags and an empty ``HF_HOME``, from a working
directory that is not the repository. The models are tiny random ``LlamaForCausalLM`` folders
with the GPT-2 tokenizer. The rest are unit tests of model resolution and parsing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from runs import tiny_llama
from titanenv import offline
from titanenv.eval import bundled, matrix
from titanenv.train import checkpoints

UNSHARE = (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
)
TASKS = ",".join(bundled.BUNDLED_TASKS)


@pytest.fixture(scope="module")
def models(tmp_path_factory, sample: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [
        tiny_llama(root / name, seed, sample / "gpt2_tokenizer.json") for seed, name in enumerate(["alpha", "beta"])
    ]


def titanenv_eval(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``titanenv eval ARGS`` in a child process without network, offline flags set, empty HF_HOME."""
    to_set, to_unset = offline.offline_environment()
    env = {k: v for k, v in os.environ.items() if k not in to_unset}
    env.update(to_set, HF_HOME=str(cwd / "hf_home"), COLUMNS="200")
    env.pop("HF_DATASETS_CACHE", None)
    cmd = ["unshare", "-n", sys.executable, "-m", "titanenv.cli", "eval", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_matrix_of_two_models_two_tasks_two_shot_counts_offline(models, tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    out = tmp_path / "results"
    args = ["--model", models[0], "--model", models[1], "--tasks", TASKS, "--num-fewshot", "0,3", "--limit", "6",
            "--out", out]  # fmt: skip
    p = titanenv_eval(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    cells = {(r["model"], r["task"], r["shots"]) for r in rows}
    assert cells == {
        (m, t, s)
        for m in ("alpha", "beta")
        for t, s in [("titanenv_wikitext2", "0"), ("titanenv_next_sentence", "0"), ("titanenv_next_sentence", "3")]
    }  # the perplexity task pins num_fewshot: 0, so it runs once per model
    metrics = {(r["task"], r["metric"]) for r in rows}
    assert {("titanenv_wikitext2", "word_perplexity"), ("titanenv_next_sentence", "acc")} <= metrics
    for r in rows:
        assert float(r["value"]) >= 0 and r["step"] == ""
    acc = [r for r in rows if r["metric"] == "acc"]
    assert all(r["stderr"] != "" for r in acc)  # accuracy has a standard error, perplexity none
    cell = json.loads((out / "lm_eval" / "beta" / "hf" / "titanenv_next_sentence" / "3shot.json").read_text())
    assert cell["n-shot"]["titanenv_next_sentence"] == 3 and cell["titanenv"]["limit"] == 6
    assert len(list((out / "lm_eval").rglob("*.json"))) == 6
    assert (out / "plot_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "plot_steps.png").exists()  # no checkpoint series
    md = (out / "results.md").read_text()
    assert md.startswith("| model | step | task | shots | metric | value | stderr |") and "zero-shot only" in md
    assert "titanenv_next_sentence" in p.stdout and str(out / "results.csv") in p.stdout
    assert "6 cells (0 reused)" in p.stdout

    again = titanenv_eval(*args, cwd=tmp_path)  # same settings: every cell read back, no model loaded
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 cells (6 reused)" in again.stdout and "loading" not in again.stderr


def test_task_not_in_the_cache_fails_before_any_model_loads(tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: titanenv_hub_task\ndataset_path: titanenv-tests/not-in-any-cache\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n"
    )
    broken = tmp_path / "broken_model"  # loading it would fail loudly: proves no model is loaded
    broken.mkdir()
    (broken / "config.json").write_text("not json")
    p = titanenv_eval("--model", broken, "--tasks", "titanenv_next_sentence,titanenv_hub_task",
                      "--include-path", tasks, "--out", tmp_path / "out", cwd=tmp_path, timeout=300)  # fmt: skip
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    assert "titanenv_hub_task: not available offline" in p.stderr
    assert "titanenv assets fetch --add task:titanenv_hub_task" in p.stderr
    assert "titanenv_next_sentence:" not in p.stderr  # the bundled task builds offline
    assert "loading" not in p.stderr and not (tmp_path / "out" / "results.csv").exists()


def run_folder(folder: Path, steps: list[int], incomplete: tuple[int, ...] = ()) -> Path:
    """A run folder as resolve_models sees it: a training record and marked checkpoints (no weights)."""
    folder.mkdir(parents=True)
    (folder / "trainer_config.json").write_text("{}")
    for s in [*steps, *incomplete]:
        step_dir = folder / "checkpoint" / f"step-{s}"
        step_dir.mkdir(parents=True)
        if s in steps:
            checkpoints.write_marker(step_dir, s)
    return folder


def hf_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_run_folders_resolve_to_their_complete_checkpoints(tmp_path):
    run = run_folder(tmp_path / "run", [10, 20, 30], incomplete=(40,))
    latest = matrix.resolve_models([run])
    assert [(r.label, r.step, r.titanenv, r.hf_dir) for r in latest] == [("run", 30, True, None)]
    assert [r.step for r in matrix.resolve_models([run], step=10)] == [10]
    assert [r.step for r in matrix.resolve_models([run], steps=[20, 10])] == [20, 10]
    assert [r.step for r in matrix.resolve_models([run], steps="all")] == [10, 20, 30]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 40; complete steps: 10, 20, 30"):
        matrix.resolve_models([run], steps=[10, 40])


def test_exported_and_hugging_face_folders_resolve_as_they_are(tmp_path):
    run = run_folder(tmp_path / "run", [5])
    export = hf_folder(run / "export" / "step-5")
    (export / "titanenv-export.json").write_text(json.dumps({"run_dir": str(run), "step": 5}))
    plain = hf_folder(tmp_path / "other" / "run")  # another folder of the same name
    refs = matrix.resolve_models([export, plain, run])
    assert [(r.label, r.step, r.titanenv, r.hf_dir) for r in refs] == [
        ("run", 5, True, export),
        ("run-2", None, False, plain),
        ("run", 5, True, None),  # the run itself: same model family as its export, same label
    ]
    assert matrix.default_out([refs[0], refs[2]]) == run.resolve() / "eval"  # one run: its eval/ folder
    assert matrix.default_out(refs) == Path("eval_results")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        matrix.resolve_models([tmp_path])


def test_task_lists_and_settings_are_parsed_and_checked(tmp_path):
    listing = tmp_path / "tasks.txt"
    listing.write_text("# mine\narc_easy\nhellaswag, arc_easy  # again\n\n")
    assert matrix.parse_tasks(f"@{listing}") == ["arc_easy", "hellaswag"]
    assert matrix.parse_tasks("a, b,,a") == ["a", "b"]
    assert matrix.parse_ints("0,5,0", "--num-fewshot") == [0, 5]
    assert matrix.parse_steps("all") == "all" and matrix.parse_steps("10,20") == [10, 20]
    with pytest.raises(ValueError, match="--steps"):
        matrix.parse_steps("ten")
    with pytest.raises(ValueError, match="exclude each other"):
        matrix.MatrixConfig(models=[tmp_path], step=1, steps=[2])
    with pytest.raises(ValueError, match="--dtype"):
        matrix.MatrixConfig(models=[tmp_path], dtype="int8")


def test_bundled_tasks_render_with_absolute_data_files_and_rebuild_identically(tmp_path, sample):
    rendered = bundled.render_tasks(tmp_path / "tasks")
    for name in bundled.BUNDLED_TASKS:
        cfg = json.loads((rendered / f"{name}.yaml").read_text().split("\n", 1)[1])
        for path in cfg["dataset_kwargs"]["data_files"].values():
            assert Path(path).is_absolute() and Path(path).is_file()
    built = bundled.build_data(sample / "wikitext2_valid_test_docs.jsonl", tmp_path / "data")
    for path in built:
        assert path.read_bytes() == (bundled.TASKS_DIR / path.name).read_bytes()


def test_a_run_folder_is_exported_on_the_fly_and_plotted_against_step(tiny_run, tmp_path):
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    trained = tiny_run("gpt2")
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export"))
    early = run / "checkpoint" / "step-1"  # a second checkpoint of a series: the same weights, marked step 1
    shutil.copytree(run / "checkpoint" / f"step-{trained.step}", early)
    (early / checkpoints.MARKER).unlink()
    checkpoints.write_marker(early, 1)
    out = tmp_path / "results"
    # rolling perplexity: fits the 32-token context of the tiny run (a 40-word choice would not)
    p = titanenv_eval("--model", run, "--steps", "all", "--tasks", "titanenv_wikitext2", "--limit", "2",
                      "--out", out, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["step"]) for r in rows} == {("run", "1"), ("run", str(trained.step))}
    for s in (1, trained.step):
        assert (run / "export" / f"step-{s}" / "config.json").is_file()  # cached_export's folder
        cell = json.loads((out / "lm_eval" / "run" / f"step-{s}" / "titanenv_wikitext2" / "0shot.json").read_text())
        assert cell["titanenv"]["add_bos_token"] is False
    by_step = {r["step"]: r["value"] for r in rows if r["metric"] == "word_perplexity"}
    assert by_step["1"] == by_step[str(trained.step)]  # same weights, same scores
    assert (out / "plot_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "add_bos_token=False" in (out / "results.md").read_text()

    exported = titanenv_eval("--model", run / "export" / "step-1", "--tasks", "titanenv_wikitext2",
                             "--limit", "2", "--out", out, cwd=tmp_path)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "1 cells (1 reused)" in exported.stdout  # the export is the same model: its cell is reused


def test_data_keeps_the_validation_loss_mode_with_model_naming_the_run(tiny_run, tmp_path, capsys):
    from titanenv.eval import cli

    trained = tiny_run("gpt2")
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export"))
    cli.evaluate(model=[run], data=trained.data, max_windows=2, batch_size=2)
    result = json.loads((run / "eval.json").read_text())
    assert result["step"] == trained.step and result["windows"] == 2
    assert f"step {trained.step}: val loss" in capsys.readouterr().out


def test_the_reuse_key_holds_the_task_yaml_and_its_includes(tmp_path):
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    base = tasks / "base.inc"  # not a .yaml: lm-eval indexes only the task file
    base.write_text("output_type: multiple_choice\ndoc_to_choice: ['a', 'b']\n")
    task = tasks / "mine.yaml"
    task.write_text("include: base.inc\ntask: titanenv_mine\ndataset_path: json\ndoc_to_text: '{{q}}'\n")
    manager = TaskManager(include_path=[str(tasks)], include_defaults=False)
    first = matrix._task_digest(manager, "titanenv_mine")
    assert first is not None and first == matrix._task_digest(manager, str(task))  # by name or by path
    base.write_text("output_type: multiple_choice\ndoc_to_choice: ['a', 'c']\n")
    second = matrix._task_digest(manager, "titanenv_mine")
    task.write_text(task.read_text().replace("{{q}}", "Q: {{q}}"))
    third = matrix._task_digest(manager, "titanenv_mine")
    assert len({first, second, third}) == 3  # an edited task or include is run again, not reused
    assert matrix._task_digest(manager, "not_a_task") is None
    hf = hf_folder(tmp_path / "hf")
    ref = matrix.ModelRef("hf", hf, None, None, hf, False)
    settings = matrix._settings(ref, hf, "titanenv_mine", 0, matrix.MatrixConfig(models=[hf]), manager)
    assert settings["task_yaml_sha256"] == third


def test_one_step_in_two_dtypes_gets_two_cell_folders_and_names(tmp_path):
    run = run_folder(tmp_path / "run", [5])
    exports = []
    for name, dtype in (("step-5", "float32"), ("step-5-bfloat16", "bfloat16")):
        export = hf_folder(run / "export" / name)
        (export / "titanenv-export.json").write_text(json.dumps({"run_dir": str(run), "step": 5, "dtype": dtype}))
        exports.append(export)
    f32, b16 = matrix.resolve_models(exports)
    assert (f32.label, b16.label) == ("run", "run")
    assert (f32.weights_dtype, b16.weights_dtype) == ("float32", "bfloat16")
    assert matrix._step_folder(f32, "float32") == "step-5"
    assert matrix._step_folder(b16, "float32") == "step-5-bfloat16-float32"
    assert (matrix._model_name(f32, "float32"), matrix._model_name(b16, "float32")) == ("run", "run (bfloat16-float32)")
    # the run folder evaluated with --dtype bfloat16 (exported in bfloat16) next to its float32 export
    from_run = matrix.ModelRef("run", run, 5, run, exports[1], True, "bfloat16")
    assert matrix._step_folder(from_run, "bfloat16") == "step-5-bfloat16"
    assert matrix._step_folder(f32, "bfloat16") == "step-5-float32-bfloat16"
    plain = matrix.ModelRef("hf", tmp_path, None, None, tmp_path, False)
    assert (matrix._step_folder(plain, "float32"), matrix._step_folder(plain, "float16")) == ("hf", "hf-float16")
    result = {"results": {"t": {"acc,none": 0.5}}, "n-shot": {"t": 0}}
    assert [r.model for r in matrix._rows(b16, 0, result, matrix._model_name(b16, "float32"))] == [
        "run (bfloat16-float32)"
    ]


def test_a_plot_this_run_does_not_draw_is_removed(tmp_path):
    from titanenv.eval import report

    def row(model: str, step: int | None, shots: int) -> report.Row:
        return report.Row(model, step, "t", shots, "acc", 0.5, 0.1)

    series = [row("m", 1, 0), row("m", 2, 0), row("m", 1, 3)]
    assert sorted(p.name for p in report.write_plots(series, tmp_path)) == ["plot_shots.png", "plot_steps.png"]
    (tmp_path / "mine.png").write_bytes(b"x")
    assert report.write_plots([row("m", 1, 0), row("m", 1, 3)], tmp_path) == [tmp_path / "plot_shots.png"]
    assert not (tmp_path / "plot_steps.png").exists() and (tmp_path / "mine.png").exists()
    assert report.write_plots([row("m", None, 0)], tmp_path) == []
    assert not (tmp_path / "plot_shots.png").exists()


def test_options_of_the_other_mode_are_rejected_and_missing_files_named_neutrally(tmp_path, monkeypatch):
    import typer

    from titanenv.eval import cli

    for option, value in (("prompt", "Hi"), ("tokenizer", tmp_path), ("max_windows", 2)):
        with pytest.raises(typer.BadParameter, match=f"--{option.replace('_', '-')} does not apply") as e:
            cli.evaluate(model=[tmp_path], **{option: value})
        assert e.value.param_hint == f"--{option.replace('_', '-')}"
    ignored = [("tasks", "arc_easy"), ("dtype", "bfloat16"), ("steps", "all"), ("out", tmp_path),
               ("include_path", [tmp_path]), ("limit", 2.0), ("device", "cuda"), ("num_fewshot", "5")]  # fmt: skip
    for option, value in ignored:
        with pytest.raises(typer.BadParameter, match=f"--{option.replace('_', '-')} does not apply to --data"):
            cli.evaluate(model=[tmp_path], data=tmp_path / "val", **{option: value})

    def fails(error: Exception):
        def run_matrix(*args: object, **kwargs: object) -> None:
            raise error

        return run_matrix

    monkeypatch.setattr(matrix, "run_matrix", fails(matrix.ModelNotFound("no model here")))
    with pytest.raises(typer.BadParameter, match="no model here") as e:
        cli.evaluate(model=[tmp_path], tasks="titanenv_wikitext2", include_path=[])
    assert e.value.param_hint == "--model"
    monkeypatch.setattr(matrix, "run_matrix", fails(FileNotFoundError("no include folder")))
    with pytest.raises(typer.BadParameter, match="no include folder") as e:
        cli.evaluate(model=[tmp_path])
    assert e.value.param_hint is None
