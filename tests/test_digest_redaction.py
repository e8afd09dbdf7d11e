"""One file hash (titanenv.digest) and one redaction rule (titanenv.redaction), used by every stage."""

from __future__ import annotations

import hashlib
import json

from titanenv import digest, redaction
from titanenv.assets import files
from titanenv.assets import lockfile as assets_lockfile
from titanenv.assets.lockfile import Lock, LockedAsset
from titanenv.data import manifest
from titanenv.train import provenance

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123"


def test_sha256_file_streams_through_file_digest(tmp_path, monkeypatch):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000
    path.write_bytes(data)
    used, real = [], hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: used.append(name) or real(f, name))
    assert digest.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert used == ["sha256"]
    monkeypatch.delattr(hashlib, "file_digest")  # a login node's python3 older than 3.11
    assert digest.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_every_stage_uses_the_one_file_hash():
    assert files.sha256_file is digest.sha256_file
    assert manifest.file_sha256 is digest.sha256_file


def test_one_rule_redacts_assignments_environment_values_and_hub_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-value-from-env")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "short")
    text = (
        "export WANDB_API_KEY=abc def\n"
        "error: 401 for s3cr3t-value-from-env at /api\n"
        f"Authorization: Bearer {TOKEN}_and_more\n"
        "short hf_home sha 0123abcd\n"
    )
    assert redaction.redact(text) == (
        "export WANDB_API_KEY=<redacted>\n"
        "error: 401 for <redacted> at /api\n"
        "Authorization: Bearer <redacted>_and_more\n"
        "short hf_home sha 0123abcd\n"
    )
    assert redaction.redact(f"x {TOKEN}", marker="***") == "x ***"
    assert redaction.redact("s3cr3t-value-from-env", env={}) == "s3cr3t-value-from-env"


def test_redacted_walks_keys_and_values():
    obj = {"error": f"bad {TOKEN}", TOKEN: [1, {"k": f"HF_TOKEN={TOKEN}"}], "n": 3}
    assert redaction.redacted(obj) == {
        "error": "bad <redacted>",
        "<redacted>": [1, {"k": "HF_TOKEN=<redacted>"}],
        "n": 3,
    }


def test_provenance_and_assets_share_the_rule(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert provenance.redact is redaction.redact
    line = f"export HF_TOKEN={TOKEN}\n"
    assert files.redact(line) == redaction.redact(line, marker=files.MARKER) == "export HF_TOKEN=<redacted>\n"


def test_a_lockfile_is_written_atomically_with_no_token_in_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    lock = Lock(
        assets=[LockedAsset(key="model:org/m", kind="model", spec={"note": f"got {TOKEN}"}, commit="c", files=[])]
    )
    path = tmp_path / "a.lock.json"
    assets_lockfile.write(path, lock)
    text = path.read_text()
    assert TOKEN not in text and json.loads(text)["assets"][0]["spec"]["note"] == "got <redacted>"
    assert [p.name for p in tmp_path.iterdir()] == ["a.lock.json"]
