"""Training stage, for real: TorchTitan 0.3.0 on CPU (gloo) over Megatron data made from real text.

Data: sample_data's C4 text tokenized by `titanenv preprocess` with TorchTitan's test
tokenizer (vocabulary 2,020 -> model vocabulary 2,048). Runs go through
``titanenv.train.cli.train`` (which starts torchrun) and read TorchTitan's own log
lines and TensorBoard files. About a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runs import output_to
from titanenv.data import preprocess as pp
from titanenv.eval import cli as eval_cli
from titanenv.train import checkpoints, cli, control, peak, runner
from titanenv.train.dataloader import MegatronDataloader, TokenWindowDataset, document_positions

SEQ = 128
BATCH = 8
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)")


@pytest.fixture(scope="module")
def tokenizer_dir(sample: Path) -> Path:
    path = sample / "torchtitan_test_tokenizer"
    assert (path / "tokenizer.json").is_file(), f"{path}/tokenizer.json missing from sample_data"
    return path


@pytest.fixture(scope="module")
def data(sample: Path, tokenizer_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Train and validation prefixes built by the real preprocessing stage."""
    root = tmp_path_factory.mktemp("data")
    splits = {"train": sorted(sample.glob("c4-sample.*.json.gz")), "val": [sample / "c4-guardian-val.jsonl.gz"]}
    for split, inputs in splits.items():
        pp.run(
            pp.PreprocessConfig(
                inputs=inputs, output_prefix=root / split, tokenizer_model=str(tokenizer_dir), append_eod=True
            )
        )
    return {split: root / split for split in splits}


def run_train(out: Path, data: dict[str, Path], tokenizer_dir: Path, steps: int, **kw) -> str:
    """``titanenv train`` with the test's small shapes; returns TorchTitan's log without colours."""
    log_file = out.parent / f"{out.name}-{steps}.log"
    with output_to(log_file):
        cli.train(
            data=data["train"],
            tokenizer=tokenizer_dir,
            output_dir=out,
            steps=steps,
            seq_len=SEQ,
            batch_size=kw.get("batch_size", BATCH),
            checkpoint_interval=kw.get("checkpoint_interval", 8),
            nproc_per_node=kw.get("nproc_per_node"),
            # Fixed seed and LR schedule, so a resumed run can be compared with a straight one.
            extra=["--debug.seed", "0", "--lr-scheduler.total-steps", "24"],
        )
    return ANSI.sub("", log_file.read_text())


def losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in STEP_LOSS.findall(log)}


# ---------------------------------------------------------------- dataloader (no torchrun)


def test_windows_are_shifted_int64_and_cover_the_stream(data):
    ds = TokenWindowDataset(data["train"], SEQ, shuffle=False)
    tokens = np.asarray(ds._tokens, dtype=np.int64)
    sample, labels = ds.window(3)
    assert sample["input"].dtype == labels.dtype == torch.int64
    assert sample["input"].shape == labels.shape == (SEQ,)
    assert sample["input"].tolist() == tokens[3 * SEQ : 4 * SEQ].tolist()
    assert labels.tolist() == tokens[3 * SEQ + 1 : 4 * SEQ + 1].tolist()
    assert ds.windows_per_rank == (tokens.size - 1) // SEQ


def test_ranks_get_disjoint_equal_shares_and_epochs_loop(data):
    per_rank = [TokenWindowDataset(data["train"], SEQ, r, 2, seed=7) for r in range(2)]
    n = per_rank[0].windows_per_rank
    orders = [list(ds._order(0)) for ds in per_rank]
    assert len(orders[0]) == len(orders[1]) == n
    assert not set(orders[0]) & set(orders[1])
    it = iter(per_rank[0])
    first_epoch = [next(it)[1] for _ in range(n)]
    assert per_rank[0]._epoch == 0
    next(it)  # rolls over into epoch 1 with a new order
    assert per_rank[0]._epoch == 1
    assert len(first_epoch) == n


def test_positions_restart_after_each_eod():
    eod = 9
    assert document_positions(np.array([5, 6, eod, 7, 8, eod, eod, 1]), eod).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]


