"""``titanenv finetune``: LoRA from Hugging Face weights keeps the base bit-identical, checks the base's
config against the recipe before anything starts, and submits through the same sbatch script."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import require
from runs import BATCH, SEQ_LEN, output_to
from titanenv import offline

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("TITANENV_UPDATE_GOLDEN") == "1"

# Llama-3.2-1B's config.json as published by Meta (meta-llama/Llama-3.2-1B on the Hub).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_run):
    """A titanenv pre-training run and its Hugging Face export (the fine-tune's base)."""
    from titanenv import export

    run = tiny_run("test")
    return run, export.cached_export(run.run_dir)


def _finetune(out: Path, log: Path, **flags) -> None:
    from titanenv.finetune.cli import finetune

    flags.setdefault("steps", 3)
    with output_to(log):
        finetune(output_dir=out, seq_len=SEQ_LEN, batch_size=BATCH, preflight=False, **flags)


@pytest.mark.parametrize("backend", ["partial_dtensor", "spmd_types"])
def test_finetune_trains_only_the_adapters_and_keeps_every_base_weight(base, tmp_path, backend):
    """TorchTitan 0.3.0's spmd_types backend re-creates parameters and loses requires_grad=False; titanenv
    re-freezes the base after parallelize, and checks the optimizer, so both backends keep it bit-identical."""
    from titanenv.export.convert import load_state, to_hf
    from titanenv.train import lora

    run, hf_dir = base
    out = tmp_path / "ft"
    _finetune(out, tmp_path / "log", base=run.run_dir, data=run.data,
              extra=["--parallelism.spmd-backend", backend, "--debug.seed", "0"])  # fmt: skip
    log = (tmp_path / "log").read_text()
    assert "LoRA r=8 alpha=16 on wqkv,wo,w1,w2,w3: trainable 221,184 parameters" in log, log[-3000:]
    assert "60 tensors in the optimizer" in log

    loaded = load_state(out)
    assert loaded.run.lora is not None and loaded.run.lora.rank == 8
    assert loaded.run.base_model == hf_dir
    base_state = {k: v for k, v in loaded.state.items() if not lora.is_adapter(k)}
    after = to_hf(loaded.adapter, base_state, tied=False)
    before = load_file(str(hf_dir / "model.safetensors"))
    assert sorted(after) == sorted(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == [], f"base weights changed by the fine-tune: {changed[:5]}"
    adapters = {k: v for k, v in loaded.state.items() if lora.is_adapter(k)}
    assert len(adapters) == 60
    # lora_b starts at zero: after 3 steps every B has moved, so every adapter trained.
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_b." in k)

    status = json.loads(next(out.glob("provenance/*/status.json")).read_text())
    assert status["parameters"] == {"trainable": 221184, "frozen": 6163712, "trainable_tensors": 60,
                                    "frozen_tensors": 45}  # fmt: skip
    provenance = json.loads(next(out.glob("provenance/*/provenance.json")).read_text())
    assert provenance["settings"]["base"] == str(hf_dir) and provenance["settings"]["lora_rank"] is None


def test_optimizer_with_a_base_parameter_fails_naming_it():
    from torchtitan.models.llama3 import model_registry

    from titanenv.train import lora

    config = lora.convert(model_registry("debugmodel", attn_backend="flex").model, lora.LoraOptions(rank=4))
    with torch.device("meta"):
        model = config.build()
    adapters = [p for n, p in model.named_parameters() if lora.is_adapter(n)]
    assert lora.check_optimizer(model, [torch.optim.SGD(adapters, lr=0.1)]) == 60
    wo = model.layers["0"].attention.wo.weight
    with pytest.raises(lora.FrozenBaseError, match=r"1 base parameter tensors .*layers\.0\.attention\.wo\.weight"):
        lora.check_optimizer(model, [torch.optim.SGD([*adapters, wo], lr=0.1)])
    with pytest.raises(lora.FrozenBaseError, match="not in the optimizer"):
        lora.check_optimizer(model, [torch.optim.SGD(adapters[1:], lr=0.1)])


def _cli(args: list[str]):
    from titanenv.cli import app

    return CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "250"})


