"""The workflow's comparison report (titanenv.workflow.report) on fake run folders with real event files.

Each fake run holds what the other stages write: TensorBoard scalars under the tags TorchTitan's
MetricsProcessor and the Infini gate logging use (written with torch's SummaryWriter, as
TorchTitan does), trainer_config.json, provenance, passkey.json and loss_by_position.json.
"""

from __future__ import annotations

import json
import re
import shlex
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from titanenv.workflow import report

STEPS, BATCH, SEQ = 30, 2, 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _loss(step: int, offset: float) -> float:
    return 8.0 - 0.1 * step + offset


def _write_tb(folder: Path, scalars: Mapping[str, Mapping[int, float]]) -> None:
    writer = SummaryWriter(str(folder), max_queue=1000)
    steps = sorted({s for series in scalars.values() for s in series})
    for step in steps:
        for tag, series in scalars.items():
            if step in series:
                writer.add_scalar(tag, series[step], step)
    writer.close()


def _config(**parallelism: int) -> dict[str, object]:
    return {
        "recipe": "titanenv_debug",
        "training": {"local_batch_size": BATCH, "global_batch_size": -1, "seq_len": SEQ},
        "parallelism": {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1, **parallelism},
        "metrics": {"save_tb_folder": "tb"},
    }


def make_run(
    root: Path,
    *,
    offset: float = 0.0,
    gates: bool = False,
    passkey: list[list[float]] | None = None,
    positions: list[float] | None = None,
    eval_loss: float | None = None,
    world: tuple[int, int] | None = (1, 1),
    config: dict[str, object] | None = None,
    tps: float = 1000.0,
) -> Path:
    """A run folder trained for STEPS steps, logged every step; gates: 2 layers x 4 heads."""
    scalars: dict[str, dict[int, float]] = {
        report.LOSS_TAG: {s: _loss(s, offset) for s in range(1, STEPS + 1)},
        report.TPS_TAG: {s: (5.0 if s == 1 else tps + s) for s in range(1, STEPS + 1)},
        report.TOKENS_TAG: {s: float(s * BATCH * SEQ) for s in range(1, STEPS + 1)},
    }
    if gates:
        for layer in range(2):
            heads = [0.1 * (layer * 4 + h + 1) for h in range(4)]  # final: 0.1 .. 0.8
            for h, final in enumerate(heads):
                scalars[f"infini/gate/layers.{layer}/head{h}"] = {s: final * s / STEPS for s in range(1, STEPS + 1)}
            scalars[f"infini/gate_mean/layers.{layer}"] = {s: sum(heads) / 4 * s / STEPS for s in range(1, STEPS + 1)}
    _write_tb(root / "tb" / "20260101-1200", scalars)
    (root / "trainer_config.json").write_text(json.dumps(config or _config()))
    if world is not None:
        attempt = root / "provenance" / "local-20260101-120000-1"
        attempt.mkdir(parents=True)
        launch = {"nnodes": world[0], "nproc_per_node": world[1], "device": "cpu"}
        (attempt / "provenance.json").write_text(json.dumps({"start": "2026-01-01T12:00:00+0000", "launch": launch}))
    if passkey is not None:
        folder = root / "eval" / "passkey"
        folder.mkdir(parents=True)
        record = {"model": str(root), "step": STEPS, "lengths": [64, 128, 256], "depths": [0, 50, 100],
                  "trials": 5, "seed": 0, "accuracy": passkey}  # fmt: skip
        (folder / "passkey.json").write_text(json.dumps(record))
    if positions is not None:
        (root / "eval").mkdir(exist_ok=True)
        buckets = [[i * 16, (i + 1) * 16] for i in range(len(positions))]
        record = {"seq_len": SEQ, "buckets": buckets, "loss": positions, "windows": 8}
        (root / "loss_by_position.json").write_text(json.dumps(record))
    if eval_loss is not None:
        (root / "eval.json").write_text(json.dumps({"loss": eval_loss, "step": STEPS}))
    return root


PASSKEY_BASE = [[1.0, 0.4, 0.0], [1.0, 0.2, 0.0], [0.8, 0.2, 0.0]]  # mean 3.6 / 9 = 0.4
PASSKEY_INFINI = [[1.0, 1.0, 0.8], [1.0, 0.8, 0.6], [1.0, 1.0, 0.8]]  # mean 8.0 / 9 = 0.889


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "baseline": make_run(root / "base", offset=0.5, passkey=PASSKEY_BASE, positions=[6.0, 5.0, 4.5, 4.5]),
        "infini": make_run(root / "inf", gates=True, passkey=PASSKEY_INFINI, positions=[5.0, 4.0, 4.0, 3.0],
                           eval_loss=4.25, tps=900.0),
    }  # fmt: skip


