"""titanenv preprocess refuses what would silently lose data: wrong keys, empty outputs, huge documents,
special-token text nobody was told about, and input files a folder skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from titanenv.data import indexed, manifest
from titanenv.data import preprocess as pp

CLI = [sys.executable, "-c", "from titanenv.cli import main; main()", "preprocess"]
EOT = "<|endoftext|>"  # GPT-2's only special token, id 50256


@pytest.fixture(scope="module")
def texts(sample):
    with open(sample / "wikitext2_valid_test_docs.jsonl") as f:
        return [json.loads(line)["text"][:2000] for line in f][:20]


@pytest.fixture(scope="module")
def gpt2(sample):
    return Tokenizer.from_file(str(sample / "gpt2_tokenizer.json"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(sample, tmp_path, inputs, name="out", **kw):
    kw.setdefault("tokenizer_backend", "hf")
    return pp.PreprocessConfig(
        inputs=inputs,
        output_prefix=tmp_path / name,
        tokenizer_model=str(sample / "gpt2_tokenizer.json"),
        append_eod=True,
        **kw,
    )


def cli(sample, tmp_path, *args):
    out = subprocess.run(
        [
            *CLI,
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-model",
            str(sample / "gpt2_tokenizer.json"),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    return out.returncode, " ".join((out.stdout + out.stderr).split())  # rich wraps long lines


# --- item 2: a wrong --json-keys, and empty outputs -------------------------------------------------------------


def test_wrong_json_key_stops_with_rc2_and_names_the_fields(sample, tmp_path, texts):
    data = write_jsonl(tmp_path / "x.jsonl", [{"id": i, "text": texts[i % 20]} for i in range(100)])
    rc, out = cli(sample, tmp_path, "--input", str(data), "--json-keys", "content", "--append-eod")
    assert rc == 2, out
    assert "'content'" in out and "text" in out and "id" in out and str(data) in out and "Traceback" not in out
    assert not (tmp_path / "cli.bin").exists() or (tmp_path / "cli.bin").stat().st_size > 0


def test_wrong_second_json_key_stops_too(sample, tmp_path, texts):
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in texts])
    with pytest.raises(ValueError, match=r"'content'.*fields: text"):
        pp.run(cfg(sample, tmp_path, [data], json_keys=("text", "content")))
    assert not (tmp_path / "out_text.manifest.json").exists()


def test_a_key_missing_on_some_documents_keeps_every_output_filled_and_aligned(sample, tmp_path, texts, gpt2):
    rows = [{"text": t, "title": t[:30]} if i % 2 == 0 else {"text": t} for i, t in enumerate(texts)]
    data = write_jsonl(tmp_path / "x.jsonl", rows)
    m = pp.run(cfg(sample, tmp_path, [data], json_keys=("text", "title")))
    assert m["documents_in"] == 20 and m["documents_written"] == 10 and m["rejected_by_reason"] == {"missing_key": 10}
    text, title = indexed.IndexedDataset(tmp_path / "out_text"), indexed.IndexedDataset(tmp_path / "out_title")
    assert len(text) == len(title) == 10  # one document is in every key's output or in none: index i is one document
    for i, row in enumerate(rows[::2]):
        assert text[i].tolist() == gpt2.encode(row["text"], add_special_tokens=False).ids + [50256]
        assert title[i].tolist() == gpt2.encode(row["title"], add_special_tokens=False).ids + [50256]


def test_every_document_rejected_is_an_error_unless_allow_empty(sample, tmp_path):
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": "   "} for _ in range(5)])
    with pytest.raises(pp.EmptyOutput, match=r"out: no tokens.*5 documents.*empty_text.*--allow-empty"):
        pp.run(cfg(sample, tmp_path, [data]))
    assert not manifest.path_for(tmp_path / "out").exists()
    rc, out = cli(sample, tmp_path, "--input", str(data))
    assert rc == 2 and "--allow-empty" in out, out
    m = pp.run(cfg(sample, tmp_path, [data], allow_empty=True))
    assert m["tokens"] == 0 and m["output"]["max_token_id"] == -1 and m["documents_rejected"] == 5


def test_input_without_documents_is_an_error(sample, tmp_path):
    data = tmp_path / "blank.jsonl"
    data.write_text("\n\n  \n")
    with pytest.raises(pp.EmptyOutput, match="0 documents"):
        pp.run(cfg(sample, tmp_path, [data]))


def test_array_task_without_pieces_succeeds_but_an_empty_total_fails_the_merge(sample, tmp_path, texts):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in texts])
    # one piece, three tasks: two have nothing to do, which is fine
    tokens = [
        pp.run(cfg(sample, tmp_path, [good], name="small", shard_index=i, num_shards=3))["tokens"] for i in range(3)
    ]
    assert sorted(tokens)[:2] == [0, 0] and max(tokens) > 0
    assert pp.merge(tmp_path / "small", 3)["documents_written"] == 20

    bad = [write_jsonl(tmp_path / f"bad{i}.jsonl", [{"text": ""} for _ in range(6)]) for i in range(2)]
    for i in range(2):  # two files, one piece each, one per task: each task rejects all its documents
        with pytest.raises(pp.EmptyOutput, match="every document"):
            pp.run(cfg(sample, tmp_path, bad, name="bad", shard_index=i, num_shards=2))
        pp.run(cfg(sample, tmp_path, bad, name="bad", shard_index=i, num_shards=2, allow_empty=True))
    with pytest.raises(pp.EmptyOutput, match=r"bad: no tokens in any of the 2 array tasks"):
        pp.merge(tmp_path / "bad", 2)
    assert not manifest.path_for(tmp_path / "bad").exists()
    assert pp.merge(tmp_path / "bad", 2, allow_empty=True)["tokens"] == 0


def test_slurm_array_task_fails_when_it_rejects_everything_and_the_merge_fails_on_an_empty_total(sample, tmp_path):
    import os

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"} if i % 2 else {"text": ""} for i in range(6)])
    args = [
        *CLI,
        str(bad),
        "--output-prefix",
        str(tmp_path / "arr"),
        "--tokenizer-model",
        str(sample / "gpt2_tokenizer.json"),
    ]
    rcs = []
    for task in range(2):  # one piece: one task gets it and rejects all of it, the other gets nothing
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"}
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        rcs.append((done.returncode, " ".join(done.stderr.split())))
    assert sorted(rc for rc, _ in rcs) == [0, 2], rcs
    assert any("every document was rejected" in err and "--allow-empty" in err for _, err in rcs), rcs
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str([rc for rc, _ in rcs].index(2)), "SLURM_ARRAY_TASK_COUNT": "2"}
    assert subprocess.run([*args, "--allow-empty"], capture_output=True, env=env).returncode == 0
    merge = [*CLI, "--merge", "--output-prefix", str(tmp_path / "arr"), "--num-shards", "2"]
    done = subprocess.run(merge, capture_output=True, text=True)
    assert done.returncode == 2 and "no tokens in any of the 2 array tasks" in " ".join(done.stderr.split())


# --- item 4 (part): max_token_id in every output's manifest -------------------------------------------------------


def test_manifest_records_max_token_id_per_output(sample, tmp_path, texts):
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": t, "title": t[:20]} for t in texts])
    pp.run(cfg(sample, tmp_path, [data], json_keys=("text", "title"), val_fraction=0.3))
    for split, prefix in (("train", "out"), ("val", "out_val")):
        for key in ("text", "title"):
            m = manifest.read(tmp_path / f"{prefix}_{key}")
            ds = indexed.IndexedDataset(tmp_path / f"{prefix}_{key}")
            assert m["output"]["split"] == split and m["output"]["key"] == key
            assert m["output"]["max_token_id"] == int(np.concatenate([ds[i] for i in range(len(ds))]).max()) == 50256


# --- item 5: special-token text -----------------------------------------------------------------------------------


def test_special_token_text_is_parsed_by_default_and_counted(sample, tmp_path, texts, gpt2):
    rows = [{"text": f"{t[:200]} {EOT} after"} if i < 3 else {"text": t} for i, t in enumerate(texts)]
    m = pp.run(cfg(sample, tmp_path, [write_jsonl(tmp_path / "x.jsonl", rows)]))
    assert m["documents_with_special_text"] == 3 and m["special_tokens"] == "parse"
    ds = indexed.IndexedDataset(tmp_path / "out")
    assert 50256 in ds[0].tolist()[:-1]  # Megatron's behaviour: the text became the EOD id
    assert ds[0].tolist() == gpt2.encode(rows[0]["text"], add_special_tokens=False).ids + [50256]


@pytest.mark.parametrize("backend", ["hf", "auto"])
def test_plain_special_tokens_encode_the_text_as_ordinary_text(sample, tmp_path, texts, backend):
    rows = [{"text": f"{t[:200]} {EOT} after"} for t in texts[:4]]
    m = pp.run(
        cfg(
            sample,
            tmp_path,
            [write_jsonl(tmp_path / "x.jsonl", rows)],
            special_tokens="plain",
            tokenizer_backend=backend,
        )
    )
    assert m["documents_with_special_text"] == 4 and m["special_tokens"] == "plain"
    ref = Tokenizer.from_file(str(sample / "gpt2_tokenizer.json"))
    ref.encode_special_tokens = True
    ds = indexed.IndexedDataset(tmp_path / "out")
    for i, row in enumerate(rows):
        got = ds[i].tolist()
        assert got == ref.encode(row["text"], add_special_tokens=False).ids + [50256]
        assert 50256 not in got[:-1]


def test_special_tokens_flag_is_validated_and_on_the_cli(sample, tmp_path, texts):
    with pytest.raises(ValueError, match="--special-tokens must be parse or plain"):
        cfg(sample, tmp_path, ["x"], special_tokens="strip")
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": f"a {EOT} b"}])
    rc, out = cli(sample, tmp_path, str(data), "--append-eod")
    assert rc == 0 and "documents holding special-token text: 1, parsed" in out, out
    rc, out = cli(sample, tmp_path, str(data), "--special-tokens", "plain", "--append-eod")
    assert rc == 0 and "documents holding special-token text: 1, tokenized as plain text" in out, out
    assert manifest.read(tmp_path / "cli")["special_tokens"] == "plain"


def test_gigatoken_in_plain_mode_is_exact_or_refused(sample, tmp_path, texts):
    rows = [{"text": f"{t[:200]} {EOT}{EOT} x{EOT}y"} for t in texts[:4]]
    c = cfg(
        sample,
        tmp_path,
        [write_jsonl(tmp_path / "x.jsonl", rows)],
        special_tokens="plain",
        tokenizer_backend="gigatoken",
    )
    try:
        m = pp.run(c)
    except pp.backends.BackendMismatch as e:
        assert "plain" in str(e)
        return
    ref = Tokenizer.from_file(str(sample / "gpt2_tokenizer.json"))
    ref.encode_special_tokens = True
    ds = indexed.IndexedDataset(tmp_path / "out")
    assert m["backend"]["used"] == "gigatoken"
    assert [ds[i].tolist() for i in range(len(ds))] == [
        ref.encode(r["text"], add_special_tokens=False).ids + [50256] for r in rows
    ]


def test_auto_falls_back_to_hf_and_says_why_when_gigatoken_would_parse_in_plain_mode(
    sample, tmp_path, texts, monkeypatch, caplog
):
    # as if gigatoken could not leave special tokens out: the exactness check must catch it
    monkeypatch.setattr(pp.backends, "without_special_tokens", lambda raw: raw)
    pp.backends.release()
    rows = [{"text": f"{t[:100]} {EOT} after"} for t in texts[:3]]
    with caplog.at_level("INFO"):
        m = pp.run(
            cfg(
                sample,
                tmp_path,
                [write_jsonl(tmp_path / "x.jsonl", rows)],
                special_tokens="plain",
                tokenizer_backend="auto",
            )
        )
    pp.backends.release()
    assert m["backend"]["used"] == "hf"
    assert "differ" in m["backend"]["reason"] and "--special-tokens plain" in m["backend"]["reason"]
    assert "using hf, not gigatoken" in caplog.text
    assert 50256 not in indexed.IndexedDataset(tmp_path / "out")[0].tolist()[:-1]


# --- item 12: files a folder input skips ----------------------------------------------------------------------------


def test_folder_input_lists_and_counts_the_files_it_skips(sample, tmp_path, texts, capsys):
    folder = tmp_path / "corpus"
    (folder / "old.parts").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in texts])
    skipped = [
        folder / n for n in ("old.bin", "old.idx", "old.manifest.json", ".hidden.jsonl", "old.parts/000000.done.json")
    ]
    for p in skipped:
        p.write_text("x")
    plan = pp.dry_run(cfg(sample, tmp_path, [folder]))
    out = capsys.readouterr().out
    assert "skipped 5 files" in out
    for p in skipped:
        assert str(p) in out
    assert sorted(plan["skipped"]) == sorted(map(str, skipped))
    m = pp.run(cfg(sample, tmp_path, [folder]))
    assert m["files_skipped"]["count"] == 5
    assert set(m["files_skipped"]["examples"]) <= set(map(str, skipped)) and m["files_skipped"]["examples"]
    assert m["documents_written"] == 20


# --- item 13: --max-document-chars ----------------------------------------------------------------------------------


def test_too_long_documents_are_rejected_and_counted(sample, tmp_path, texts):
    rows = [{"text": t} for t in texts[:5]] + [{"text": "word " * 600}] + [{"text": texts[5]}]
    data = write_jsonl(tmp_path / "x.jsonl", rows)
    m = pp.run(cfg(sample, tmp_path, [data], max_document_chars=2500))
    long_ones = [i for i, r in enumerate(rows) if len(r["text"]) > 2500]
    assert (
        m["rejected_by_reason"] == {"too_long": len(long_ones)} == {"too_long": 1} and m["max_document_chars"] == 2500
    )
    assert m["rejected_examples"]["too_long"][0] == f"{data}:{long_ones[0] + 1}"
    assert m["documents_in"] == m["documents_written"] + m["documents_rejected"] == 7
    with pytest.raises(pp.BadDocument, match=r"x.jsonl:\d+: too_long"):
        pp.run(cfg(sample, tmp_path, [data], name="fail", max_document_chars=2500, on_error="fail"))
    text = tmp_path / "one.txt"  # a plain-text file is one document, checked the same way
    text.write_text("x" * 2000)
    with pytest.raises(pp.EmptyOutput, match="too_long"):
        pp.run(cfg(sample, tmp_path, [text], name="txt", max_document_chars=1500))


def test_max_document_chars_has_a_generous_default_and_a_cli_flag(sample, tmp_path, texts):
    c = cfg(sample, tmp_path, ["x"])
    assert c.max_document_chars == pp.DEFAULT_MAX_DOCUMENT_CHARS >= 1_000_000
    with pytest.raises(ValueError, match="--max-document-chars must be positive"):
        cfg(sample, tmp_path, ["x"], max_document_chars=0)
    data = write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in texts[:3]] + [{"text": "y" * 5000}])
    rc, out = cli(sample, tmp_path, str(data), "--max-document-chars", "3000")
    assert rc == 0 and "too_long" in out, out