def _flat(output: str) -> str:
    """The text of typer's error box on one line (frame characters and line breaks removed)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_a_base_that_does_not_match_the_recipe_fails_before_anything_starts(base, tmp_path):
    run, hf_dir = base
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(num_hidden_layers=4, rope_theta=10000.0)
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ft"
    result = _cli(["finetune", "--from", str(bad), "--data", str(run.data), "--output-dir", str(out),
                   "--recipe", "titanenv_debug_lora"])  # fmt: skip
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert "num_hidden_layers: config.json has 4, recipe titanenv_debug_lora builds 6" in text
    assert "rope_theta: config.json has 10000.0, recipe titanenv_debug_lora builds 500000.0" in text
    assert not out.exists()  # nothing was started or written


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--target-modules", "wq,wo"], "--target-modules"),
        (["--sft", "missing.jsonl"], "--sft"),
        ([], "exactly one of --data PREFIX and --sft"),
        (["--recipe", "titanenv_debug", "--lora-rank", "0"], "has no LoRA adapters"),
    ],
)
def test_bad_finetune_flags_are_named_before_anything_starts(base, tmp_path, flags, named):
    run, hf_dir = base
    data = [] if any(f in flags for f in ("--sft",)) or flags == [] else ["--data", str(run.data)]
    out = tmp_path / "ft"
    result = _cli(["finetune", "--from", str(hf_dir), "--output-dir", str(out), *data, *flags])
    assert result.exit_code == 2, result.output
    assert named in _flat(result.output)
    assert not out.exists()


def test_a_repo_id_missing_from_the_hub_cache_prints_the_fetch_command(tmp_path, monkeypatch):
    from titanenv.finetune import resolve_base

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="titanenv assets fetch --add model:meta-llama/Llama-3.2-1B"):
        resolve_base("meta-llama/Llama-3.2-1B")


def test_llama_32_1b_config_matches_the_1b_recipes_and_a_changed_rope_is_named(tmp_path, sample):
    from titanenv.finetune import BaseMismatch, check_base

    hf = tmp_path / "llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAMA_32_1B))
    shutil.copy(sample / "gpt2_tokenizer.json", hf / "tokenizer.json")
    (hf / "model.safetensors").write_bytes(b"")  # not read by the check
    assert check_base(hf, "titanenv_1b_lora", hf) == 128256
    assert check_base(hf, "titanenv_1b", hf) == 128256  # a titanenv_1b run exports this same architecture
    rope = {**LLAMA_32_1B["rope_scaling"], "factor": 8.0}
    (hf / "config.json").write_text(json.dumps({**LLAMA_32_1B, "rope_scaling": rope}))
    with pytest.raises(BaseMismatch) as e:
        check_base(hf, "titanenv_1b_lora", hf)
    assert e.value.fields == ["rope_scaling.factor"]


def test_finetune_submit_dry_run_matches_golden(tmp_path, sample, monkeypatch):
    """The fine-tune goes through the training sbatch script (`... run_training_jwb.sbatch finetune FLAGS`)."""
    from test_slurm_render import dry_run_env

    hf = tmp_path / "llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(LLAMA_32_1B))
    shutil.copy(sample / "gpt2_tokenizer.json", hf / "tokenizer.json")
    (hf / "model.safetensors").write_bytes(b"")
    sft = tmp_path / "chat.jsonl"
    sft.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi."}) + "\n")
    env = dry_run_env(monkeypatch, "jwb")
    from titanenv.cli import app

    args = ["finetune", "--submit", "--dry-run", "--from", str(hf), "--sft", str(sft),
            "--output-dir", "/p/scratch/myproject/runs/llama1b-lora", "--steps", "500", "--lora-rank", "16",
            "--nodes", "1", "--time", "04:00:00"]  # fmt: skip
    result = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    root = str(Path(__file__).resolve().parents[1])
    text = result.stdout.replace(str(tmp_path), "<TMP>").replace(root, "<ROOT>")
    assert "train.sbatch finetune --output-dir" in text and "titanenv finetune --output-dir" in text
    assert "--from <TMP>/llama" in text and "--lora-rank 16" in text and "--lora.rank 16" in text
    assert "--checkpoint.initial-load-path <TMP>/llama" in text and "--dataloader.sft-path <TMP>/chat.jsonl" in text
    golden = GOLDEN / "dry_run_finetune_jwb.txt"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text(), f"finetune dry run changed; TITANENV_UPDATE_GOLDEN=1 rewrites {golden}"


# ------------------------------------------------------------------ offline: finetune, export, eval

UNSHARE = (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
)
# Inside `unshare -n` only loopback exists, and it is down: bring it up (torchrun's rendezvous), as root.
LOOPBACK_UP = (
    "import fcntl, os, socket, struct, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH', b'lo', flags | 1))\n"
    "os.execvp('bash', ['bash', '-euc', sys.argv[1]])\n"
)


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory, sample):
    """`titanenv finetune --sft`, `export`, `export --merge` and `eval` of both, in one `unshare -n`."""
    require(UNSHARE, "needs `unshare -n` (root) to cut the network")
    _, hf_dir = base
    tmp = tmp_path_factory.mktemp("finetuned")
    out = tmp / "ft"
    titanenv = f"{shlex.quote(sys.executable)} -m titanenv.cli"
    script = "\n".join([
        f"{titanenv} finetune --from {hf_dir} --sft {sample / 'sft_arithmetic.jsonl'} --output-dir {out} "
        f"--recipe titanenv_debug_lora --steps 4 --seq-len 96 --batch-size 2 --lora-rank 4 --lora-alpha 8 "
        f"-- --debug.seed 0 --lr-scheduler.warmup-steps 1",
        f"{titanenv} export {out}",
        f"{titanenv} export {out} --merge",
        f"{titanenv} eval --model {out}/export/step-4 --model {out}/export/step-4-adapter "
        f"--tasks titanenv_wikitext2 --limit 2 --out {tmp / 'eval'}",
    ])  # fmt: skip
    to_set, to_unset = offline.offline_environment()
    env = {k: v for k, v in os.environ.items() if k not in to_unset and k != "HF_DATASETS_CACHE"}
    env.update(to_set, HF_HOME=str(tmp / "hf_home"), COLUMNS="200")
    p = subprocess.run(["unshare", "-n", sys.executable, "-c", LOOPBACK_UP, script], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-6000:]
    return out, hf_dir, tmp / "eval", p.stdout + p.stderr


def test_finetune_export_and_eval_run_with_the_network_cut(finetuned):
    out, hf_dir, eval_dir, log = finetuned
    assert "LoRA r=4 alpha=8 on wqkv,wo,w1,w2,w3" in log and "10 examples in, 10 kept" in log
    adapter = json.loads((out / "export" / "step-4-adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["base_model_name_or_path"] == str(hf_dir)
    assert sorted(adapter["target_modules"]) == adapter["target_modules"]
    with (eval_dir / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "word_perplexity"]
    assert len(rows) == 2, rows
    merged, pair = sorted(rows, key=lambda r: "adapter" in r["model"])
    assert "adapter" in pair["model"]
    assert float(pair["value"]) == pytest.approx(float(merged["value"]), rel=1e-4)


def test_peft_on_the_base_equals_the_merged_export_and_torchtitans_forward(finetuned):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from titanenv.train.model import load_model

    out, hf_dir, _, _ = finetuned
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    model, run, step, _ = load_model(out)
    assert run.lora is not None and step == 4
    with torch.no_grad():
        titan = model(ids)
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, out / "export" / "step-4-adapter").eval()
        pair = peft(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "export" / "step-4", dtype=torch.float32).eval()
        full = merged(ids).logits
    assert (plain - titan).abs().max() > 1e-3  # the adapters changed the model: the comparison below can fail
    assert (pair - titan).abs().max() <= 1e-4
    assert (full - titan).abs().max() <= 1e-4
