"""Megatron compatibility: megatron-core reads our output, and Megatron's own method writes the same bytes.

The reference is ``megatron.core.datasets.indexed_dataset`` from the ``megatron-core`` package
on PyPI, not our reader. ``tools/preprocess_data.py`` is not in that package, so its loop (one
``encode`` per document, ``IndexedDatasetBuilder.add_document`` in one process) is reproduced here
with megatron-core's own builder.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import require
from titanenv.data import preprocess as pp

TOKENIZERS = [("gpt2_tokenizer.json", "<|endoftext|>", np.uint16), ("dolma2_tokenizer.json", "<|endoftext|>", np.int32)]


@pytest.fixture(scope="module")
def megatron():
    require(
        importlib.util.find_spec("megatron") is not None,
        "megatron-core is not installed (pip install megatron-core==0.16.1)",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Apex/Transformer Engine not installed" notes on import
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def corpus(sample, tmp_path):
    """Real text: the C4 samples and the first 20 WikiText-2 articles, as one JSONL file."""
    docs = []
    for p in sorted(sample.glob("c4-sample.*.json.gz")):
        with gzip.open(p, "rt") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    with open(sample / "wikitext2_valid_test_docs.jsonl") as f:
        docs += [json.loads(line)["text"] for line in f][:20]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


@pytest.mark.parametrize("name,eod_token,dtype", TOKENIZERS)
def test_megatron_core_reads_our_output(megatron, sample, tmp_path, name, eod_token, dtype):
    path, docs = corpus(sample, tmp_path)
    pp.run(
        pp.PreprocessConfig(
            inputs=[path],
            output_prefix=tmp_path / "ours",
            tokenizer_model=str(sample / name),
            append_eod=True,
            workers=2,
            piece_mb=0.05,
            tokenizer_backend="hf",
        )
    )
    tok = Tokenizer.from_file(str(sample / name))
    eod = tok.token_to_id(eod_token)
    ds = megatron.IndexedDataset(str(tmp_path / "ours"), mmap=True)
    assert len(ds) == len(docs)
    assert ds.index.dtype == dtype
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    for i, text in enumerate(docs):
        expected = tok.encode(text, add_special_tokens=False).ids + [eod]
        assert ds[i].tolist() == expected
        assert ds.sequence_lengths[i] == len(expected)


@pytest.mark.parametrize("name,eod_token,dtype", TOKENIZERS)
def test_bytes_equal_megatrons_method(megatron, sample, tmp_path, name, eod_token, dtype):
    path, docs = corpus(sample, tmp_path)
    tok = Tokenizer.from_file(str(sample / name))
    eod = tok.token_to_id(eod_token)
    dtype = megatron.DType.optimal_dtype(tok.get_vocab_size(with_added_tokens=True))
    builder = megatron.IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=dtype)
    for text in docs:  # tools/preprocess_data.py: Encoder.encode, then add_document in the parent
        ids = tok.encode(text, add_special_tokens=False).ids + [eod]
        builder.add_document(ids, [len(ids)])
    builder.finalize(str(tmp_path / "megatron.idx"))
    pp.run(
        pp.PreprocessConfig(
            inputs=[path],
            output_prefix=tmp_path / "ours",
            tokenizer_model=str(sample / name),
            append_eod=True,
            piece_mb=0.05,
        )
    )
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"megatron.{ext}").read_bytes()
