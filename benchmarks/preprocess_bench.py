"""Tokenization throughput and memory: titanenv preprocess against Megatron's method and the raw tokenizer.

    .venv/bin/python benchmarks/preprocess_bench.py [--data ../shared/data] [--work /tmp/titanenv-bench]

Corpus: ``python-3.11-docs.jsonl.gz`` + ``linux-6.1-docs.jsonl.gz`` (35 MB of real text, no
repeats), decompressed once into one JSON-lines file that every method reads. Tokenizers: GPT-2
and OLMo-2 (dolma2) from ``sample_data/``. Each measurement runs in a fresh process:

- ``limit``: the raw Hugging Face tokenizer, ``encode_batch`` on ~1 MB batches, one process,
  one thread (``TOKENIZERS_PARALLELISM=false``), texts already in memory; also
  ``encode_batch_fast`` (the same ids without character offsets), which titanenv's hf backend calls;
- ``megatron``: Megatron-LM's method, reproduced (``tools/preprocess_data.py`` is not in the
  ``megatron-core`` wheel): one parent reads lines and collects per-document
  ``tokenizer.encode`` results from ``multiprocessing.Pool.imap(..., 32)``, writing with
  megatron-core's ``IndexedDatasetBuilder``;
- ``titanenv-hf`` / ``titanenv-gigatoken``: ``titanenv.data.preprocess.run`` with that backend.

Timings exclude interpreter start and imports (megatron-core imports torch), and include
everything else: tokenizer loading, worker start-up, gigatoken's check, writing and joining.
For titanenv, "of which tokenizing" is the time its workers ran (from its own log line); the
rest is start-up (tokenizer loading, the gigatoken check) and joining the pieces.
"per worker" divides by the worker count; "per CPU-second" divides by the CPU time of the process
and its workers, which a busy machine disturbs less than wall time; "cores busy" is CPU time over
wall time (below the worker count when other jobs share the cores). Peak memory is sampled from
/proc: the proportional set size (PSS) of the whole process tree (all workers together, shared
pages counted once) and the resident set (RSS) of its largest process.
Every output is compared byte for byte with the baseline's. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = {"GPT-2": "gpt2_tokenizer.json", "OLMo-2": "dolma2_tokenizer.json"}
CORPUS = ("python-3.11-docs.jsonl.gz", "linux-6.1-docs.jsonl.gz")


# ---------------------------------------------------------------- children: one measurement each


def _timed(fn) -> dict:
    """Wall and CPU seconds (this process plus reaped children) of ``fn()``."""
    before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=False))
    return {"wall": wall, "cpu": cpu, **out}


def child_limit(tokenizer: str, corpus: str, method: str) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    with open(corpus, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    batches, batch, size = [], [], 0
    for t in texts:  # ~1 MB per encode_batch call, as a streaming tool must do
        batch.append(t)
        size += len(t)
        if size >= 1 << 20:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)

    def encode():
        fn = getattr(Tokenizer.from_file(tokenizer), method)
        return {"tokens": sum(len(e.ids) for b in batches for e in fn(b, add_special_tokens=False))}

    return _timed(encode)


class MegatronEncoder:
    """tools/preprocess_data.py's Encoder: one tokenizer per worker, one document per call."""

    def __init__(self, tokenizer: str) -> None:
        self.path = tokenizer

    def initializer(self) -> None:
        from tokenizers import Tokenizer

        MegatronEncoder.tokenizer = Tokenizer.from_file(self.path)
        MegatronEncoder.eod = MegatronEncoder.tokenizer.token_to_id("<|endoftext|>")

    def encode(self, json_line: str):
        text = json.loads(json_line)["text"]
        ids = MegatronEncoder.tokenizer.encode(text, add_special_tokens=False).ids
        ids.append(MegatronEncoder.eod)  # --append-eod
        return {"text": ids}, {"text": [len(ids)]}, len(json_line)