@pytest.fixture(scope="module")
def written(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> report.ReportFiles:
    return report.write_report(pair, tmp_path_factory.mktemp("out") / "report", title="Test report")


def _section(md: str, heading: str) -> str:
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _table(md: str, model: str) -> dict[str, str]:
    block = md.split(f"### {model}\n", 1)[1].split("\n\n#", 1)[0]
    rows = [line.strip("|").split(" | ") for line in block.splitlines() if line.startswith("| ")]
    return {k.strip(): v.strip() for k, v in rows[1:]}


def test_summary_tables(written: report.ReportFiles) -> None:
    md = written.markdown.read_text()
    base, inf = _table(md, "baseline"), _table(md, "infini")
    assert base[f"final training loss (step {STEPS})"] == f"{_loss(STEPS, 0.5):.4f}" == "5.5000"
    assert inf[f"final training loss (step {STEPS})"] == "5.0000"
    tokens = STEPS * BATCH * SEQ
    assert base["tokens seen"] == f"{tokens:,} ({BATCH * SEQ:,} per step)" == "3,840 (128 per step)"
    assert inf["final validation loss"] == f"4.2500 (`eval.json`, step {STEPS})"
    assert base["final validation loss"].startswith("5.0000 (mean of the position buckets")  # (6+5+4.5+4.5)/4
    # median of steps 2..30 (step 1 is warm-up): tps + 16
    assert base["median throughput (tokens/s per device)"] == "1,016"
    assert inf["median throughput (tokens/s per device)"] == "916"
    assert base["passkey mean accuracy"] == "0.400 (9 cells, 5 trials each)"
    assert inf["passkey mean accuracy"] == "0.889 (9 cells, 5 trials each)"
    assert inf["final gate sigmoid(β), mean over heads"] == "0.450 (8 heads)"
    assert "final gate sigmoid(β), mean over heads" not in base
    assert base["recipe"] == "`titanenv_debug`"


def test_gate_table_and_run_folders(written: report.ReportFiles, pair: dict[str, Path]) -> None:
    md = written.markdown.read_text()
    gates = _section(md, "Infini gates")
    assert "| layers.0 | 4 | 0.250 | 0.100 | 0.400 |" in gates
    assert "| layers.1 | 4 | 0.650 | 0.500 | 0.800 |" in gates
    assert "not available for baseline" in gates
    assert md.startswith("# Test report\n")
    for name, run in pair.items():
        assert f"| {name} | `{run.resolve()}` |" in md


def test_logdir_spec_line(written: report.ReportFiles, pair: dict[str, Path]) -> None:
    lines = written.markdown.read_text().splitlines()
    line = next(x for x in lines if x.startswith("tensorboard "))
    argv = shlex.split(line)
    spec = f"baseline:{pair['baseline'].resolve() / 'tb'},infini:{pair['infini'].resolve() / 'tb'}"
    assert argv == ["tensorboard", f"--logdir_spec={spec}"]


def test_logdir_spec_quotes_spaces(tmp_path: Path) -> None:
    run = make_run(tmp_path / "with space")
    files = report.write_report({"base": run}, tmp_path / "out")
    line = next(x for x in files.markdown.read_text().splitlines() if x.startswith("tensorboard "))
    assert shlex.split(line) == ["tensorboard", f"--logdir_spec=base:{run.resolve() / 'tb'}"]
    assert "'" in line


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_pngs(written: report.ReportFiles) -> None:
    out = written.markdown.parent
    assert written.figure == out / "report.png"
    paths = [written.figure, written.loss, written.gates, written.passkey, written.loss_by_position]
    assert all(p is not None and p.parent == out for p in paths)
    for path in paths:
        assert path is not None
        width, height = _png_size(path)
        assert width >= 400 and height >= 250, (path, width, height)
        assert path.stat().st_size > 20_000, path  # drawn: a "not available" panel is ~8 kB
    assert _png_size(written.figure)[0] >= 1200
    md = written.markdown.read_text()
    for name in ("report.png", "loss.png", "gates.png", "passkey.png", "loss_by_position.png"):
        assert f"]({name})" in md  # relative links


def test_missing_passkey_and_gates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "passkey.png").write_bytes(b"stale")
    runs = {"a": make_run(tmp_path / "a"), "b": make_run(tmp_path / "b", offset=1.0)}
    files = report.write_report(runs, out)
    md = files.markdown.read_text()
    assert _table(md, "a")["passkey mean accuracy"] == "not available"
    assert _section(md, "Passkey retrieval").strip().startswith("not available: no run has")
    assert _section(md, "Infini gates").strip().startswith("not available: no run has")
    assert _section(md, "Validation loss by position").strip().startswith("not available")
    assert _table(md, "a")["final validation loss"] == "not available"
    assert files.passkey is None and files.gates is None and files.loss_by_position is None
    assert not (out / "passkey.png").exists()  # the stale panel is gone
    assert "](passkey.png)" not in md
    assert _png_size(files.figure)[0] > 0 and files.loss.is_file()


