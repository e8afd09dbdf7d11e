"""LoRA fine-tune throughput on CPU: ``titanenv finetune`` against a PEFT + transformers loop, side by side.

    .venv/bin/python benchmarks/finetune_bench.py [--work DIR] [--steps 30] [--seq-len 256] [--batch-size 4]
        [--warmup 5] [--threads N] [--rounds 1] [--stock-peft] [--json FILE]

Setup (not timed, reused when ``WORK/base-hf/config.json`` exists): the bundled C4 sample
tokenized with ``titanenv preprocess`` (TorchTitan's test tokenizer, ``--append-eod``), the
``titanenv_debug`` recipe (TorchTitan's debug model: 6 layers, dim 256, vocabulary 2,048)
pre-trained a few steps with ``titanenv train``, and exported with ``titanenv export`` to a
Hugging Face folder, the base of both sides.

Timed, one after the other, each in a fresh process inside ``unshare -n`` where that works (root;
loopback only, which torchrun's rendezvous needs), with the offline flags, ``OMP_NUM_THREADS``
and torch's thread count both ``--threads``:

- titanenv: ``python -m titanenv.cli finetune --from WORK/base-hf --data PREFIX --recipe
  titanenv_debug_lora --steps S --seq-len L --batch-size B --checkpoint-interval 1000000
  --no-preflight -- --debug.seed 0`` (torchrun, one CPU worker; LoRA r 8, alpha 16 on wqkv, wo,
  w1, w2, w3; AdamW lr 1e-3, weight decay 0; gradient clipping at 1.0; the last step is saved).
  Tokens/s come from TorchTitan's step log (``tps:``, one line per step).
- PEFT: ``AutoModelForCausalLM.from_pretrained(WORK/base-hf)`` in float32, ``get_peft_model``
  with ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0, target_modules=q,k,v,o,gate,up,down
  _proj)``, then ``k_proj`` and ``v_proj`` share ``q_proj``'s ``lora_A`` in every layer: TorchTitan
  fuses q, k and v into one ``wqkv`` Linear with one ``A`` (``B`` split by rows), so this is the
  same model and the same trainable parameters (``--stock-peft`` adds a row with PEFT's own three
  ``A`` matrices, 2 x layers x r x dim more). An eager loop: the same windows of the same token
  stream in the same order as titanenv's loader (``.bin/.idx`` read with ``IndexedDataset``,
  windows of L + 1 tokens, the recipe's seeded permutation), forward, cross-entropy in float32,
  backward, ``clip_grad_norm_(1.0)``, AdamW (lr 1e-3, weight decay 0), ``save_pretrained`` at the end.

Both sides' tokens/s are B x L x (steady steps) / their time, over the same steps (after
``--warmup``), each step timed end to end (data, forward, backward, optimizer); start-up is only
in the wall time, which is the whole process. Checked, or the script fails: equal trainable and
frozen parameter counts, and equal step-1 losses (the adapters' ``B`` starts at zero, so step 1
is the base model on the first batch: same weights, same tokens). Prints both, the ratio
titanenv / PEFT (higher is faster) and, with ``--json``, writes them to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from titanenv import offline  # noqa: E402  (the repository's source, also without an install)

SAMPLE = ROOT / "sample_data"
TOKENIZER = SAMPLE / "torchtitan_test_tokenizer"
RECIPE = "titanenv_debug_lora"
RANK, ALPHA, LR = 8, 16.0, 1e-3
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRETRAIN_STEPS = 3
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-\d.naninf]+).*?tps:\s*([\d,]+)")
COUNTS = re.compile(r"trainable ([\d,]+) parameters .*?frozen ([\d,]+)")


def environment(threads: int) -> dict[str, str]:
    to_set, to_unset = offline.offline_environment()
    env = {k: v for k, v in os.environ.items() if k not in to_unset}
    env.update(to_set, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def network_cut() -> tuple[list[str], str]:
    """A prefix that runs a command without network (loopback up, for torchrun), and what it does."""
    tools = shutil.which("unshare") and shutil.which("ip")
    if tools and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"], "unshare -n (loopback only)"
    return [], "NOT cut: `unshare -n` is not permitted here (needs root), both sides ran with the network"


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; the wall seconds. Exits naming the log on failure."""
    start = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)}\nexited {p.returncode}; see {log}:\n{tail}")
    return seconds


def titanenv(*args: str) -> list[str]:
    return [sys.executable, "-m", "titanenv.cli", *args]