def child_megatron(tokenizer: str, corpus: str, out: str, workers: int) -> dict:
    import multiprocessing
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    from tokenizers import Tokenizer

    def process():
        vocab = Tokenizer.from_file(tokenizer).get_vocab_size(with_added_tokens=True)
        encoder = MegatronEncoder(tokenizer)
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        builder = indexed_dataset.IndexedDatasetBuilder(out + ".bin", dtype=indexed_dataset.DType.optimal_dtype(vocab))
        tokens = 0
        with open(corpus, encoding="utf-8") as fin:
            for doc, lens, _ in pool.imap(encoder.encode, fin, 32):
                builder.add_document(doc["text"], lens["text"])
                tokens += len(doc["text"])
        builder.finalize(out + ".idx")
        pool.close()
        pool.join()
        return {"tokens": tokens}

    return _timed(process)


def child_titanenv(tokenizer: str, corpus: str, out: str, workers: int, backend: str) -> dict:
    from titanenv.data import preprocess as pp

    cfg = pp.PreprocessConfig(
        inputs=[corpus],
        output_prefix=Path(out),
        tokenizer_model=tokenizer,
        append_eod=True,
        workers=workers,
        tokenizer_backend=backend,
    )

    phase = []

    class Phase(logging.Handler):  # run() logs "tokenized N pieces in S s": the time the workers ran
        def emit(self, record):
            if record.msg.startswith("tokenized %d pieces"):
                phase.append(record.args[1])

    logging.getLogger("titanenv.preprocess").addHandler(Phase())
    logging.getLogger("titanenv.preprocess").setLevel(logging.INFO)

    def process():
        m = pp.run(cfg)
        return {
            "tokens": m["tokens"],
            "backend": m["backend"]["used"],
            "pieces": m["pieces"]["count"],
            "phase": phase[0],
        }

    return _timed(process)


CHILDREN = {"limit": child_limit, "megatron": child_megatron, "titanenv": child_titanenv}


# ---------------------------------------------------------------- parent: run, sample RSS, report


def _tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, largest RSS) in bytes over ``pid`` and its descendants, from /proc.

    PSS divides pages shared between processes (forked workers share the tokenizer) among them,
    so the sum is the memory the job really holds; RSS would count shared pages once per process.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    todo, pss, rss = [pid], 0, 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:])
        except (OSError, ValueError):
            continue
        pss += int(fields["Pss"].split()[0]) * 1024
        rss = max(rss, int(fields["Rss"].split()[0]) * 1024)
    return pss, rss