def test_missing_loss_names_folder(tmp_path: Path, pair: dict[str, Path]) -> None:
    empty = tmp_path / "no-tb"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty.resolve()))):
        report.write_report({"baseline": pair["baseline"], "infini": empty}, tmp_path / "out")
    other = tmp_path / "other-tags"
    _write_tb(other / "tb" / "20260101-1200", {report.TPS_TAG: {1: 1.0, 2: 2.0}})
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(other.resolve()))}.*loss_metrics/global_avg_loss"):
        report.write_report({"x": other}, tmp_path / "out")
    assert not (tmp_path / "out" / "report.md").exists()


def test_deterministic(pair: dict[str, Path], tmp_path: Path, written: report.ReportFiles) -> None:
    again = report.write_report(pair, tmp_path / "again", title="Test report")
    assert again.markdown.read_bytes() == written.markdown.read_bytes()
    third = report.write_report(pair, tmp_path / "again", title="Test report")  # over an existing report
    assert third.markdown.read_bytes() == written.markdown.read_bytes()


def test_resume_merges_tb_folders(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    # A second start resumed from step 20 (the first one crashed at 30): its points replace 20..30.
    _write_tb(run / "tb" / "20260102-0800", {report.LOSS_TAG: {s: 1.0 for s in range(20, 26)}})
    loss = report.read_scalars(run / "tb")[report.LOSS_TAG]
    assert sorted(loss) == list(range(1, 26))
    assert loss[19] == pytest.approx(_loss(19, 0.0)) and loss[20] == loss[25] == 1.0
    files = report.write_report({"run": run}, tmp_path / "out")
    table = _table(files.markdown.read_text(), "run")
    assert table["final training loss (step 25)"] == "1.0000"
    assert table["tokens seen"].startswith(f"{25 * BATCH * SEQ:,} ")


def test_data_parallel_ranks(tmp_path: Path) -> None:
    # 2 nodes x 4 processes, tensor parallel 2: 4 data-parallel ranks
    run = make_run(tmp_path / "dp", world=(2, 4), config=_config(tensor_parallel_degree=2))
    model = report.load_model("dp", run)
    assert model.tokens_per_step == BATCH * SEQ * 4
    assert any("n_tokens_seen" in n for n in model.notes)  # the fake run logged 1 rank's count
    explicit = make_run(tmp_path / "shard", world=None, config=_config(data_parallel_shard_degree=3))
    assert report.load_model("s", explicit).tokens_per_step == BATCH * SEQ * 3
    unknown = make_run(tmp_path / "unknown", world=None)
    model = report.load_model("u", unknown)
    assert model.tokens_per_step == BATCH * SEQ and not any("n_tokens_seen" in n for n in model.notes)
    files = report.write_report({"u": unknown}, tmp_path / "out")
    assert "u: world size not recorded" in _section(files.markdown.read_text(), "Notes")


def test_bad_inputs(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", passkey=[[1.0, 0.5]])  # 3 depths x 3 lengths expected
    with pytest.raises(ValueError, match="passkey.json"):
        report.load_model("run", run)
    with pytest.raises(ValueError, match="model name"):
        report.write_report({"a:b": run}, tmp_path / "out")


def test_cli(pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--run", f"baseline={pair['baseline']}", "--run", f"infini={pair['infini']}", "--out", str(out)]
    assert report.main([*argv, "--title", "Test report"]) == 0
    assert (out / "report.md").read_text().startswith("# Test report\n")
    assert str(out / "report.md") in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        report.main(["--run", f"x={tmp_path / 'missing'}", "--out", str(out)])
    assert exit_.value.code == 2
    assert "missing" in capsys.readouterr().err