def test_loader_resumes_with_the_next_batch(data):
    def loader():
        cfg = MegatronDataloader.Config(path=str(data["train"]), document_positions=False)
        return cfg.build(dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=SEQ, local_batch_size=4)

    a = loader()
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = next(it)
    b = loader()
    b.load_state_dict(state)
    got = next(iter(b))
    assert torch.equal(got[0]["input"], expected[0]["input"]) and torch.equal(got[1], expected[1])


def test_loader_workers_split_the_same_samples_and_resume(data):
    def loader(workers):
        cfg = MegatronDataloader.Config(path=str(data["train"]), document_positions=False, num_workers=workers)
        return cfg.build(dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=SEQ, local_batch_size=4)

    def rows(batches):
        return {tuple(r.tolist()) for _, labels in batches for r in labels}

    single, double = loader(0), loader(2)
    assert rows(b for _, b in zip(range(6), single, strict=False)) == rows(
        b for _, b in zip(range(6), double, strict=False)
    )
    it = iter(double)
    for _ in range(3):
        next(it)
    state, expected = double.state_dict(), next(it)
    again = loader(2)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))[1], expected[1])


def test_document_positions_use_the_eod_recorded_by_preprocess(data, tokenizer_dir):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    eod = json.loads(Path(f"{data['train']}.manifest.json").read_text())["tokenizer"]["eod_id"]
    tok = HuggingFaceTokenizer(tokenizer_path=str(tokenizer_dir))
    cfg = MegatronDataloader.Config(path=str(data["train"]), shuffle=False)
    inputs, _ = next(iter(cfg.build(dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=SEQ, local_batch_size=64)))
    ids, pos = inputs["input"], inputs["positions"]
    assert (pos[:, 0] == 0).all()
    after_eod = torch.zeros_like(ids, dtype=torch.bool)
    after_eod[:, 1:] = ids[:, :-1] == eod
    assert after_eod.any() and (pos[after_eod] == 0).all()
    assert (pos[:, 1:][~after_eod[:, 1:]] == pos[:, :-1][~after_eod[:, 1:]] + 1).all()


def test_data_made_with_another_tokenizer_is_refused(data, sample, tmp_path):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from titanenv.data.manifest import TokenizerMismatch

    gpt2 = cli.stage_tokenizer(sample / "gpt2_tokenizer.json", tmp_path)
    cfg = MegatronDataloader.Config(path=str(data["train"]))
    with pytest.raises(TokenizerMismatch, match="tokenized with"):
        cfg.build(
            dp_world_size=1,
            dp_rank=0,
            tokenizer=HuggingFaceTokenizer(tokenizer_path=str(gpt2)),
            seq_len=SEQ,
            local_batch_size=4,
        )


def test_recipes_vocabulary_and_cpu_settings(tokenizer_dir, sample):
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    from titanenv.train import recipes

    assert recipes.padded_vocab_size(50257) == 50304 and recipes.padded_vocab_size(2020) == 2048
    assert recipes.tokenizer_vocab_size(tokenizer_dir) == 2020
    cfg = recipes.titanenv_debug()
    model = cfg.model_spec.model
    assert not list(model.traverse(FlexAttention.Config)) and list(model.traverse(ScaledDotProductAttention.Config))
    assert cfg.dataloader.document_positions is False and cfg.checkpoint.enable and cfg.metrics.enable_tensorboard
    big = recipes.titanenv_1b()
    recipes.set_vocab_size(big, recipes.padded_vocab_size(50257))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in big.model_spec.model.build().parameters())
    assert 1.0e9 < n_params < 1.2e9, n_params  # tied embeddings counted once


def test_missing_data_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin.*titanenv preprocess"):
        TokenWindowDataset(tmp_path / "nothing", SEQ)


# ---------------------------------------------------------------- real training runs


