"""The lm-eval matrix: one ``titanenv eval`` process against one ``lm_eval`` CLI process per cell.

    .venv/bin/python benchmarks/eval_matrix_bench.py [--work /tmp/titanenv-eval-bench] [--limit 4]

Matrix: 2 models x 2 tasks x 2 few-shot counts (0 and 5) on the bundled local tasks
(``titanenv_wikitext2``, ``titanenv_next_sentence``). The models are tiny random
``LlamaForCausalLM`` folders (hidden 32, 2 layers) with the GPT-2 tokenizer, made here, so the
timing is start-up and per-cell overhead, which is what the matrix saves; a real model adds the
same compute to both sides. Both sides run on CPU (float32, batch size 4, ``--limit`` documents
per task) with the offline flags, inside ``unshare -n`` where that works (root), one after the
other, sharing one fresh ``HF_HOME`` (titanenv runs first, on the cold dataset cache).

The per-cell side is ``python -m lm_eval --model hf --model_args pretrained=M,dtype=float32
--tasks T --num_fewshot S --include_path TASKS`` with the same rendered task folder. It runs the
cells titanenv runs: the perplexity task pins ``num_fewshot: 0``, so its 5-shot cell would
repeat the 0-shot one, and both sides skip it (6 cells). Prints both wall times and their ratio;
the target is <= 0.4.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from titanenv import offline  # noqa: E402  (the repository's source, also without an install)
from titanenv.eval import bundled  # noqa: E402

SHOTS = (0, 5)


def tiny_llama(folder: Path, seed: int) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (hidden 32) with the GPT-2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=50256, eos_token_id=50256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    eot = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "sample_data" / "gpt2_tokenizer.json"),
                                        eos_token=eot, bos_token=eot)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


def environment(hf_home: Path) -> dict[str, str]:
    to_set, to_unset = offline.offline_environment()
    env = {k: v for k, v in os.environ.items() if k not in to_unset and k != "HF_DATASETS_CACHE"}
    env.update(to_set, HF_HOME=str(hf_home))
    return env


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    seconds = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}; see {log}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--limit", type=int, default=4, help="documents per task")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="titanenv-eval-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = [tiny_llama(work / name, seed) for seed, name in enumerate(["alpha", "beta"])]
    env = environment(work / "hf_home")
    cut = ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
    common = ["--limit", str(args.limit), "--batch_size", "4", "--device", "cpu"]

    out = work / "titanenv"
    cmd = [*cut, sys.executable, "-m", "titanenv.cli", "eval", *(a for m in models for a in ("--model", str(m))),
           "--tasks", ",".join(bundled.BUNDLED_TASKS), "--num-fewshot", ",".join(map(str, SHOTS)),
           *(a.replace("_", "-") for a in common), "--out", str(out)]  # fmt: skip
    print("titanenv:", " ".join(cmd), flush=True)
    ours = timed(cmd, env, work / "titanenv.log")

    tasks = out / "tasks"  # the rendered bundled tasks titanenv used: the same YAMLs and data
    cells = [(m, t, s) for m in models for t in bundled.BUNDLED_TASKS for s in SHOTS
             if not (t == "titanenv_wikitext2" and s)]  # fmt: skip
    theirs = 0.0
    for i, (model, task, shots) in enumerate(cells):
        cmd = [*cut, sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={model},dtype=float32", "--tasks", task, "--num_fewshot", str(shots),
               "--include_path", str(tasks), *common, "--output_path", str(work / "lm_eval" / str(i))]  # fmt: skip
        if i == 0:
            print("per cell:", " ".join(cmd), flush=True)
        seconds = timed(cmd, env, work / f"lm_eval-{i}.log")
        print(f"  cell {i + 1}/{len(cells)} {model.name} {task} {shots}-shot: {seconds:.1f} s", flush=True)
        theirs += seconds

    print("\n| method | cells | wall s |\n| --- | --- | --- |")
    print(f"| titanenv eval (one process) | {len(cells)} | {ours:.1f} |")
    print(f"| lm_eval CLI, one process per cell | {len(cells)} | {theirs:.1f} |")
    print(f"\nratio titanenv / per-cell: {ours / theirs:.2f}x (target <= 0.4x); network cut: {bool(cut)}; work: {work}")


if __name__ == "__main__":
    main()