def build_base(work: Path, seq_len: int, batch: int, env: dict[str, str]) -> tuple[Path, Path]:
    """``(WORK/base-hf, WORK/data/train)``: tokenize, pre-train and export, unless already there."""
    hf, data = work / "base-hf", work / "data" / "train"
    if (hf / "config.json").is_file() and data.with_suffix(".idx").is_file():
        print(f"setup: reusing {hf} and {data}", flush=True)
        return hf, data
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    start = time.perf_counter()
    inputs = [a for p in sorted(SAMPLE.glob("c4-sample.*.json.gz")) for a in ("--input", str(p))]
    run(titanenv("preprocess", *inputs, "--output-prefix", str(data), "--tokenizer-model", str(TOKENIZER),
                 "--append-eod"), env, work / "preprocess.log")  # fmt: skip
    run(titanenv("train", "--data", str(data), "--tokenizer", str(TOKENIZER), "--output-dir", str(work / "base"),
                 "--recipe", "titanenv_debug", "--steps", str(PRETRAIN_STEPS), "--seq-len", str(seq_len),
                 "--batch-size", str(batch), "--checkpoint-interval", "1000000", "--no-preflight",
                 "--", "--debug.seed", "0"), env, work / "pretrain.log")  # fmt: skip
    run(titanenv("export", str(work / "base"), "--out", str(hf)), env, work / "export.log")
    print(f"setup: tokenized, pre-trained {PRETRAIN_STEPS} steps and exported {hf} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    return hf, data


def steady(tokens_per_step: int, seconds: list[float], warmup: int) -> float:
    """Tokens/s over the steps after ``warmup``: their tokens over their time."""
    kept = seconds[warmup:]
    return tokens_per_step * len(kept) / sum(kept)


def time_titanenv(args: argparse.Namespace, hf: Path, data: Path, env: dict[str, str], cut: list[str]) -> dict:
    out = args.work / "ft-titanenv"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*cut, *titanenv("finetune", "--from", str(hf), "--data", str(data), "--output-dir", str(out),
           "--recipe", RECIPE, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--checkpoint-interval", "1000000", "--no-preflight",
           "--", "--debug.seed", "0")]  # fmt: skip
    print("titanenv:", " ".join(cmd), flush=True)
    log = args.work / "ft-titanenv.log"
    wall = run(cmd, env, log)
    text = ANSI.sub("", log.read_text(errors="replace"))
    steps = {int(s): (float(loss), int(tps.replace(",", ""))) for s, loss, tps in STEP_LINE.findall(text)}
    counts = COUNTS.search(text)
    if sorted(steps) != list(range(1, args.steps + 1)) or counts is None:
        raise SystemExit(f"{log}: expected step lines 1..{args.steps} and the LoRA parameter counts; got steps "
                         f"{sorted(steps)[:5]}..., counts {'found' if counts else 'missing'}")  # fmt: skip
    tokens = args.batch_size * args.seq_len
    seconds = [tokens / steps[s][1] for s in sorted(steps)]  # tps is tokens over the step's time
    return {"tokens_per_s": steady(tokens, seconds, args.warmup), "wall_s": wall, "step_s": seconds,
            "step1_loss": steps[1][0], "final_loss": steps[args.steps][0],
            "trainable": int(counts[1].replace(",", "")), "frozen": int(counts[2].replace(",", ""))}  # fmt: skip


def time_peft(args: argparse.Namespace, hf: Path, data: Path, env: dict[str, str], cut: list[str],
              stock: bool) -> dict:  # fmt: skip
    from titanenv.train.recipes import load_recipe

    loader = load_recipe(RECIPE).dataloader
    name = "peft-stock" if stock else "peft"
    cmd = [*cut, sys.executable, __file__, "--child", name, "--work", str(args.work), "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--base", str(hf), "--data", str(data), "--data-seed", str(loader.seed),
           *([] if loader.shuffle else ["--no-shuffle"])]  # fmt: skip
    print(f"{name}:", " ".join(cmd), flush=True)
    log = args.work / f"ft-{name}.log"
    wall = run(cmd, env, log)
    result = json.loads(log.read_text().strip().splitlines()[-1])
    tokens = args.batch_size * args.seq_len
    return {"tokens_per_s": steady(tokens, result["step_s"], args.warmup), "wall_s": wall, **result}


def windows(data: Path, seq_len: int, seed: int, shuffle: bool):
    """``(inputs, labels)`` int64 windows in titanenv's loader order (one rank, epoch 0)."""
    import numpy as np
    import torch

    from titanenv.data.indexed import IndexedDataset

    tokens = IndexedDataset(data).tokens
    n = (tokens.size - 1) // seq_len
    order = np.random.default_rng([seed, 0]).permutation(n) if shuffle else np.arange(n)
    for i in order:
        w = torch.from_numpy(np.asarray(tokens[i * seq_len : (i + 1) * seq_len + 1], dtype=np.int64))
        yield w[:-1], w[1:]


