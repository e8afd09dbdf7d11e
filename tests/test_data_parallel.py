"""Workers and array tasks never change the bytes; shuffle and the validation split are seeded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from titanenv.data import indexed, manifest
from titanenv.data import preprocess as pp
from titanenv.data import tokenizer as toklib


@pytest.fixture(scope="module")
def corpus(sample, tmp_path_factory):
    """The first 50 WikiText-2 articles (real text, 1 MB) as JSONL, plus the C4 samples (compressed: one piece each)."""
    path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
    with open(sample / "wikitext2_valid_test_docs.jsonl", "rb") as f:
        path.write_bytes(b"".join(f.readline() for _ in range(50)))
    return [path, *sorted(sample.glob("c4-sample.*.json.gz"))]


DOCS = 50 + 30


def run(sample, prefix, corpus, **kw):
    cfg = pp.PreprocessConfig(
        inputs=corpus,
        output_prefix=prefix,
        tokenizer_model=str(sample / "gpt2_tokenizer.json"),
        append_eod=True,
        piece_mb=0.1,
        **kw,
    )
    return pp.run(cfg)


def same_bytes(a, b) -> bool:
    return all(path(a).read_bytes() == path(b).read_bytes() for path in (indexed.bin_path, indexed.idx_path))


def docs_of(prefix):
    ds = indexed.IndexedDataset(prefix)
    return [tuple(ds[i].tolist()) for i in range(len(ds))]


@pytest.mark.parametrize("extra", [{}, {"shuffle": True, "val_fraction": 0.1, "seed": 7}])
def test_array_tasks_and_workers_give_the_single_run_bytes(sample, tmp_path, corpus, extra):
    single = run(sample, tmp_path / "single", corpus, **extra)
    for i in range(3):
        run(sample, tmp_path / "array", corpus, shard_index=i, num_shards=3, workers=2 if i == 1 else 1, **extra)
    merged = pp.merge(tmp_path / "array", 3)
    splits = ["train", "val"] if extra else ["train"]
    for split in splits:
        a, b = single["outputs"][split]["text"], merged["outputs"][split]["text"]
        assert same_bytes(a, b), split
    for key in ("documents_in", "documents_written", "tokens", "documents_written_by_split", "rejected_by_reason"):
        assert merged[key] == single[key], key
    assert merged["documents_written"] == DOCS
    assert {i["path"] for i in merged["inputs"]} == {str(p.resolve()) for p in corpus}
    assert all(i["sha256"] == manifest.file_sha256(i["path"]) for i in merged["inputs"])
    assert not (tmp_path / "array.parts").exists() and not (tmp_path / "single.parts").exists()


def test_shuffle_and_split_are_seeded_and_lose_nothing(sample, tmp_path, corpus):
    plain = docs_of(run(sample, tmp_path / "plain", corpus)["outputs"]["train"]["text"])
    m = run(sample, tmp_path / "a", corpus, shuffle=True, val_fraction=0.2, seed=1)
    train, val = docs_of(tmp_path / "a"), docs_of(tmp_path / "a_val")
    assert sorted(train + val) == sorted(plain)  # a permutation and a partition: nothing lost or doubled
    assert train != [d for d in plain if d in set(train)]  # the order did change
    assert 0.05 < len(val) / len(plain) < 0.4
    assert m["split"] == {"val_fraction": 0.2, "seed": 1, "shuffle": True}
    assert m["documents_written_by_split"] == {"train": len(train), "val": len(val)}
    run(sample, tmp_path / "b", corpus, shuffle=True, val_fraction=0.2, seed=1, workers=2)
    assert same_bytes(tmp_path / "a", tmp_path / "b") and same_bytes(tmp_path / "a_val", tmp_path / "b_val")
    run(sample, tmp_path / "c", corpus, shuffle=True, val_fraction=0.2, seed=2)
    assert docs_of(tmp_path / "c") != train
    # The split is keyed on the text alone: without shuffle the same documents go to validation.
    run(sample, tmp_path / "d", corpus, val_fraction=0.2, seed=1)
    assert sorted(docs_of(tmp_path / "d_val")) == sorted(val)


def test_manifest_records_what_made_the_data(sample, tmp_path, corpus):
    m = run(sample, tmp_path / "o", corpus)
    on_disk = json.loads((tmp_path / "o.manifest.json").read_text())
    assert on_disk == m
    info = toklib.load(sample / "gpt2_tokenizer.json")
    assert m["tokenizer"] == {"path": str(info.path), "sha256": info.sha256, "vocab_size": 50257, "eod_id": 50256}
    assert m["dtype"] == "uint16" and m["titanenv_version"] and m["split"]["seed"] == 1234
    assert m["output"] == {
        "prefix": str(tmp_path / "o"),
        "split": "train",
        "key": "text",
        "documents": DOCS,
        "tokens": indexed.IndexedDataset(tmp_path / "o").num_tokens,
        "max_token_id": int(np.fromfile(tmp_path / "o.bin", np.uint16).max()),
    }
    assert [(i["path"], i["size"]) for i in m["inputs"]] == [(str(p.resolve()), p.stat().st_size) for p in corpus]
    assert m["documents_in"] == m["documents_written"] + m["documents_rejected"]


def test_check_tokenizer_refuses_another_tokenizer(sample, tmp_path, corpus):
    run(sample, tmp_path / "o", corpus[1:])
    gpt2, dolma2 = toklib.load(sample / "gpt2_tokenizer.json"), toklib.load(sample / "dolma2_tokenizer.json")
    assert manifest.check_tokenizer(tmp_path / "o", gpt2)["tokenizer"]["sha256"] == gpt2.sha256
    assert manifest.check_tokenizer(tmp_path / "o.manifest.json", gpt2.sha256)
    with pytest.raises(manifest.TokenizerMismatch, match="dolma2_tokenizer.json|gpt2_tokenizer.json"):
        manifest.check_tokenizer(tmp_path / "o", dolma2)
    assert manifest.check_tokenizer(tmp_path / "no-manifest", gpt2) is None


def test_multiple_json_keys_write_one_prefix_each(sample, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text(
        "".join(json.dumps({"title": f"Title {i}", "text": f"Body number {i}, real enough."}) + "\n" for i in range(20))
    )
    for i in range(2):
        pp.run(
            pp.PreprocessConfig(
                inputs=[path],
                output_prefix=tmp_path / "k",
                tokenizer_model=str(sample / "gpt2_tokenizer.json"),
                json_keys=("title", "text"),
                shard_index=i,
                num_shards=2,
                piece_mb=0.0003,
            )
        )
    m = pp.merge(tmp_path / "k", 2)
    assert m["outputs"] == {"train": {"title": str(tmp_path / "k_title"), "text": str(tmp_path / "k_text")}}
    assert len(indexed.IndexedDataset(tmp_path / "k_title")) == len(indexed.IndexedDataset(tmp_path / "k_text")) == 20
    assert manifest.read(tmp_path / "k_text")["output"]["key"] == "text"


def test_dry_run_writes_nothing(sample, tmp_path, corpus, capsys):
    out = tmp_path / "dry"
    plan = pp.dry_run(
        pp.PreprocessConfig(
            inputs=corpus,
            output_prefix=out / "o",
            tokenizer_model=str(sample / "gpt2_tokenizer.json"),
            num_shards=3,
            shard_index=1,
            piece_mb=0.2,
        )
    )
    text = capsys.readouterr().out
    assert not out.exists()
    assert sorted(i for s in plan["shards"] for i in s) == list(range(plan["pieces"]))
    assert "<- this task" in text and "dry run: nothing written" in text and str(out / "o-00001-of-00003") in text


def test_merge_names_an_unfinished_task(sample, tmp_path, corpus):
    run(sample, tmp_path / "a", corpus[1:], shard_index=0, num_shards=2)
    with pytest.raises(FileNotFoundError, match="a-00001-of-00002.manifest.json: array task 1 has not finished"):
        pp.merge(tmp_path / "a", 2)


def test_merge_streams_many_documents(tmp_path):
    # 3 x 400k tiny documents: more than one block (1M entries) of sizes and pointers.
    rng = np.random.default_rng(0)
    for i in range(3):
        with indexed.IndexedDatasetWriter(tmp_path / f"s{i}", np.uint16) as w:
            sizes = rng.integers(1, 4, 400_000).astype(np.int32)
            w.add_raw(rng.integers(0, 50000, int(sizes.sum())).astype(np.uint16).tobytes(), sizes)
    docs, tokens = indexed.concat([tmp_path / f"s{i}" for i in range(3)], tmp_path / "all", np.uint16)
    ds = indexed.IndexedDataset(tmp_path / "all")
    assert docs == len(ds) == 1_200_000 and tokens == ds.num_tokens
    s1 = indexed.IndexedDataset(tmp_path / "s1")
    assert ds[400_000 + 123].tolist() == s1[123].tolist()


def test_array_tasks_get_contiguous_blocks_balanced_by_bytes():
    from titanenv.data.pieces import Piece, assign

    plan = [Piece(i, (), size=s) for i, s in enumerate([10, 10, 10, 100, 1, 1, 1, 0])]
    for count in (1, 2, 3, 4, 9):
        blocks = [[p.index for p in assign(plan, i, count)] for i in range(count)]
        assert sum(blocks, []) == list(range(len(plan)))  # contiguous, in order, each piece once
    assert [[p.index for p in assign(plan, i, 2)] for i in range(2)] == [[0, 1, 2], [3, 4, 5, 6, 7]]
    with pytest.raises(ValueError, match="--shard-index 2 is outside 0..1"):
        assign(plan, 2, 2)


def test_more_array_tasks_than_pieces(sample, tmp_path, corpus):
    run(sample, tmp_path / "single", corpus[1:])  # the three C4 files: three pieces
    for i in range(5):  # two tasks get no piece, and still write an (empty) output and a manifest
        m = run(sample, tmp_path / "array", corpus[1:], shard_index=i, num_shards=5)
        assert m["documents_in"] == m["output"]["documents"]
    merged = pp.merge(tmp_path / "array", 5)
    assert same_bytes(tmp_path / "single", tmp_path / "array") and merged["documents_written"] == 30
