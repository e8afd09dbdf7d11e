"""A Hugging Face Hub on loopback: olah serving small real repositories that the tests build.

olah (PyPI) serves git work trees at ``<mirrors-path>/{models,datasets,spaces}/<org>/<name>``
with ``offline = true``. Facts that shape the repositories below: olah answers 401 where the Hub
answers 404, so every repository has the files clients probe for (a dataset's ``README.md``),
and evaluate's metric Space is tagged ``v<evaluate version>``, the revision evaluate asks for.

Also an nltk data index with one package, for ``nltk.download``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

ORG = "titanenv-test"
MODEL = f"{ORG}/tiny-llama"
DATASET = f"{ORG}/tiny-c4"
SCRIPTED = f"{ORG}/scripted"
METRIC = "word_overlap"  # canonical name: Space evaluate-metric/word_overlap
NLTK_PACKAGE = "titanenv_words"

METRIC_SCRIPT = '''"""Word overlap: the share of reference words that also appear in the prediction."""
import datasets
import evaluate


class WordOverlap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = []
        for p, r in zip(predictions, references):
            words = r.split()
            scores.append(sum(w in set(p.split()) for w in words) / max(len(words), 1))
        return {"word_overlap": sum(scores) / max(len(scores), 1)}
'''

DATASET_CARD = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---
# tiny-c4
Real C4 web text (ODC-BY, from allenai/OLMo test fixtures) for titanenv's tests.
"""


def _git_commit(folder: Path, tag: str | None = None) -> str:
    env = dict(
        os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"
    )
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "titanenv test fixture"]):
        subprocess.run(["git", *cmd], cwd=folder, env=env, check=True)
    if tag:
        subprocess.run(["git", "tag", tag], cwd=folder, check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
    ).stdout.strip()


def build_model(folder: Path, sample: Path) -> None:
    """A 2-layer Llama saved by transformers, with TorchTitan's real test tokenizer (2,000-entry BPE)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(sample / "torchtitan_test_tokenizer"))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def build_dataset(folder: Path, sample: Path) -> None:
    """Parquet train/test splits of real C4 documents, with a dataset card naming them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = []
    for f in sorted(sample.glob("c4-sample.*.json.gz")):
        with gzip.open(f, "rt") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:20]}), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": texts[20:30]}), folder / "data" / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text(DATASET_CARD)


def build_mirrors(root: Path, sample: Path) -> dict[str, str]:
    """Build every repository under ``root``; returns repo id -> commit sha."""
    import evaluate

    commits = {}
    model = root / "models" / MODEL
    model.mkdir(parents=True)
    build_model(model, sample)
    commits[MODEL] = _git_commit(model)
    data = root / "datasets" / DATASET
    build_dataset(data, sample)
    commits[DATASET] = _git_commit(data)
    scripted = root / "datasets" / SCRIPTED
    scripted.mkdir(parents=True)
    (scripted / "scripted.py").write_text(
        "import datasets\n\nclass Scripted(datasets.GeneratorBasedBuilder):\n    pass\n"
    )
    (scripted / "README.md").write_text("# a dataset with a loading script\n")
    commits[SCRIPTED] = _git_commit(scripted)
    space = root / "spaces" / "evaluate-metric" / METRIC
    space.mkdir(parents=True)
    (space / f"{METRIC}.py").write_text(METRIC_SCRIPT)
    (space / "README.md").write_text(f"---\ntitle: {METRIC}\nsdk: gradio\n---\n")
    commits[f"evaluate-metric/{METRIC}"] = _git_commit(space, tag=f"v{evaluate.__version__}")
    return commits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def olah_hub(mirrors: Path, workdir: Path) -> Iterator[str]:
    """Serve ``mirrors`` with olah on 127.0.0.1; yields the endpoint URL (for ``HF_ENDPOINT``)."""
    port = free_port()
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{workdir / "repos"}"\n'
        f'mirrors-path = ["{mirrors}"]\n[accessibility]\noffline = true\n'
    )
    olah = Path(sys.executable).with_name("olah-cli")
    log = open(workdir / "olah.log", "w")  # noqa: SIM115 server log, closed in finally
    proc = subprocess.Popen([str(olah), "-c", str(config)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/models/{MODEL}/revision/main", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"olah did not start: {(workdir / 'olah.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def build_nltk_package(folder: Path, sample: Path) -> tuple[Path, dict[str, str]]:
    """A small nltk corpus package (a word list from real WikiText-2 text), zipped as nltk serves them."""
    words = sorted(
        {
            w
            for line in (sample / "wikitext2_valid_test_docs.jsonl").read_text().splitlines()[:5]
            for w in json.loads(line)["text"].split()
            if w.isalpha()
        }
    )
    archive = folder / f"{NLTK_PACKAGE}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"{NLTK_PACKAGE}/words.txt", "\n".join(words) + "\n")
        z.writestr(f"{NLTK_PACKAGE}/README", "Words of WikiText-2 (CC BY-SA 3.0), for titanenv's tests.\n")
    data = archive.read_bytes()
    unzipped = sum(i.file_size for i in zipfile.ZipFile(archive).infolist())
    return archive, {
        "size": str(len(data)),
        "unzipped_size": str(unzipped),
        "checksum": hashlib.md5(data).hexdigest(),
        "sha256_checksum": hashlib.sha256(data).hexdigest(),
    }


def nltk_index(folder: Path, sample: Path) -> str:
    """An nltk ``index.xml`` with one package in ``folder``; returns its ``file://`` URL (``NLTK_DOWNLOAD_URL``).

    nltk (3.10) refuses HTTP to loopback and private addresses (SSRF protection), and reads
    ``file://`` URLs only inside its data folders: put ``folder`` on ``NLTK_DATA`` too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    archive, attrs = build_nltk_package(folder, sample)
    attrs_text = " ".join(f'{k}="{v}"' for k, v in attrs.items())
    (folder / "index.xml").write_text(
        f'<?xml version="1.0"?>\n<nltk_data><packages>\n<package id="{NLTK_PACKAGE}" name="Test words" '
        f'subdir="corpora" url="{archive.as_uri()}" {attrs_text} unzip="1" />\n'
        "</packages><collections></collections></nltk_data>\n"
    )
    return (folder / "index.xml").as_uri()
