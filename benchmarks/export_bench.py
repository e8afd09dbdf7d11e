"""Export time of the 1B recipe's shapes: ``titanenv export`` against TorchTitan's ``convert_to_hf.py``, side by side.

    .venv/bin/python benchmarks/export_bench.py [--work DIR] [--repeat N] [--dtype float32|bfloat16]

Setup (not timed, reused when ``WORK/run`` is complete): a run folder of the ``titanenv_1b``
recipe with Llama-3.2-1B's vocabulary (128,256 rows, so TorchTitan's registry flavour ``1B`` has
the very same shapes: 1.236B parameters, tied embeddings), randomly initialised and saved as a
model-only DCP checkpoint ``WORK/run/checkpoint/step-1`` on CPU, plus the GPT-2 tokenizer.

Each round runs both converters, each in a fresh process, in alternating order, on the same
checkpoint (read once beforehand, so both find it in the page cache):

- titanenv: :func:`titanenv.export.export_run` (the whole folder: weights, config, tokenizer, README);
- torchtitan: ``convert_to_hf`` from ``benchmarks/third_party/torchtitan_convert_to_hf.py``
  (vendored, BSD-3-Clause): build the model on CPU, ``dcp.load``, ``to_hf``,
  ``HuggingFaceStorageWriter(enable_consolidation=True)``.

Only the conversion call is timed (imports excluded). The outputs are checked to hold the same
tensor names and, for a sample of tensors, the same values. The last line prints both medians and
the ratio titanenv / torchtitan (target <= 1.0). Needs about 12 GB of memory and 15 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128256
SEQ_LEN = 2048
STEP = 1


def make_run(work: Path) -> Path:
    """``WORK/run``: trainer record, tokenizer and a randomly initialised 1B checkpoint (skipped when present)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from titanenv.train import checkpoints
    from titanenv.train.cli import stage_tokenizer
    from titanenv.train.recipes import load_recipe, set_vocab_size, use_causal_sdpa

    run = work / "run"
    ckpt = run / "checkpoint" / f"step-{STEP}"
    if checkpoints.complete_steps(run / "checkpoint") == [STEP]:
        return run
    shutil.rmtree(run, ignore_errors=True)
    tok = stage_tokenizer(ROOT / "sample_data" / "gpt2_tokenizer.json", run)
    record = {"recipe": "titanenv_1b", "vocab_size": VOCAB, "training": {"seq_len": SEQ_LEN},
              "hf_assets_path": str(tok), "dataloader": {"path": ""}}  # fmt: skip
    (run / "trainer_config.json").write_text(json.dumps(record))
    config = load_recipe("titanenv_1b")
    set_vocab_size(config, VOCAB)
    config.training.seq_len = SEQ_LEN
    use_causal_sdpa(config.model_spec)
    config.model_spec.model.update_from_config(config=config)
    with torch.device("meta"):
        model = config.model_spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    t = time.monotonic()
    dcp.save(model.state_dict(), checkpoint_id=str(ckpt))
    checkpoints.write_marker(ckpt, STEP, job="export-bench")
    print(f"setup: saved {sum(p.numel() for p in model.parameters()):,} parameters to {ckpt} "
          f"in {time.monotonic() - t:.1f} s", flush=True)  # fmt: skip
    return run


def child(which: str, work: Path, dtype: str) -> None:
    """One timed conversion in this process; prints ``{"seconds": ..., "peak_rss_gib": ...}``."""
    run, out = work / "run", work / f"out-{which}"
    if which == "titanenv":
        from titanenv.export import export_run

        t = time.monotonic()
        export_run(run, out, dtype=dtype)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks" / "third_party"))
        from torchtitan_convert_to_hf import convert_to_hf

        t = time.monotonic()
        convert_to_hf(str(run / "checkpoint" / f"step-{STEP}"), str(out), "llama3", "1B", None, dtype)
    seconds = time.monotonic() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak}), flush=True)


def timed(which: str, work: Path, dtype: str) -> dict[str, float]:
    shutil.rmtree(work / f"out-{which}", ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", which, "--work", str(work), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {which:10s} {result['seconds']:7.1f} s  peak RSS {result['peak_rss_gib']:.1f} GiB", flush=True)
    return result


def same_tensors(work: Path) -> str:
    """Compare the two outputs: tensor names, and every 16th tensor's values."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(folder.rglob("*.safetensors")):
            with safe_open(path, "pt") as f:
                found |= {k: path for k in f.keys()}  # noqa: SIM118
        return found

    ours, theirs = tensors(work / "out-titanenv"), tensors(work / "out-torchtitan")
    if set(ours) != set(theirs):
        return f"DIFFERENT names: only titanenv {sorted(set(ours) - set(theirs))[:5]}, only torchtitan " \
               f"{sorted(set(theirs) - set(ours))[:5]}"  # fmt: skip
    import torch

    for name in sorted(ours)[::16]:
        with safe_open(ours[name], "pt") as a, safe_open(theirs[name], "pt") as b:
            if not torch.equal(a.get_tensor(name), b.get_tensor(name)):
                return f"DIFFERENT values of {name}"
    return f"same {len(ours)} tensor names, equal values in {len(sorted(ours)[::16])} compared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "scratch" / "export-bench")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--child", choices=["titanenv", "torchtitan"])
    parser.add_argument("--clean", action="store_true", help="Delete WORK when done.")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.dtype)
        return
    run = make_run(args.work)
    for path in (run / "checkpoint").rglob("*"):  # into the page cache, for both alike
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 24):
                    pass
    times: dict[str, list[float]] = {"titanenv": [], "torchtitan": []}
    for i in range(args.repeat):
        order = ["titanenv", "torchtitan"] if i % 2 == 0 else ["torchtitan", "titanenv"]
        print(f"round {i + 1}:", flush=True)
        for which in order:
            times[which].append(timed(which, args.work, args.dtype)["seconds"])
    print(f"outputs: {same_tensors(args.work)}")
    ours, theirs = statistics.median(times["titanenv"]), statistics.median(times["torchtitan"])
    print(f"export 1B ({args.dtype}, titanenv_1b shapes, vocabulary {VOCAB}), median of {args.repeat}: "
          f"titanenv {ours:.1f} s, torchtitan convert_to_hf {theirs:.1f} s, ratio {ours / theirs:.2f}x "
          f"(target <= 1.0x)")  # fmt: skip
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
