"""Tokenizer backends: gigatoken gives the reference's ids on real text, and is refused when it does not."""

from __future__ import annotations

import gzip
import importlib.util
import json

import pytest
from tokenizers import Tokenizer

from conftest import require
from titanenv.data import backends, indexed
from titanenv.data import preprocess as pp


@pytest.fixture(scope="module")
def gigatoken():
    require(
        importlib.util.find_spec("gigatoken") is not None, "gigatoken is not installed (pip install gigatoken==0.10.0)"
    )


def wikitext(sample):
    with open(sample / "wikitext2_valid_test_docs.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


def c4(sample):
    docs = []
    for p in sorted(sample.glob("c4-sample.*.json.gz")):
        with gzip.open(p, "rt") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    return docs


@pytest.mark.parametrize("name", ["gpt2_tokenizer.json", "dolma2_tokenizer.json"])
def test_gigatoken_ids_equal_the_reference_on_real_text(gigatoken, sample, tmp_path, name):
    inputs = [sample / "wikitext2_valid_test_docs.jsonl", *sorted(sample.glob("c4-sample.*.json.gz"))]
    m = pp.run(
        pp.PreprocessConfig(
            inputs=inputs,
            output_prefix=tmp_path / "fast",
            tokenizer_model=str(sample / name),
            append_eod=True,
            tokenizer_backend="gigatoken",
        )
    )
    assert m["backend"]["used"] == "gigatoken" and m["backend"]["checked_documents"] > 0
    ref = Tokenizer.from_file(str(sample / name))
    eod = ref.token_to_id("<|endoftext|>")
    ds = indexed.IndexedDataset(tmp_path / "fast")
    docs = wikitext(sample) + c4(sample)
    assert len(ds) == len(docs) == 152
    for i, text in enumerate(docs):
        assert ds[i].tolist() == ref.encode(text, add_special_tokens=False).ids + [eod]


def test_auto_falls_back_to_hf_when_gigatoken_differs(gigatoken, sample, tmp_path, caplog):
    # A real variant of GPT-2's tokenizer: <|endoftext|> may only match as a whole word.
    # tokenizers honours single_word; gigatoken 0.10.0 ignores it, so "a<|endoftext|>b" differs.
    config = json.loads((sample / "gpt2_tokenizer.json").read_text())
    config["added_tokens"][0]["single_word"] = True
    tok = tmp_path / "single_word.json"
    tok.write_text(json.dumps(config))
    doc = tmp_path / "doc.jsonl"
    doc.write_text(json.dumps({"text": wikitext(sample)[0][:2000] + " a<|endoftext|>b"}) + "\n")
    common = dict(inputs=[doc], tokenizer_model=str(tok), append_eod=True)
    with caplog.at_level("WARNING"):
        m = pp.run(pp.PreprocessConfig(output_prefix=tmp_path / "auto", tokenizer_backend="auto", **common))
    assert m["backend"]["used"] == "hf"
    assert "differ" in m["backend"]["reason"] and "using hf, not gigatoken" in caplog.text
    ref = Tokenizer.from_file(str(tok))
    text = json.loads(doc.read_text())["text"]
    assert indexed.IndexedDataset(tmp_path / "auto")[0].tolist() == ref.encode(text, add_special_tokens=False).ids + [
        50256
    ]
    with pytest.raises(backends.BackendMismatch, match="differ from the hf reference"):
        pp.run(pp.PreprocessConfig(output_prefix=tmp_path / "strict", tokenizer_backend="gigatoken", **common))


def test_unsupported_tokenizer_falls_back_and_says_why(gigatoken, sample, tmp_path):
    doc = tmp_path / "doc.jsonl"
    doc.write_text(json.dumps({"text": wikitext(sample)[1][:3000]}) + "\n")
    m = pp.run(
        pp.PreprocessConfig(
            inputs=[doc],
            output_prefix=tmp_path / "o",
            append_eod=True,
            tokenizer_model=str(sample / "torchtitan_test_tokenizer"),
        )
    )
    assert m["backend"]["used"] == "hf" and "cannot load" in m["backend"]["reason"]


def test_hf_backend_skips_the_check(sample, tmp_path):
    doc = tmp_path / "doc.jsonl"
    doc.write_text(json.dumps({"text": "short real sentence."}) + "\n")
    m = pp.run(
        pp.PreprocessConfig(
            inputs=[doc],
            output_prefix=tmp_path / "o",
            tokenizer_model=str(sample / "gpt2_tokenizer.json"),
            tokenizer_backend="hf",
        )
    )
    assert m["backend"] == {
        "requested": "hf",
        "used": "hf",
        "reason": "requested",
        "checked_documents": 0,
        "checked_tokens": 0,
    }