def peft_child(args: argparse.Namespace, stock: bool) -> None:
    """The PEFT + transformers loop in this process; prints one JSON line."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS)
    model = get_peft_model(model, config)
    if not stock:  # TorchTitan's fused wqkv: one A for q, k and v
        for layer in model.base_model.model.model.layers:
            attn = layer.self_attn
            attn.k_proj.lora_A["default"].weight = attn.q_proj.lora_A["default"].weight
            attn.v_proj.lora_A["default"].weight = attn.q_proj.lora_A["default"].weight
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]  # shared tensors once
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    stream = windows(args.data, args.seq_len, args.data_seed, not args.no_shuffle)
    step_s, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = [next(stream) for _ in range(args.batch_size)]
        inputs, labels = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - start)
        print(f"step {len(step_s)}: loss {losses[-1]:.5f}, {step_s[-1]:.3f} s", flush=True)
    model.save_pretrained(args.work / f"ft-{args.child}")
    print(json.dumps({"step_s": step_s, "step1_loss": losses[0], "final_loss": losses[-1],
                      "trainable": sum(p.numel() for p in params), "frozen": frozen}), flush=True)  # fmt: skip


def check(ours: dict, theirs: dict, extra_trainable: int, name: str) -> None:
    """Fail unless both trained the same parameters (``extra_trainable`` more for stock PEFT) on the same batch."""
    want = ours["trainable"] + extra_trainable
    if theirs["trainable"] != want or theirs["frozen"] != ours["frozen"]:
        raise SystemExit(f"parameter counts differ: titanenv trainable {ours['trainable']:,} frozen "
                         f"{ours['frozen']:,}; {name} trainable {theirs['trainable']:,} (expected {want:,}) "
                         f"frozen {theirs['frozen']:,}")  # fmt: skip
    if abs(ours["step1_loss"] - theirs["step1_loss"]) > 1e-3 * abs(ours["step1_loss"]):
        raise SystemExit(f"step-1 losses differ (not the same model or batch): titanenv {ours['step1_loss']:.5f}, "
                         f"{name} {theirs['step1_loss']:.5f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "scratch" / "finetune-bench",
                    help="scratch folder; its base model and data are reused when present")  # fmt: skip
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, in alternating order; medians reported")
    ap.add_argument("--stock-peft", action="store_true", help="also time PEFT with its own A for q, k and v")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--child", choices=["peft", "peft-stock"], help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data-seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-shuffle", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        peft_child(args, stock=args.child == "peft-stock")
        return
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    args.work = args.work.absolute()
    env = environment(args.threads)
    hf, data = build_base(args.work, args.seq_len, args.batch_size, env)
    cut, how = network_cut()
    print(f"network: {how}; threads: {args.threads}", flush=True)
    layers = json.loads((hf / "config.json").read_text())
    extra = {"titanenv": 0, "peft": 0, "peft_stock": 2 * RANK * layers["hidden_size"] * layers["num_hidden_layers"]}
    keys = ["titanenv", "peft", *(["peft_stock"] if args.stock_peft else [])]
    rounds: dict[str, list[dict]] = {k: [] for k in keys}
    for i in range(args.rounds):
        print(f"round {i + 1}:", flush=True)
        for key in keys if i % 2 == 0 else keys[::-1]:
            if key == "titanenv":
                rounds[key].append(time_titanenv(args, hf, data, env, cut))
            else:
                rounds[key].append(time_peft(args, hf, data, env, cut, stock=key == "peft_stock"))
            r = rounds[key][-1]
            print(f"  {key}: {r['tokens_per_s']:,.0f} tokens/s, wall {r['wall_s']:.1f} s", flush=True)
    for key in keys[1:]:
        for ours, theirs in zip(rounds["titanenv"], rounds[key], strict=True):
            check(ours, theirs, extra[key], key)
    tps = {k: statistics.median(r["tokens_per_s"] for r in rounds[k]) for k in keys}
    print(f"\nLoRA fine-tune, {RECIPE} base (exported to HF), seq {args.seq_len}, batch {args.batch_size}, "
          f"{args.steps} steps (tokens/s over steps {args.warmup + 1}..{args.steps}), {args.threads} threads, "
          f"fp32 CPU, median of {args.rounds} round(s)")  # fmt: skip
    print("| method | trainable | tokens/s | tokens/s per round | tokens/s at the median step | wall s | "
          "step-1 loss | last loss |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    names = {"titanenv": "titanenv finetune", "peft": "PEFT + transformers (q/k/v share A)",
             "peft_stock": "PEFT + transformers (stock: A per q, k, v)"}  # fmt: skip
    tokens = args.batch_size * args.seq_len
    for key in keys:
        runs = rounds[key]
        each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
        at_median = statistics.median(tokens / statistics.median(r["step_s"][args.warmup :]) for r in runs)
        print(f"| {names[key]} | {runs[0]['trainable']:,} | {tps[key]:,.0f} | "
              f"{each} | {at_median:,.0f} | "
              f"{statistics.median(r['wall_s'] for r in runs):.1f} | {runs[0]['step1_loss']:.4f} | "
              f"{runs[0]['final_loss']:.4f} |")  # fmt: skip
    ratio = tps["titanenv"] / tps["peft"]
    ours = rounds["titanenv"][0]
    print(f"\ntokens/s titanenv / PEFT: {ratio:.2f}x; trainable parameters equal ({ours['trainable']:,}), "
          f"frozen equal ({ours['frozen']:,}), step-1 losses agree; network: {how}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    if args.json:
        settings = {k: getattr(args, k) for k in ("steps", "seq_len", "batch_size", "warmup", "threads", "rounds")}
        summary = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.node(),
                   "cpus": os.cpu_count(), "load_average": os.getloadavg(), "network": how, "ratio": ratio,
                   "tokens_per_s": tps, "settings": settings, "rounds": rounds}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
