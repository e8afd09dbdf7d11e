"""Export stage, for real: tiny CPU training runs (tests/runs.py) exported to Hugging Face folders and
read back with plain ``transformers`` (eager attention, fp32), against TorchTitan's own model
(:func:`titanenv.train.model.load_model`) on the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from runs import make_tiny_run
from titanenv import export
from titanenv.cli import app
from titanenv.data import manifest as manifestlib
from titanenv.train.dataloader import TokenWindowDataset
from titanenv.train.model import load_model

PROMPT = 8
NEW = 16


def windows(run, n: int = 2) -> torch.Tensor:
    """``int64[n, seq_len]``: the first windows of the run's own training data."""
    ds = TokenWindowDataset(run.data, run.seq_len, shuffle=False)
    return torch.stack([ds.window(i)[0]["input"] for i in range(n)])


def hf_model(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def greedy(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> list[int]:
    """TorchTitan greedy decoding without a cache: argmax of a full forward pass per token."""
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("tokenizer", ["test", "gpt2"])
def test_exported_logits_and_greedy_tokens_match_torchtitan(tiny_run, tokenizer, tmp_path):
    run = tiny_run(tokenizer)
    result = export.export_run(run.run_dir, tmp_path / "hf")
    assert result.step == run.step and (result.out / export.MARKER).is_file()
    titan, record, _, _ = load_model(run.run_dir)
    hf = hf_model(result.out)
    ids = windows(run)
    with torch.no_grad():
        expected, got = titan(ids), hf(ids).logits
    assert got.shape == expected.shape == (2, run.seq_len, record.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4
    prompt = ids[:1, :PROMPT]
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)
    hf_tokens = out[0, PROMPT:].tolist()
    assert hf_tokens and hf_tokens == greedy(titan, prompt, NEW)[: len(hf_tokens)]  # HF stops early only at EOD
    config = json.loads((result.out / "config.json").read_text())
    eod = manifestlib.read(run.data).tokenizer.eod_id
    assert config["vocab_size"] == record.vocab_size and config["max_position_embeddings"] == run.seq_len
    assert config["bos_token_id"] == config["eos_token_id"] == eod


def test_a_dropped_key_is_refused_and_named(tiny_run):
    run = tiny_run("test")
    loaded = export.load_state(run.run_dir)
    state = {**loaded.state, "layers.0.attention.q_norm.weight": torch.ones(16)}
    with pytest.raises(export.ExportRefused, match=r"layers\.0\.attention\.q_norm\.weight") as refused:
        export.to_hf(loaded.adapter, state, tied=False)
    assert refused.value.keys == ["layers.0.attention.q_norm.weight"]


def test_a_refused_export_leaves_no_folder(tiny_run, tmp_path, monkeypatch):
    """An adapter that lost a mapping (it would silently skip the key): the export stops, nothing is written."""
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    init = Llama3StateDictAdapter.__init__

    def lossy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        del self.from_hf_map["model.layers.{}.mlp.up_proj.weight"]

    monkeypatch.setattr(Llama3StateDictAdapter, "__init__", lossy)
    with pytest.raises(export.ExportRefused, match=r"layers\.0\.feed_forward\.w3\.weight") as refused:
        export.export_run(tiny_run("test").run_dir, tmp_path / "hf")
    assert len(refused.value.keys) == 6  # one per layer
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_folder_and_the_tokenizer_loads_offline(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tiny_run("gpt2")
    out = tmp_path / "hf"
    result = CliRunner().invoke(app, ["export", str(run.run_dir), "--out", str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "README.md", export.MARKER}  # fmt: skip
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert f"{out / name}  " in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    readme = (out / "README.md").read_text()
    assert "titanenv_debug" in readme and f"| step | {run.step} |" in readme and "torchtitan | 0.3.0" in readme

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "The quick brown fox jumps over the lazy dog."
    raw = Tokenizer.from_file(str(run.run_dir / "tokenizer" / "tokenizer.json")).encode(text).ids
    assert tok(text).input_ids == raw  # no BOS (the data never had one), no EOS
    eod = manifestlib.read(run.data).tokenizer.eod_id
    assert tok.eos_token_id == tok.bos_token_id == eod and tok.eos_token == "<|endoftext|>"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == eod

    again = CliRunner().invoke(app, ["export", str(run.run_dir), "--out", str(out)])  # same run: replaced
    assert again.exit_code == 0 and "replaced the earlier export" in again.output, again.output
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = CliRunner().invoke(app, ["export", str(run.run_dir), "--out", str(other)])
    assert isinstance(refused.exception, FileExistsError) and "not a titanenv export" in str(refused.exception)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_cached_export_is_written_once_and_sharding_keeps_the_weights(tiny_run, tmp_path):
    run = tiny_run("test")
    cached = export.cached_export(run.run_dir)
    assert cached == run.run_dir / "export" / f"step-{run.step}"
    stamp = (cached / export.MARKER).stat().st_mtime_ns
    assert export.cached_export(run.run_dir) == cached and (cached / export.MARKER).stat().st_mtime_ns == stamp

    sharded = export.export_run(run.run_dir, tmp_path / "sharded", max_shard_size="4MB").out
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()
    ids = windows(run, 1)
    with torch.no_grad():
        assert torch.equal(hf_model(sharded)(ids).logits, hf_model(cached)(ids).logits)


def test_export_at_end_writes_the_final_checkpoints_export(tmp_path):
    run = make_tiny_run(tmp_path, "test", steps=2, export_at_end=True)
    out = run.run_dir / "export" / "step-2"
    assert export.is_current(out, run.run_dir, 2, "float32"), run.log.read_text()[-2000:]
    assert export.cached_export(run.run_dir) == out
