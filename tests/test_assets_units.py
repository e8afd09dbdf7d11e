"""Asset list validation, keys, lm-eval expansion (real lm-eval task configs), the offline guard, redaction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import require
from titanenv import offline
from titanenv.assets import cache, cli, doctor, plan, spec
from titanenv.assets.files import redact


def test_example_asset_list_dry_run_expands_real_lm_eval_tasks(root, monkeypatch, tmp_path):
    """No network: --dry-run only reads the file and lm-eval's own task configs."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for flag in offline.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    result = CliRunner().invoke(
        cli.app, ["fetch", str(root / "examples" / "assets.toml"), "--dry-run", "--add", "task:ai2_arc"]
    )
    assert result.exit_code == 0, result.output
    lines = dict(line.split("    <- ") for line in result.output.splitlines() if "    <- " in line)
    assert lines["dataset:google/IFEval"] == "task:ifeval"
    assert lines["nltk:punkt_tab"] == "nltk[0], task:ifeval"  # ifeval's code downloads punkt_tab
    assert lines["dataset:Rowan/hellaswag"] == "task:hellaswag"
    assert "task:ai2_arc" in lines["dataset:allenai/ai2_arc?name=ARC-Challenge"]
    assert lines["dataset:allenai/ai2_arc?name=ARC-Easy"] == "task:arc_easy, task:ai2_arc"
    assert lines["tokenizer:EleutherAI/gpt-neox-20b"] == "experiment.tokenizer"
    assert lines["dataset:Salesforce/wikitext?name=wikitext-2-raw-v1&split=validation"] == "datasets[0]"
    assert "file:model:EleutherAI/pythia-160m/README.md" in lines
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_unknown_field_names_file_and_field(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[[datasets]]\nrepo = "org/x"\nsplitt = "train"\n')
    with pytest.raises(
        spec.AssetListError,
        match=r"a\.toml: invalid asset list:\n  datasets\[0\]\.splitt: unknown field; known: repo, config, split,",
    ):
        spec.load(f)
    f.write_text('[[models]]\nrepo = "just-a-name"\n')
    with pytest.raises(spec.AssetListError, match=r"models\[0\]\.repo: .*write it as 'org/name'"):
        spec.load(f)
    f.write_text('[[files]]\nurl = "https://example.org/x.bin"\n')
    with pytest.raises(spec.AssetListError, match=r"files\[0\]: .*needs sha256"):
        spec.load(f)
    f.write_text("[experiment\n")
    with pytest.raises(spec.AssetListError, match="not valid TOML"):
        spec.load(f)


def test_relative_paths_follow_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA", "/scratch/data")
    f = tmp_path / "exp" / "a.toml"
    f.parent.mkdir()
    f.write_text('[experiment]\ndata = ["$DATA/train", "local/val"]\n[lm_eval]\ninclude_path = ["tasks"]\n')
    assets = spec.load(f)
    assert assets.experiment.data == ["/scratch/data/train", str(f.parent / "local/val")]
    assert assets.lm_eval.include_path == [f.parent / "tasks"]


def test_keys_round_trip_and_explain_mistakes():
    for key in (
        "model:org/m",
        "model:org/m@v1.0",
        "tokenizer:org/t",
        "dataset:org/d?name=c&split=train&revision=r",
        "metric:accuracy",
        "nltk:punkt_tab",
    ):
        assert spec.parse_key(key).key == key
    assert spec.parse_key("task:mmlu") == "mmlu"
    with pytest.raises(spec.AssetListError, match="KIND:VALUE"):
        spec.parse_key("org/m")
    with pytest.raises(spec.AssetListError, match="unknown option"):
        spec.parse_key("dataset:org/d?config=x")
    with pytest.raises(spec.AssetListError, match="unknown asset kind 'modle'"):
        spec.parse_key("modle:org/m")


def test_only_picks_by_key_or_origin_and_rejects_unknown():
    p = plan.build(None, ["model:org/a", "metric:accuracy"])
    assert list(p.select(["metric:accuracy"]).items) == ["metric:accuracy"]
    assert set(p.select(["--add"]).items) == {"model:org/a", "metric:accuracy"}
    with pytest.raises(spec.AssetListError, match="--only model:org/b: no such asset"):
        p.select(["model:org/b"])


def test_fix_commands(tmp_path):
    p = plan.Plan()
    p.add(spec.HubModel(repo="org/m", allow_patterns=["*.json"]), "models[0]", from_file=True)
    p.add(spec.Dataset(repo="org/d", config="c"), "task:suite", from_file=False)
    p.add(spec.Dataset(repo="org/d", config="c"), "task:leaf", from_file=False)
    assets = tmp_path / "my assets.toml"
    assert doctor._fix(p.items["model:org/m"], assets, tmp_path) == (f"{doctor.FETCH} '{assets}' --only model:org/m")
    assert doctor._fix(p.items["dataset:org/d?name=c"], assets, tmp_path) == (
        f"{doctor.FETCH} --add task:leaf --lock '{tmp_path}/my assets.lock.json'"
    )


def test_caches_must_stay_under_hf_home(tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub")}
    assert cache.hf_home(env) == tmp_path
    with pytest.raises(cache.CacheLayoutError, match="HF_DATASETS_CACHE=/elsewhere moves a cache out of HF_HOME"):
        cache.hf_home({"HF_HOME": str(tmp_path), "HF_DATASETS_CACHE": "/elsewhere"})
    assert cache.nltk_dir(tmp_path, {}) == tmp_path / "nltk_data"


def test_offline_flags_and_description():
    env = {"HTTPS_PROXY": "http://proxy:3128", "HF_HUB_OFFLINE": "0"}
    assert offline.is_offline(env) == []
    offline.apply(env, verbose=True)
    assert offline.is_offline(env) == list(offline.OFFLINE_FLAGS)
    assert "HTTPS_PROXY" not in env
    lines = offline.describe(env)
    assert "Offline mode: WANDB_MODE=offline [ok]" in lines and all(line.startswith("Offline mode: ") for line in lines)


def test_socket_guard_blocks_remote_and_allows_loopback():
    """In a child process: the guard is process-wide once installed."""
    code = """
import socket, urllib.request
from titanenv.offline import guard_sockets, NetworkBlocked
attempts = guard_sockets()
server = socket.create_server(("127.0.0.1", 0))
socket.create_connection(server.getsockname(), timeout=2).close()  # loopback: allowed
for call in (lambda: socket.create_connection(("192.0.2.1", 443), timeout=2),
             lambda: urllib.request.urlopen("https://huggingface.co", timeout=2)):
    try:
        call()
        raise SystemExit("connected")
    except OSError as e:
        assert "network is cut" in str(e), e
print(sorted(attempts))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['192.0.2.1:443', 'huggingface.co:443']"


def test_redact_hides_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz0123")
    assert redact("Authorization: Bearer hf_abcdefghijklmnopqrstuvwxyz0123 ok") == "Authorization: Bearer <redacted> ok"
    assert redact("other hf_ZZZZZZZZZZZZZZZZZZZZZZZZ") == "other <redacted>"
    assert redact("hf_home and sha 0123abcd") == "hf_home and sha 0123abcd"


def test_part_size_parser():
    assert cli._size("4G") == 4 * 1024**3 and cli._size("500MiB") == 500 * 1024**2 and cli._size("123") == 123
    assert cli._size(None) is None
    with pytest.raises(Exception, match="500 megs"):
        cli._size("500 megs")


def test_fetch_refuses_offline_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for flag in offline.OFFLINE_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli.app, ["fetch", "--add", "model:org/m"])
    assert result.exit_code == 2
    assert "offline mode is on (HF_HUB_OFFLINE)" in result.output and "TITANENV_OFFLINE=0" in result.output


def test_unshare_is_found():
    require(os.geteuid() == 0, "unshare -n needs root")
    prefix, how = doctor.isolation("auto")
    assert prefix == ["unshare", "-n"] and "unshare -n" in how
