"""``titanenv generate``: a run's model and its export continue prompts the same way, offline.

One tiny real run (``tests/runs.py``: titanenv_debug, 3 steps on C4 sample text, the test
tokenizer) is shared by the module; its model is near-uniform, so sampled text differs from
seed to seed while greedy text is fixed. The offline proof runs the CLI under ``unshare -n``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import require
from runs import TinyRun, make_tiny_run
from titanenv.data import tokenizer as toklib
from titanenv.eval.generate import ModelNotFound, Sampler, continue_ids, generate_text, load_text_model, read_prompts
from titanenv.eval.generate import generate as ev_generate
from titanenv.train.model import load_model

PROMPTS = ["The quick brown fox", "In 2019, the city council"]
NEW = 12
UNSHARE = (
    shutil.which("unshare") is not None
    and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
)


@pytest.fixture(scope="module")
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """The session's shared tiny run when conftest provides ``tiny_run``, else one of this module's own."""
    try:
        return request.getfixturevalue("tiny_run")("test")
    except pytest.FixtureLookupError:
        return make_tiny_run(tmp_path_factory.mktemp("generate"))


# ---------------------------------------------------------------- sampler and prompts (no model)


def test_sampler_is_seeded_and_respects_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))

    def draws(sampler: Sampler, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sampler.pick(logits, g) for _ in range(400)]

    full = Sampler()
    assert draws(full, 1) == draws(full, 1) and draws(full, 1) != draws(full, 2)
    assert set(draws(full, 1)) == {0, 1, 2, 3}
    assert set(draws(Sampler(top_p=0.6), 1)) == {0, 1}  # 0.5 < 0.6 <= 0.8: the two most likely
    assert set(draws(Sampler(top_p=0.01), 1)) == {0}
    assert set(draws(Sampler(temperature=0), 1)) == set(draws(Sampler(greedy=True, temperature=5), 1)) == {0}
    hot = draws(Sampler(temperature=0.05), 3)
    assert hot.count(0) > 390  # a low temperature sharpens towards the argmax


def test_sampler_refuses_bad_settings():
    with pytest.raises(ValueError, match="--temperature"):
        Sampler(temperature=-1)
    with pytest.raises(ValueError, match="--top-p"):
        Sampler(top_p=0)


def test_prompts_from_text_files_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first line\n\n  second line\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "two\nlines"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    got = read_prompts(["plain", f"@{tmp_path / 'p.txt'}", f"@{tmp_path / 'p.jsonl'}", "@@handle"])
    assert got == ["plain", "first line", "  second line", "two\nlines", "x", "@handle"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_prompts([f"@{tmp_path / 'bad.jsonl'}"])
    with pytest.raises(FileNotFoundError, match="no such prompt file"):
        read_prompts([f"@{tmp_path / 'missing.txt'}"])


def test_a_missing_model_folder_names_the_path_and_what_it_needs(tmp_path):
    with pytest.raises(ModelNotFound, match=r"nowhere: no such folder.*trainer_config\.json.*config\.json"):
        load_text_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFound, match=r"neither trainer_config\.json nor config\.json"):
        load_text_model(tmp_path)
    from titanenv.cli import app

    result = CliRunner().invoke(app, ["generate", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.replace("│", " ").split())
    assert "nowhere: no such folder" in flat and "trainer_config.json" in flat, result.output


# ---------------------------------------------------------------- a run's model


def test_fixed_seed_gives_fixed_text_and_another_seed_differs(run):
    once = generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, seed=7)
    again = generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, seed=7)
    other = generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, seed=8)
    assert once == again, (once, again)
    assert once != other, (once, other)
    assert all(text for text in once)
    # each prompt has its own generator: its text does not depend on the other prompts
    assert generate_text(run.run_dir, PROMPTS[1:], max_new_tokens=NEW, seed=7) == once[1:]


def test_greedy_is_the_argmax_path(run):
    greedy = generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, greedy=True, seed=1)
    assert greedy == generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, temperature=0, seed=2)
    model, record, step, _ = load_model(run.run_dir)
    assert step == run.step
    info = toklib.load(run.run_dir / "tokenizer")
    for prompt, text in zip(PROMPTS, greedy, strict=True):
        ids = info.tokenizer.encode(prompt, add_special_tokens=False).ids  # no BOS: as the data
        new: list[int] = []
        with torch.no_grad():
            for _ in range(NEW):
                logits = model(torch.tensor([(ids + new)[-record.seq_len :]]))
                nxt = int(logits[0, -1, : info.vocab_size].argmax())
                if nxt == info.eod_id:
                    break
                new.append(nxt)
        assert text == info.tokenizer.decode(new), (prompt, text)
        # `titanenv eval --prompt` goes through the same loop
        assert ev_generate(model, run.run_dir / "tokenizer", prompt, max_new_tokens=NEW, context=record.seq_len) == text


def test_an_empty_prompt_starts_a_document_and_steps_are_checked(run):
    loaded = load_text_model(run.run_dir)
    assert loaded.encode("") == [toklib.load(run.run_dir / "tokenizer").eod_id]
    assert continue_ids(loaded, loaded.encode(""), max_new_tokens=3, sampler=Sampler(greedy=True))  # runs
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_text_model(run.run_dir, step=run.step + 100)


def test_the_cli_prints_each_prompt_and_its_continuation(run, tmp_path):
    from titanenv.cli import app

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["generate", str(run.run_dir), "--prompt", f"@{tmp_path / 'prompts.txt'}", "--max-new-tokens", str(NEW)]
    result = CliRunner().invoke(app, [*args, "--seed", "7", "--top-p", "0.9", "--temperature", "0.8"])
    assert result.exit_code == 0, result.output
    expected = generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, seed=7, top_p=0.9, temperature=0.8)
    assert result.output == "\n\n".join(p + t for p, t in zip(PROMPTS, expected, strict=True)) + "\n"
    bad = CliRunner().invoke(app, [*args, "--top-p", "1.5"])
    assert bad.exit_code == 2 and "--top-p 1.5" in bad.output, bad.output


def test_generation_runs_without_a_network(run):
    require(UNSHARE, "needs `unshare -n` (root) to run without a network")
    cmd = ["unshare", "-n", sys.executable, "-m", "titanenv.cli", "generate", str(run.run_dir),
           "--prompt", PROMPTS[0], "--greedy", "--max-new-tokens", str(NEW)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    expected = generate_text(run.run_dir, PROMPTS[:1], max_new_tokens=NEW, greedy=True)[0]
    assert p.stdout == PROMPTS[0] + expected + "\n", p.stdout + p.stderr


# ---------------------------------------------------------------- Hugging Face folders


@pytest.fixture(scope="module")
def hf_folder(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with the test tokenizer: any Hugging Face folder, not an export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(sample / "torchtitan_test_tokenizer" / name, folder / name)
    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlamaConfig(vocab_size=2048, max_position_embeddings=16, eos_token_id=2003, **shape)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_hugging_face_folder_goes_through_the_same_loop(hf_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    greedy = generate_text(hf_folder, PROMPTS, max_new_tokens=NEW, greedy=True)
    tok = AutoTokenizer.from_pretrained(hf_folder, local_files_only=True)
    net = AutoModelForCausalLM.from_pretrained(hf_folder, local_files_only=True)
    for prompt, text in zip(PROMPTS, greedy, strict=True):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(NEW):
                nxt = int(net(input_ids=torch.tensor([ids[-16:]])).logits[0, -1, : len(tok)].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
        assert text == tok.decode(ids[len(tok(prompt)["input_ids"]) :], skip_special_tokens=True)
    sampled = generate_text(hf_folder, PROMPTS, max_new_tokens=NEW, seed=5)
    assert sampled == generate_text(hf_folder, PROMPTS, max_new_tokens=NEW, seed=5)
    assert sampled != generate_text(hf_folder, PROMPTS, max_new_tokens=NEW, seed=6)


# ---------------------------------------------------------------- a run's export


@pytest.fixture(scope="module")
def exported(run) -> Path:
    try:
        from titanenv.export import cached_export
    except ImportError:
        pytest.skip("export not yet available")
    return Path(cached_export(run.run_dir, step=run.step))


def test_a_run_and_its_export_generate_the_same_greedy_text(run, exported):
    from_run = generate_text(run.run_dir, PROMPTS, max_new_tokens=NEW, greedy=True)
    from_export = generate_text(exported, PROMPTS, max_new_tokens=NEW, greedy=True)
    assert from_run == from_export, (from_run, from_export)
    # one sampler over both models' logits: the same seed gives the same sampled text too
    sampled = {"seed": 11, "top_p": 0.9, "temperature": 0.8, "max_new_tokens": NEW}
    assert generate_text(run.run_dir, PROMPTS, **sampled) == generate_text(exported, PROMPTS, **sampled)
    with pytest.raises(ValueError, match="--step"):
        load_text_model(exported, step=run.step)


def test_an_export_generates_without_a_network(run, exported):
    require(UNSHARE, "needs `unshare -n` (root) to run without a network")
    cmd = ["unshare", "-n", sys.executable, "-m", "titanenv.cli", "generate", str(exported),
           "--prompt", PROMPTS[0], "--seed", "3", "--max-new-tokens", str(NEW)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith(PROMPTS[0]), p.stdout