def measure(*args) -> dict:
    """Run one child measurement in a fresh interpreter; returns its result plus peak RSS."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *map(str, args)], stdout=subprocess.PIPE, env=env)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            total, largest = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"measurement {args} failed with exit code {proc.returncode}")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "pss_total": peak[0], "rss_max": peak[1]}


def digest(prefix: Path) -> str:
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        h.update(Path(f"{prefix}{ext}").read_bytes())
    return h.hexdigest()


def prepare(data: Path, work: Path) -> dict[str, Path]:
    """The corpus as one JSON-lines file, plus 10 MB and 100 MB inputs for the memory runs."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        with open(corpus, "wb") as out:
            for name in CORPUS:
                with gzip.open(data / name, "rb") as f:
                    shutil.copyfileobj(f, out)
    inputs = {"corpus": corpus}
    head = bytearray()
    with open(corpus, "rb") as f:
        while len(head) < 10e6:  # whole documents: the first 10 MB of the corpus
            head += f.readline()
    for mb, copies in ((10, 1), (100, 10)):  # 100 MB: the same 10 MB ten times, so only the size differs
        path = work / f"rss{mb}.jsonl"
        if not path.exists():
            path.write_bytes(bytes(head) * copies)
        inputs[f"rss{mb}"] = path
    return inputs


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder with the two corpora")
    ap.add_argument(
        "--work", type=Path, default=Path("/tmp/titanenv-bench"), help="scratch folder for inputs and outputs"
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    for name in CORPUS:
        if not (args.data / name).is_file():
            raise SystemExit(f"{args.data / name}: missing; pass --data FOLDER")
    inputs = prepare(args.data, args.work)
    corpus = inputs["corpus"]
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    print(f"machine: {machine()}; load average before: {load_before[0]:.2f}", file=sys.stderr)

    rows = []
    for label, file in TOKENIZERS.items():
        tok = str(ROOT / "sample_data" / file)
        for method in ("encode_batch", "encode_batch_fast"):
            limit = measure("limit", tok, corpus, method)
            name = "raw HF encode_batch (limit)" if method == "encode_batch" else "raw HF encode_batch_fast"
            rows.append({"tokenizer": label, "method": name, "workers": 1, **limit})
            print(f"{label} {name}: {limit['tokens'] / limit['wall'] / 1e6:.3f} M tok/s", file=sys.stderr)
        reference = None
        for method, backend in (("megatron", None), ("titanenv", "hf"), ("titanenv", "gigatoken")):
            for w in args.workers:
                out = args.work / f"{label}-{method}-{backend}-{w}"
                extra = [backend] if backend else []
                r = measure(method, tok, corpus, out, w, *extra)
                d = digest(out)
                reference = reference or d
                name = (
                    "Megatron method (baseline)" if method == "megatron" else f"titanenv --tokenizer-backend {backend}"
                )
                rows.append({"tokenizer": label, "method": name, "workers": w, "identical": d == reference, **r})
                print(
                    f"{label} {name} w={w}: {r['tokens'] / r['wall'] / 1e6:.3f} M tok/s, identical {d == reference}",
                    file=sys.stderr,
                )

    memory = []
    tok = str(ROOT / "sample_data" / TOKENIZERS["GPT-2"])
    for backend in ("gigatoken", "hf"):
        for mb in (10, 100):
            out = args.work / f"rss-{backend}-{mb}"
            r = measure("titanenv", tok, inputs[f"rss{mb}"], out, 2, backend)
            memory.append({"method": f"titanenv --tokenizer-backend {backend}", "input_mb": mb, **r})
            print(f"rss {backend} {mb} MB: {r['pss_total'] / 2**20:.0f} MiB", file=sys.stderr)
    report(rows, memory, started, load_before, os.getloadavg(), " ".join(sys.argv))


def report(rows, memory, started, load_before, load_after, command) -> None:
    print(f"Command: `{command}`  ")
    print(f"Machine: {machine()}  ")
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after  ")
    print()
    print(
        "| tokenizer | method | workers | tokens | wall s | of which tokenizing s | cores busy | M tok/s "
        "| M tok/s per worker | M tok per CPU-s "
        "| × baseline, wall (per CPU-s) | × limit × workers, wall (per CPU-s) | scaling 1→2, wall | ids identical |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")

    def find(r, method, workers=None):
        same = (x for x in rows if x["tokenizer"] == r["tokenizer"] and x["method"].startswith(method))
        return next((x for x in same if workers is None or x["workers"] == workers), None)

    for r in rows:
        rate, per_cpu = r["tokens"] / r["wall"], r["tokens"] / r["cpu"]
        base, limit = find(r, "Megatron", r["workers"]), find(r, "raw HF encode_batch (limit)")
        one = find(r, r["method"], 1)
        vs_base = ""
        if base and not r["method"].startswith("raw"):
            vs_base = f"{rate / (base['tokens'] / base['wall']):.2f} ({per_cpu / (base['tokens'] / base['cpu']):.2f})"
        vs_limit = (
            f"{rate / (r['workers'] * limit['tokens'] / limit['wall']):.2f} "
            f"({per_cpu / (limit['tokens'] / limit['cpu']):.2f})"
        )
        cells = [
            r["tokenizer"],
            r["method"],
            r["workers"],
            f"{r['tokens']:,}",
            f"{r['wall']:.2f}",
            f"{r['phase']:.2f}" if "phase" in r else "",
            f"{r['cpu'] / r['wall']:.2f}",
            f"{rate / 1e6:.3f}",
            f"{rate / r['workers'] / 1e6:.3f}",
            f"{per_cpu / 1e6:.3f}",
            vs_base,
            vs_limit,
            f"{rate / (one['tokens'] / one['wall']):.2f}" if one and r["workers"] > 1 else "",
            {True: "yes", False: "**no**"}.get(r.get("identical"), ""),
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print()
    print(
        "| method (GPT-2, 2 workers) | input | tokens | wall s | peak PSS, all processes | peak RSS, largest process |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for m in memory:
        print(
            f"| {m['method']} | {m['input_mb']} MB | {m['tokens']:,} | {m['wall']:.2f} | "
            f"{m['pss_total'] / 2**20:,.0f} MiB | {m['rss_max'] / 2**20:,.0f} MiB |"
        )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        typed = [int(a) if a.isdigit() else a for a in rest]
        print(json.dumps(CHILDREN[kind](*typed)))
    else:
        main()
