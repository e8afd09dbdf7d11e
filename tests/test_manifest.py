"""The typed data -> train contract: Manifest (read, write, merge), counts that add, derived settings."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from titanenv.data import manifest as manifestlib
from titanenv.data import preprocess as pp
from titanenv.data import settings, sources, worker
from titanenv.data import tokenizer as toklib
from titanenv.data.manifest import Counts, Manifest, ManifestError


@pytest.fixture(scope="module")
def made(sample, tmp_path_factory):
    """Two array tasks of a small real run (WikiText-2 documents, GPT-2), merged."""
    folder = tmp_path_factory.mktemp("made")
    data = folder / "docs.jsonl"
    docs = [line for line in (sample / "wikitext2_valid_test_docs.jsonl").read_text().splitlines() if line.strip()]
    data.write_text("\n".join(docs[:3] + ['{"id": 1}'] + docs[3:40]) + "\n")  # one rejected (missing_key)
    common = dict(inputs=[data], tokenizer_model=str(sample / "gpt2_tokenizer.json"), append_eod=True, piece_mb=0.2)
    single = pp.run(pp.PreprocessConfig(output_prefix=folder / "single", **common))
    tasks = [
        pp.run(pp.PreprocessConfig(output_prefix=folder / "array", shard_index=i, num_shards=2, **common))
        for i in range(2)
    ]
    return folder, single, tasks, pp.merge(folder / "array", 2)


def test_a_run_returns_the_typed_manifest_it_wrote(made, sample):
    folder, single, _, _ = made
    assert isinstance(single, Manifest)
    on_disk = json.loads((folder / "single.manifest.json").read_text())
    assert single.to_json() == on_disk and single == on_disk  # the mapping view is the JSON
    back = Manifest.read(folder / "single")
    assert back is not None and back.to_json() == on_disk
    info = toklib.load(sample / "gpt2_tokenizer.json")
    assert back.tokenizer == manifestlib.TokenizerRecord(str(info.path), info.sha256, 50257, 50256)
    assert back.counts.documents_in == back.counts.documents_written + back.counts.documents_rejected == 41
    assert back.counts.rejected_by_reason == {"missing_key": 1}
    assert (
        back.output is not None and back.output.prefix == str(folder / "single") and back.output.max_token_id == 50256
    )
    assert back.json_keys == ("text",) and back.split.seed == 1234 and back.shard.count == 1
    assert all(isinstance(i, manifestlib.InputRecord) and i.sha256 for i in back.inputs)


def test_merge_adds_the_tasks_counts_under_the_same_keys(made):
    folder, single, tasks, merged = made
    assert merged.shard == manifestlib.ShardRecord(merged_from=2) and merged.to_json()["shard"] == {"merged_from": 2}
    assert merged.counts == dataclasses.replace(single.counts, rejected_examples=merged.counts.rejected_examples)
    assert merged.counts.documents_written_by_split == single.counts.documents_written_by_split
    assert merged.pieces.count == sum(t.pieces.count for t in tasks) == single.pieces.planned
    assert set(merged.to_json()) == set(single.to_json())  # one set of keys on disk, merged or not
    again = Manifest.merge(tasks, merged.outputs, "x")
    assert again.counts == merged.counts and again.fingerprint == merged.fingerprint
    other = dataclasses.replace(tasks[1], append_eod=False)
    with pytest.raises(ValueError, match="the array tasks of x disagree on append_eod"):
        Manifest.merge([tasks[0], other], merged.outputs, "x")


def _rewrite(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "change, field, problem",
    [
        (lambda m: m["tokenizer"].pop("sha256"), "tokenizer.sha256", "is missing"),
        (lambda m: m.pop("fingerprint"), "fingerprint", "is missing"),
        (lambda m: m.pop("output"), "output", "is missing"),
        (lambda m: m.update(documents_in="41"), "documents_in", "must be an integer, not a string"),
        (lambda m: m["tokenizer"].update(eod_id="50256"), "tokenizer.eod_id", "must be an integer or null"),
        (lambda m: m["inputs"][0].update(size=None), "inputs[0].size", "must be an integer, not null"),
        (lambda m: m.update(append_eod=1), "append_eod", "must be true or false"),
        (lambda m: m.update(json_keys="text"), "json_keys", "must be a list"),
    ],
)
def test_a_missing_or_mistyped_field_is_named_with_the_file(made, tmp_path, change, field, problem):
    path = tmp_path / "m.manifest.json"
    path.write_text((made[0] / "single.manifest.json").read_text())
    _rewrite(path, change)
    with pytest.raises(ManifestError, match="rerun `titanenv preprocess`") as e:
        Manifest.read(path)
    assert (e.value.path, e.value.field) == (path, field) and problem in e.value.problem
    assert str(path) in str(e.value) and repr(field) in str(e.value)


def test_counts_that_do_not_add_up_are_refused(made, tmp_path):
    c = made[1].counts
    with pytest.raises(ManifestError, match="documents_in.*is 42, but documents_written 40 \\+ documents_rejected 1"):
        dataclasses.replace(c, documents_in=42)
    with pytest.raises(ManifestError, match="documents_written_by_split adds up to"):
        dataclasses.replace(c, documents_written=c.documents_written + 1, documents_in=c.documents_in + 1)
    with pytest.raises(ManifestError, match="tokens_by_split adds up to"):
        dataclasses.replace(c, tokens=c.tokens + 1)
    path = tmp_path / "m.manifest.json"
    path.write_text((made[0] / "single.manifest.json").read_text())
    _rewrite(path, lambda m: m.update(documents_rejected=0, rejected_by_reason={}))
    with pytest.raises(ManifestError, match=f"{path}: field 'documents_in' is 41"):
        Manifest.read(path)


def test_an_older_manifest_without_the_newer_keys_reads(made, tmp_path):
    path = tmp_path / "old.manifest.json"
    path.write_text((made[0] / "single.manifest.json").read_text())

    def older(m):
        for key in ("special_tokens", "max_document_chars", "files_skipped", "documents_with_special_text", "new_key"):
            m.pop(key, None)
        m["output"].pop("max_token_id")
        m["a_key_from_a_newer_version"] = {"anything": 1}

    _rewrite(path, older)
    m = Manifest.read(path)
    assert m is not None and m.special_tokens == "parse" and m.max_document_chars is None
    assert m.files_skipped.count == 0 and m.counts.documents_with_special_text == 0 and m.output.max_token_id is None
    assert "max_token_id" not in m.to_json()["output"] and "max_document_chars" not in m.to_json()
    assert Manifest.read(tmp_path / "none") is None


def test_the_dataloader_reads_the_eod_id_from_the_attribute(made, sample):
    from titanenv.train.dataloader import resolve_eod_id

    m = made[1]
    assert resolve_eod_id("", "", m) == 50256  # no tokenizer folder needed
    other = dataclasses.replace(m, tokenizer=dataclasses.replace(m.tokenizer, eod_id=7))
    assert resolve_eod_id("", "", other) == 7
    assert resolve_eod_id(sample / "gpt2_tokenizer.json", "", None) == 50256


def test_check_tokenizer_returns_the_typed_manifest(made, sample):
    m = manifestlib.check_tokenizer(made[0] / "single", toklib.load(sample / "gpt2_tokenizer.json"))
    assert isinstance(m, Manifest) and m.tokenizer.vocab_size == 50257
    with pytest.raises(manifestlib.TokenizerMismatch, match="tokenized with"):
        manifestlib.check_tokenizer(made[0] / "single", "0" * 64)


def test_piece_job_and_fingerprint_derive_from_the_config(sample, tmp_path):
    every = {f.name for f in dataclasses.fields(pp.PreprocessConfig)}
    never = {"output_prefix", "val_output_prefix", "workers", "shard_index", "num_shards", "on_error",
             "tokenizer_backend", "allow_empty"}  # fmt: skip
    assert set(settings.BYTE_FIELDS) == {
        "json_keys", "text_document", "shuffle", "seed", "val_fraction", "special_tokens", "max_document_chars",
    }  # fmt: skip
    assert set(settings.DERIVED_BYTE_FIELDS) == {"inputs", "tokenizer_model", "append_eod", "eod_token", "piece_mb"}
    assert every == set(settings.BYTE_FIELDS) | set(settings.DERIVED_BYTE_FIELDS) | never  # each field is decided
    cfg = pp.PreprocessConfig(inputs=[tmp_path / "x.jsonl"], output_prefix=tmp_path / "o", tokenizer_model="t")
    assert cfg.byte_settings() == {name: getattr(cfg, name) for name in settings.BYTE_FIELDS}
    assert dataclasses.replace(cfg, workers=8).byte_settings() == cfg.byte_settings()
    assert dataclasses.replace(cfg, seed=7).byte_settings() != cfg.byte_settings()
    job = worker.PieceJob(
        cfg=cfg, tokenizer_json="t", backend="hf", eod=None, dtype="<u2", parts_dir="p", fingerprint="f"
    )
    assert pickle.loads(pickle.dumps(job)) == job and job.splits() == ("train",)
    assert dataclasses.replace(job, cfg=dataclasses.replace(cfg, val_fraction=0.1)).splits() == ("train", "val")


def test_one_tokenizer_resolver(sample, tmp_path):
    from titanenv.train import cli

    folder = tmp_path / "tok"
    folder.mkdir()
    with pytest.raises(toklib.TokenizerNotFound, match="folder has no tokenizer.json"):
        cli.stage_tokenizer(folder, tmp_path / "run")
    with pytest.raises(toklib.TokenizerNotFound, match="no such tokenizer file or folder"):
        cli.stage_tokenizer(tmp_path / "missing.json", tmp_path / "run")
    (folder / "tokenizer.json").write_bytes((sample / "gpt2_tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    staged = cli.stage_tokenizer(folder, tmp_path / "run")
    assert sorted(p.name for p in staged.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert toklib.resolve(staged) == (staged / "tokenizer.json").resolve()


def test_hf_inputs_switch_the_offline_environment_on(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sources.offline, "apply", lambda *a, **k: calls.append(a))
    with pytest.raises(sources.InputError, match="cannot load it offline"):
        sources.expand([f"hf:{tmp_path / 'missing'}"])
    assert calls == [()]


def test_counts_of_pieces_keep_the_first_examples(tmp_path):
    piece = {"documents_in": 4, "written": {"train": 1}, "tokens": {"train": 9}, "rejected": {"too_long": 3},
             "examples": {"too_long": ["a:1", "a:2", "a:3"]}, "bom_stripped": 1}  # fmt: skip
    c = Counts.of_pieces([piece, piece])
    assert (c.documents_in, c.documents_written, c.documents_rejected, c.tokens, c.bom_stripped) == (8, 2, 6, 18, 2)
    assert c.rejected_examples == {"too_long": ["a:1", "a:2", "a:3", "a:1", "a:2"]}  # MAX_EXAMPLES = 5
