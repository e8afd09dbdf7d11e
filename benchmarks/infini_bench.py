"""Training step time and peak memory of Infini-attention against its baseline, on CPU, side by side.

    .venv/bin/python benchmarks/infini_bench.py [--seq-len 2048] [--segment-len 128] [--batch 1]
        [--warmup 2] [--steps 5] [--rounds 2] [--threads 1] [--json FILE] [--profile VARIANT]

The model is TorchTitan's llama3 ``debugmodel`` (6 layers, dim 256, 16 heads, vocabulary 2048)
with causal SDPA (:func:`titanenv.train.recipes.use_causal_sdpa`) and RoPE sized to ``--seq-len``,
fp32, built on meta and initialised as trainers do (seed 0). Three variants, same weights:

- ``baseline``: the model as built (causal softmax attention over the whole sequence);
- ``linear`` and ``delta``: :func:`titanenv.train.infini.apply_infini` with ``segment_len`` and
  that memory update rule (the baseline's attention weights plus one gate per head).

A step is forward, cross-entropy on next tokens (random ids, seed 1), backward and
``torch.optim.AdamW`` (lr 1e-3) on every parameter. Each variant runs in a fresh process (so the
memory high-water marks do not mix), ``--warmup`` untimed steps then ``--steps`` timed ones;
the variants alternate round by round (the order rotates) to spread drift over all of them.
Step time is the median over all timed steps of all rounds.

Peak memory is the process's max RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at the end
of the child, and the training peak above the built model: that max RSS minus the RSS
(``/proc/self/statm``) just before the first step, i.e. activations, gradients, optimizer state
and allocator slack. ``tracemalloc`` does not see torch's allocations, hence RSS.

``--profile VARIANT`` skips the comparison and prints torch.profiler's top operators (by self
CPU time) of one timed step of that variant. The last line prints the ratios Infini / baseline
(target for step time: <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("baseline", "linear", "delta")
TARGET = 1.5


def rss_gib() -> float:
    """Current resident set size of this process, GiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def build(variant: str, seq_len: int, segment_len: int):  # noqa: ANN201  # torch types in the child only
    """The debug model of ``variant`` on CPU, fp32, initialised with seed 0."""
    import torch
    from torchtitan.models.llama3 import model_registry

    from titanenv.train.infini import InfiniConfig, apply_infini
    from titanenv.train.recipes import use_causal_sdpa

    spec = model_registry("debugmodel", attn_backend="flex")
    use_causal_sdpa(spec)
    for layer in spec.model.layers:
        layer.attention.rope.max_seq_len = seq_len
    with torch.device("meta"):
        model = spec.model.build()
    if variant != "baseline":
        apply_infini(model, InfiniConfig(segment_len, update=variant))
    torch.manual_seed(0)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model


def child(args: argparse.Namespace) -> None:
    """One variant in this process; prints ``{"steps_s": [...], "max_rss_gib": ..., ...}``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    model = build(args.child, args.seq_len, args.segment_len)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 2048, (args.batch, args.seq_len + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    rss_before = rss_gib()
    for _ in range(args.warmup):
        step()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        return
    steps = [step() for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"steps_s": steps, "max_rss_gib": peak, "train_peak_gib": peak - rss_before, "params": params}
    print(json.dumps(result), flush=True)


def run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, *args.child_argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    if args.profile:
        print(proc.stdout)
        return {}
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = ", ".join(f"{s:.2f}" for s in result["steps_s"])
    print(f"  {variant:8s} steps {steps} s  max RSS {result['max_rss_gib']:.2f} GiB  "
          f"training peak {result['train_peak_gib']:.2f} GiB", flush=True)  # fmt: skip
    return result


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: median step, all steps, median max RSS and training peak, ratios to the baseline."""
    out: dict[str, dict] = {}
    for v, results in runs.items():
        steps = [s for r in results for s in r["steps_s"]]
        out[v] = {"median_step_s": statistics.median(steps), "steps_s": steps, "params": results[0]["params"],
                  "max_rss_gib": statistics.median(r["max_rss_gib"] for r in results),
                  "train_peak_gib": statistics.median(r["train_peak_gib"] for r in results)}  # fmt: skip
    base = out["baseline"]
    for row in out.values():
        row["step_ratio"] = row["median_step_s"] / base["median_step_s"]
        row["rss_ratio"] = row["max_rss_gib"] / base["max_rss_gib"]
        row["train_peak_ratio"] = row["train_peak_gib"] / base["train_peak_gib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--segment-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per variant and round.")
    parser.add_argument("--rounds", type=int, default=2, help="Fresh processes per variant, alternating.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine).")
    parser.add_argument("--json", type=Path, help="Write the settings and results to this file.")
    parser.add_argument("--profile", choices=VARIANTS, help="Print one step's top operators instead.")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    keys = ("seq-len", "segment-len", "batch", "warmup", "steps", "threads", "profile-rows")
    args.child_argv = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in keys]
    if args.profile:
        run_child(
            args.profile,
            argparse.Namespace(**{**vars(args), "child_argv": [*args.child_argv, f"--profile={args.profile}"]}),
        )
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(args.rounds):
        order = VARIANTS[i % 3 :] + VARIANTS[: i % 3]
        print(f"round {i + 1}: {', '.join(order)}", flush=True)
        for v in order:
            runs[v].append(run_child(v, args))
    summary = summarise(runs)
    print("\n| variant | median step (s) | step / baseline | max RSS (GiB) | training peak (GiB) | peak / baseline |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v, r in summary.items():
        print(f"| {v} | {r['median_step_s']:.3f} | {r['step_ratio']:.2f} | {r['max_rss_gib']:.2f} | "
              f"{r['train_peak_gib']:.2f} | {r['train_peak_ratio']:.2f} |")  # fmt: skip
    if args.json:
        settings = {
            k: getattr(args, k) for k in ("seq_len", "segment_len", "batch", "warmup", "steps", "rounds", "threads")
        }
        args.json.write_text(json.dumps({"settings": settings, "results": summary}, indent=2) + "\n")
    lin, dlt = summary["linear"]["step_ratio"], summary["delta"]["step_ratio"]
    print(f"\nInfini / baseline step time (seq {args.seq_len}, segment {args.segment_len}, batch {args.batch}, "
          f"{args.threads} thread(s), median of {args.rounds * args.steps}): linear {lin:.2f}x, delta {dlt:.2f}x "
          f"(target <= {TARGET}x: {'met' if max(lin, dlt) <= TARGET else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
