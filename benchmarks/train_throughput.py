"""Training throughput: ``titanenv train`` against stock TorchTitan's own launch, same ~1B config, side by side.

    .venv/bin/python benchmarks/train_throughput.py [--work /tmp/titanenv-train-bench] [--steps 60]
        [--rounds 2] [--nproc-per-node N] [--recipe titanenv_1b] [--data PREFIX] [--table OUT.md]
        [--timeout SECONDS] [--json OUT.json]

Both sides train the same model with the same settings on the same tokenized data:

- ``titanenv``: ``titanenv train --recipe titanenv_1b`` (preflight, provenance, per-step stop check
  and hang watchdog, the trainer subclass, interconnect settings from the machine profile);
- ``stock``: ``torchrun --standalone -m torchtitan.train --module train_throughput --config stock``,
  where :func:`stock` is the *same* recipe turned into TorchTitan's plain ``Trainer.Config``
  (TorchTitan's own ``Trainer`` and ``CheckpointManager``; nothing of titanenv runs in the loop
  except the Megatron dataloader, which is the data source of both).

Data: ``sample_data``'s real text (wikitext-2 and C4 samples) tokenized with GPT-2's tokenizer
(vocabulary 50,257, padded to 50,304 as in Llama-3.2-1B-style configs), looping over epochs.
Checkpointing is off on both sides (it measures the filesystem, not the launcher).

Figures per run, from TorchTitan's own TensorBoard scalars, averaged over the steps after
``--warmup`` (compilation): tokens/s per device (``throughput(tps)``), MFU (``mfu(%)``, against
the device's dense bf16 peak: TorchTitan's ``get_peak_flops`` and titanenv's ``train.peak`` both
give 989 TFLOP/s for an H200), step time (``time_metrics/end_to_end(s)``), dataloader time per
step (``time_metrics/data_loading(s)`` and its share of the step) and peak memory (the largest
``memory/max_reserved(GiB)`` and ``memory/max_active(GiB)`` of the run; on CPU TorchTitan's
figure there is titanenv's peak-RSS stand-in). Rounds alternate stock/titanenv to spread drift.
Prints a Markdown table and the ratio titanenv/stock (target >= 0.99), data-loading share
(target < 1%) and MFU (target >= 40% with bf16 and torch.compile); ``--table``/``--json`` also
write them. A launch that fails or outlives ``--timeout`` is a table row with its status, and the
others still run (``benchmarks/gpu_check.sh`` depends on that).

Needs a CUDA GPU for the 1B recipe; ``--recipe titanenv_debug --nproc-per-node 2`` runs the same
comparison on CPU as a smoke test of this script (its MFU means nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.trainer import Trainer

from titanenv.data import preprocess as pp
from titanenv.train import recipes, vocab
from titanenv.train.cli import stage_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def stock():
    """The recipe named by ``$BENCH_RECIPE`` as TorchTitan's plain ``Trainer.Config`` (stock trainer, checkpointer)."""
    ours = recipes.load_recipe(os.environ.get("BENCH_RECIPE", "titanenv_1b"))
    vocab.set_vocab_size(ours, vocab.padded_vocab_size(vocab.tokenizer_vocab_size(os.environ["BENCH_TOKENIZER"])))
    fields = {f.name: getattr(ours, f.name) for f in dataclasses.fields(Trainer.Config) if f.init}
    ckpt = ours.checkpoint
    fields["checkpoint"] = CheckpointManager.Config(
        **{f.name: getattr(ckpt, f.name) for f in dataclasses.fields(CheckpointManager.Config) if f.init}
    )
    return Trainer.Config(**fields)


def prepare_data(work: Path) -> Path:
    prefix = work / "data" / "train"
    if not Path(f"{prefix}.manifest.json").is_file():
        sample = ROOT / "sample_data"
        inputs = [sample / "wikitext2_valid_test_docs.jsonl", *sorted(sample.glob("c4-sample.*.json.gz"))]
        pp.run(
            pp.PreprocessConfig(
                inputs=inputs,
                output_prefix=prefix,
                tokenizer_model=str(sample / "gpt2_tokenizer.json"),
                append_eod=True,
            )
        )
    return prefix