@pytest.fixture(scope="module")
def trained(data, tokenizer_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "run"
    return out, run_train(out, data, tokenizer_dir, 16)


@pytest.fixture(scope="module")
def resumed(trained, data, tokenizer_dir) -> tuple[Path, str]:
    out, _ = trained
    # A newer checkpoint whose save never finished: DCP's files are there, the completion marker is not.
    truncated = out / "checkpoint" / "step-20"
    shutil.copytree(out / "checkpoint" / "step-16", truncated)
    (truncated / checkpoints.MARKER).unlink()
    return out, run_train(out, data, tokenizer_dir, 24)


def test_train_loss_falls_and_writes_checkpoints_and_tensorboard(trained):
    out, log = trained
    assert "Training starts at step 1" in log, log[-3000:]
    steps = losses(log)
    assert sorted(steps) == list(range(1, 17)), log[-3000:]
    assert steps[16] < steps[1] - 1.0, steps  # ~7.6 (ln 2048) falls to ~4 on real text
    assert re.search(r"tps: [\d,]+", log)  # TorchTitan prints tokens/s per step
    for step in (8, 16):
        assert (out / "checkpoint" / f"step-{step}" / ".metadata").is_file()
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tb = [e.value for e in acc.Scalars("loss_metrics/global_avg_loss")]
    assert len(tb) >= 16 and tb[-1] < tb[0]
    record = json.loads((out / "trainer_config.json").read_text())
    assert record["recipe"] == "titanenv_debug" and record["vocab_size"] == 2048


def test_rerun_resumes_from_the_checkpoint_exactly(resumed, data, tokenizer_dir, tmp_path):
    out, log = resumed
    assert f"resume: skipping {out}/checkpoint/step-20: no completion marker {checkpoints.MARKER}" in log, log[-3000:]
    assert "resume: step-16 is complete" in log
    assert f"Loading the checkpoint from {out}/checkpoint/step-16" in log, log[-3000:]
    assert not (out / "checkpoint" / "step-20").exists()  # purged once a newer checkpoint was complete
    assert "Training starts at step 17" in log
    again = losses(log)
    assert min(again) == 17 and max(again) == 24
    # The same 24 steps in one go: model, optimizer, LR and data position were all restored.
    straight = losses(run_train(tmp_path / "straight", data, tokenizer_dir, 24, checkpoint_interval=100))
    for step in range(17, 25):
        assert again[step] == pytest.approx(straight[step], abs=2e-4), (step, again, straight)


def test_two_process_fsdp_over_gloo(data, tokenizer_dir, tmp_path):
    out = tmp_path / "fsdp"
    log = run_train(out, data, tokenizer_dir, 3, nproc_per_node=2, batch_size=4)
    assert "dp_shard=2" in log, log[-3000:]
    assert sorted(losses(log)) == [1, 2, 3]
    shards = sorted(p.name for p in (out / "checkpoint" / "step-3").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote their shard


def test_evaluate_scores_the_latest_checkpoint(resumed, data, tokenizer_dir, capsys):
    out, _ = resumed
    eval_cli.evaluate(
        output_dir=out, data=data["val"], tokenizer=tokenizer_dir, max_windows=32, prompt="The", max_new_tokens=8
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 24 and result["windows"] == 32 and result["tokens"] == 32 * SEQ
    assert math.isfinite(result["loss"])
    assert result["loss"] < math.log(2020) - 1.0, result  # far below a uniform guess over the vocabulary
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert f"val loss {result['loss']:.4f}" in printed


# ---------------------------------------------------------------- completion markers, stop, watchdog, MFU peak


def make_checkpoint(folder: Path, step: int, *, marked: bool = True) -> Path:
    path = folder / f"step-{step}"
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 100)
    (path / ".metadata").write_bytes(b"m")
    if marked:
        checkpoints.write_marker(path, step, job="7")
    return path


def test_only_marked_and_intact_checkpoints_count(tmp_path):
    folder = tmp_path / "checkpoint"
    make_checkpoint(folder, 10)
    make_checkpoint(folder, 20)
    make_checkpoint(folder, 30, marked=False)  # killed during its save
    shard = make_checkpoint(folder, 40) / "__0_0.distcp"
    shard.write_bytes(b"x" * 10)  # truncated after it was marked (quota, partial copy)
    decision = checkpoints.choose_resume(folder)
    assert decision.step == 20 and decision.path == folder / "step-20"
    assert decision.lines == [
        f"resume: skipping {folder}/step-40: __0_0.distcp has 10 bytes, the marker says 100 (truncated)",
        f"resume: skipping {folder}/step-30: no completion marker {checkpoints.MARKER} (its save did not finish)",
        "resume: step-20 is complete (1 older complete checkpoint(s) kept) -> resuming from step 20",
    ]
    assert checkpoints.complete_steps(folder) == [20, 10]
    assert checkpoints.read_marker(folder / "step-10")["files"] == {".metadata": 1, "__0_0.distcp": 100}


def test_no_complete_checkpoint_is_a_fresh_start(tmp_path):
    make_checkpoint(tmp_path / "checkpoint", 5, marked=False)
    decision = checkpoints.choose_resume(tmp_path / "checkpoint")
    assert decision.step == -1 and decision.lines[-1].endswith("-> fresh start at step 1")
    assert checkpoints.choose_resume(tmp_path / "nothing").step == -1


def test_stop_request_by_file_or_signal(tmp_path):
    import signal

    stop = tmp_path / "stop.0"
    request = control.StopRequest(stop)
    try:
        assert not request.local() and not control.agree(False)
        stop.touch()
        assert request.local() and control.agree(True)
        again = control.StopRequest(None)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert again.local()
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_exit_code_says_requeue_only_for_a_stopped_run():
    assert runner.exit_code(0, {"state": "stopped", "step": 5}) == runner.STOPPED == 75
    assert runner.exit_code(0, {"state": "completed"}) == 0 and runner.exit_code(0, None) == 0
    assert runner.exit_code(1, {"state": "stopped"}) == 1  # a crash is never requeued as a stop


def test_hang_watchdog_dumps_every_thread_when_a_step_stalls():
    script = (
        "import time\n"
        "from titanenv.train.control import HangWatchdog\n"
        "def stuck_in_a_collective():\n"
        "    time.sleep(2.5)\n"
        "w = HangWatchdog(1.0, 1.0)\n"
        "w.arm()\n"
        "stuck_in_a_collective()\n"
        "w.disarm()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Timeout (0:00:01)!" in proc.stderr and "stuck_in_a_collective" in proc.stderr


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA H100 80GB HBM3", 989),
     ("NVIDIA GH200 480GB", 989), ("NVIDIA GH200 120GB", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989)],
)  # fmt: skip
def test_mfu_peak_of_the_sites_gpus(name, tflops):
    assert peak.peak_flops(name) == tflops * 1e12
    assert peak.peak_flops("cpu") is None


def test_usr1_to_the_launch_checkpoints_at_the_next_step_and_exits_75(data, tokenizer_dir, tmp_path):
    """SIGUSR1 to titanenv train's process group (like `scancel --signal=USR1` on a job step): torchrun's agent,
    which would die of USR1, ignores it; titanenv train creates the stop file; all ranks stop together."""
    import signal

    out = tmp_path / "stopped"
    cmd = [
        sys.executable,
        "-m",
        "titanenv.cli",
        "train",
        "--data",
        str(data["train"]),
        "--tokenizer",
        str(tokenizer_dir),
        "--output-dir",
        str(out),
        "--steps",
        "200",
        "--seq-len",
        "64",
        "--batch-size",
        "2",
        "--nproc-per-node",
        "2",
        "--checkpoint-interval",
        "100",
        "--no-preflight",
    ]
    log_file = tmp_path / "stopped.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not losses(ANSI.sub("", log_file.read_text())).get(3) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    text = ANSI.sub("", log_file.read_text())
    assert rc == runner.STOPPED, text[-3000:]
    step = int(re.search(r"stop requested: checkpointing step (\d+) and stopping", text).group(1))
    assert 3 <= step < 200 and max(losses(text)) == step
    assert checkpoints.complete_steps(out / "checkpoint") == [step]
    (status,) = (out / "provenance").glob("*/status.json")
    assert json.loads(status.read_text())["state"] == "stopped"