def common_flags(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [
        "--dataloader.path", str(data), "--dump-folder", str(out), "--training.steps", str(args.steps),
        "--checkpoint.no-enable", "--metrics.log-freq", "1", "--debug.seed", "0",
    ]  # fmt: skip


def run_titanenv(args: argparse.Namespace, data: Path, out: Path) -> tuple[float, str]:
    cmd = [
        str(Path(sys.executable).with_name("titanenv")), "train", "--data", str(data),
        "--tokenizer", str(ROOT / "sample_data" / "gpt2_tokenizer.json"), "--output-dir", str(out),
        "--recipe", args.recipe, "--steps", str(args.steps), "--nproc-per-node", str(args.nproc_per_node),
        "--", "--checkpoint.no-enable", "--metrics.log-freq", "1", "--debug.seed", "0",
    ]  # fmt: skip
    return _timed(cmd, out, os.environ, args.timeout)


def _torchrun() -> list[str]:
    beside = Path(sys.executable).with_name("torchrun")  # the venv's, so the workers use this Python
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run_stock(args: argparse.Namespace, data: Path, out: Path) -> tuple[float, str]:
    tokenizer_dir = stage_tokenizer(ROOT / "sample_data" / "gpt2_tokenizer.json", out)
    cmd = [
        *_torchrun(), "--standalone", "--nproc-per-node", str(args.nproc_per_node), "--tee", "3",
        "--local-ranks-filter", "0", "-m", "torchtitan.train", "--module", "train_throughput", "--config", "stock",
        "--hf-assets-path", str(tokenizer_dir), *common_flags(args, data, out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "BENCH_RECIPE": args.recipe,
        "BENCH_TOKENIZER": str(tokenizer_dir),
    }
    return _timed(cmd, out, env, args.timeout)


def _timed(cmd: list[str], out: Path, env, timeout: float | None = None) -> tuple[float, str]:
    """Run ``cmd`` (its own process group, killed whole at ``timeout``); (wall seconds, "ok" or what went wrong)."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc}; {log_path.name})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timed out after {timeout:.0f} s ({log_path.name})"
    if status != "ok":
        status += _first_error(log_path)
        print(f"{cmd[0]}: {status}; see {log_path}", file=sys.stderr)
    return time.monotonic() - start, status


MEAN_TAGS = ("throughput(tps)", "mfu(%)", "time_metrics/data_loading(s)", "time_metrics/data_loading(%)",
             "time_metrics/end_to_end(s)")  # fmt: skip
MAX_TAGS = ("memory/max_reserved(GiB)", "memory/max_active(GiB)")


def _first_error(log: Path) -> str:
    """': ErrorName: message' of the first exception line in ``log`` (rank prefixes stripped), or ''."""
    pat = re.compile(r"^(?:\[[^\]]*\]:?\s*)*((?:\w+\.)*\w*(?:Error|Exception)\b:.*)")
    for line in log.read_text(errors="replace").splitlines():
        m = pat.match(line.strip())
        if m:
            return ": " + m.group(1)[:160]
    return ""


def scalars(out: Path, warmup: int) -> dict[str, float]:
    """Means of :data:`MEAN_TAGS` over the steps after ``warmup``, maxima of :data:`MAX_TAGS`, and ``steps`` counted."""
    values: dict[str, list[float]] = {}
    tb = out / "tb"
    for folder in sorted(tb.iterdir()) if tb.is_dir() else []:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in MEAN_TAGS + MAX_TAGS:
            if tag in acc.Tags()["scalars"]:
                values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag) if e.step > warmup)
    res = {tag: (max(v) if tag in MAX_TAGS else statistics.fmean(v)) for tag, v in values.items() if v}
    res["steps"] = len(values.get("throughput(tps)", []))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/titanenv-train-bench"))
    parser.add_argument("--recipe", default="titanenv_1b")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the averages (compilation)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument(
        "--data", type=Path, help="tokenized dataset prefix (GPT-2 ids); default: tokenize sample_data into WORK/data"
    )
    parser.add_argument("--timeout", type=float, help="seconds each launch may run before it is killed (a row says so)")
    parser.add_argument("--table", type=Path, help="also write the Markdown table here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    data = args.data or prepare_data(args.work)
    rows = []
    for r in range(args.rounds):
        for name, fn in (("stock", run_stock), ("titanenv", run_titanenv)):
            out = args.work / f"{name}-{r}"
            wall, status = fn(args, data, out)
            rows.append((name, r, wall, status, scalars(out, args.warmup)))
    text = table(args, rows)
    print("\n" + text)
    if args.table:
        args.table.write_text(text + "\n")
    if args.json:
        args.json.write_text(
            json.dumps([dict(launch=n, round=r, wall_s=w, status=st, **s) for n, r, w, st, s in rows], indent=1)
        )
    if any(st != "ok" for *_, st, _ in rows):
        sys.exit(1)


def table(args: argparse.Namespace, rows: list) -> str:
    """The Markdown table of ``rows`` and the targets' verdicts."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [
        f"{args.recipe}, {args.nproc_per_node} process(es) on {device}, torch {torch.__version__}, "
        f"{args.steps} steps per launch (first {args.warmup} left out of the averages)",
        "",
        "| launch | round | status | steps averaged | tokens/s per device | MFU % | step s | data loading s/step "
        "| data loading % | peak reserved GiB | peak active GiB | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r, wall, status, s in rows:
        lines.append(
            f"| {name} | {r} | {status} | {s['steps']} | "
            f"{s.get('throughput(tps)', 0):,.0f} | {s.get('mfu(%)', 0):.1f} | "
            f"{s.get('time_metrics/end_to_end(s)', 0):.4f} | {s.get('time_metrics/data_loading(s)', 0):.5f} | "
            f"{s.get('time_metrics/data_loading(%)', 0):.2f} | {s.get('memory/max_reserved(GiB)', 0):.2f} | "
            f"{s.get('memory/max_active(GiB)', 0):.2f} | {wall:.0f} |"
        )
    good = [(n, s) for n, _, _, st, s in rows if st == "ok" and s["steps"]]

    def verdict(met: bool) -> str:  # CPU figures say nothing about the GPU targets
        return ("met" if met else "NOT met") if cuda else "no verdict on CPU"

    mean = {n: [s["throughput(tps)"] for m, s in good if m == n] for n in ("stock", "titanenv")}
    lines.append("")
    if mean["stock"] and mean["titanenv"]:
        ratio = statistics.fmean(mean["titanenv"]) / statistics.fmean(mean["stock"])
        lines.append(f"- titanenv / stock tokens/s: {ratio:.3f} (target >= 0.99: {verdict(ratio >= 0.99)})")
    else:
        lines.append("- titanenv / stock tokens/s: no ratio (a launch produced no figures)")
    for n, s in good:
        if n == "titanenv":
            dl, mfu = s.get("time_metrics/data_loading(%)", 0), s.get("mfu(%)", 0)
            lines.append(f"- titanenv data loading {dl:.2f}% of the step (target < 1%: {verdict(dl < 1)}); "
                         f"MFU {mfu:.1f}% (target >= 40%: {verdict(mfu >= 40)})")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
