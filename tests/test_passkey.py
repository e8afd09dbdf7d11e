"""Passkey retrieval (``titanenv eval --passkey``) and the validation loss by position (``--by-position``).

Prompt construction runs on the real GPT-2 tokenizer; scoring on a character-level fake
:class:`TextModel` that reads the key out of its prompt (right) or answers another number
(wrong); the files and the CLI on the session's tiny GPT-2 run (tests/runs.py).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer

from titanenv.data import tokenizer as toklib
from titanenv.eval import cli, passkey
from titanenv.eval.generate import TextModel
from titanenv.eval.loss import loss_by_position, validation_loss, write_loss_by_position
from titanenv.train.model import load_model

GPT2 = Path(__file__).resolve().parents[1] / "sample_data" / "gpt2_tokenizer.json"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def encode() -> Callable[[str], list[int]]:
    tok = toklib.load(GPT2).tokenizer
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def char_model(answer: Callable[[str], str], bos: int | None = None) -> TextModel:
    """One token per character (``ord``); greedy text after the prompt's last ``pass key is`` is ``answer(key)``."""

    def encode(text: str) -> list[int]:
        return ([] if bos is None else [bos]) + [ord(c) for c in text]

    def decode(ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != bos)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        text = decode(ids[0].tolist())
        key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text)
        said = text[text.rindex(passkey.QUESTION) + len(passkey.QUESTION) :]
        target = " " + answer(key.group(1) if key else "?????") + ". Done"
        logits = torch.zeros(1, ids.shape[1], 128)
        logits[0, -1, ord(target[len(said)])] = 1.0
        return logits

    return TextModel(forward, encode, decode, 128, frozenset(), 100_000, torch.device("cpu"), "chars")


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("length", [64, 256, 1000])
@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_prompt_has_the_length_the_needle_at_its_depth_and_the_question_last(encode, length, depth):
    sentence = max(len(encode(s)) for s in passkey.FILLER)
    needle, question = encode(passkey.NEEDLE.format(key="48213")), encode(passkey.QUESTION)
    p = passkey.build_prompt(encode, length, depth, "48213")
    assert len(p.ids) == length
    assert p.ids[-len(question) :] == question
    assert p.ids[p.needle_start : p.needle_start + len(needle)] == needle
    assert p.filler_tokens == length - len(needle) - len(question)
    assert abs(p.filler_before - depth / 100 * p.filler_tokens) <= sentence  # within one filler sentence
    filler = p.ids[: p.needle_start] + p.ids[p.needle_start + len(needle) : -len(question)]
    assert "pass key" not in toklib.load(GPT2).tokenizer.decode(filler) and len(filler) == p.filler_tokens
    if depth == 100:
        assert p.ids[p.needle_start + len(needle) :] == question  # the needle just before the question
    if depth == 0:
        assert p.needle_start == 0


def test_a_start_token_goes_once_at_the_front_and_short_lengths_are_refused():
    model = char_model(lambda key: key, bos=1)
    p = passkey.build_prompt(model.encode, 200, 50, "11111")
    assert len(p.ids) == 200 and p.ids[0] == 1 and p.ids.count(1) == 1
    assert model.decode(p.ids).endswith(passkey.QUESTION)
    minimum = 1 + len(passkey.NEEDLE.format(key="11111")) + len(passkey.QUESTION)
    assert len(passkey.build_prompt(model.encode, minimum, 50, "11111").ids) == minimum
    with pytest.raises(ValueError, match=rf"--passkey-lengths {minimum - 1}: .* take {minimum} tokens"):
        passkey.build_prompt(model.encode, minimum - 1, 50, "11111")


def test_keys_are_five_digits_seeded_per_cell():
    first = passkey.keys(0, 128, 50, 20)
    assert first == passkey.keys(0, 128, 50, 20) and all(re.fullmatch(r"[1-9]\d{4}", k) for k in first)
    assert len(set(first)) > 15
    assert first != passkey.keys(1, 128, 50, 20) and first != passkey.keys(0, 128, 25, 20)
    assert passkey.keys(0, 128, 50, 3) == first[:3]  # a cell's keys do not depend on the trial count


# ---------------------------------------------------------------- scoring


def test_answers_are_scored_by_their_start():
    assert passkey.is_correct(" 12345. Remember", "12345") and passkey.is_correct("12345", "12345")
    assert not passkey.is_correct(" 123456", "12345") and not passkey.is_correct(" 1234", "12345")
    assert not passkey.is_correct(" the 12345", "12345")


@pytest.mark.parametrize(("answer", "accuracy"), [(lambda k: k, 1.0), (lambda k: str(int(k) % 90_000 + 10_001), 0.0)])
def test_a_model_that_always_answers_right_scores_1_and_a_wrong_one_0(answer, accuracy):
    config = passkey.PasskeyConfig(lengths=(120, 300), depths=(0, 50, 100), trials=3, seed=7)
    result = passkey.run_passkey(char_model(answer), config, name="fake", step=None)
    assert result.accuracy == [[accuracy] * 2] * 3
    assert result.prompt_tokens == [[[120] * 3, [300] * 3]] * 3
    assert (result.lengths, result.depths, result.trials, result.seed) == ([120, 300], [0, 50, 100], 3, 7)


def test_half_right_answers_give_half_and_lengths_above_the_context_are_skipped():
    calls: list[str] = []

    def every_other(key: str) -> str:  # the same key is asked for once per generated token
        if key not in calls:
            calls.append(key)
        return key if calls.index(key) % 2 == 0 else "00000"

    model = char_model(every_other)
    model = TextModel(model.forward, model.encode, model.decode, 128, frozenset(), 150, model.device, "chars")
    result = passkey.run_passkey(model, passkey.PasskeyConfig(lengths=(120, 500), depths=(50,), trials=4))
    assert result.accuracy == [[0.5]] and result.lengths == [120] and result.skipped_lengths == [500]
    with pytest.raises(ValueError, match="all above the model's context of 150"):
        passkey.run_passkey(model, passkey.PasskeyConfig(lengths=(500,)))


def test_grid_settings_are_checked():
    for kwargs, flag in (({"lengths": ()}, "lengths"), ({"depths": (0, 101)}, "depths"), ({"trials": 0}, "trials")):
        with pytest.raises(ValueError, match=f"--passkey-{flag}"):
            passkey.PasskeyConfig(**kwargs)


# ---------------------------------------------------------------- a real run


def test_a_run_writes_passkey_json_and_heatmap(tiny_run, tmp_path, capsys):
    trained = tiny_run("gpt2")
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export", "eval"))
    cli.evaluate(model=[run], passkey=True, passkey_lengths="30,32,64", passkey_depths="0,50,100", passkey_trials=2)
    out = run / "eval" / "passkey"
    record = json.loads((out / "passkey.json").read_text())
    assert list(record) == ["model", "step", "lengths", "depths", "trials", "seed", "accuracy", "prompt_tokens",
                            "skipped_lengths"]  # fmt: skip
    assert (record["model"], record["step"], record["seed"]) == (str(run), trained.step, 0)
    assert (record["lengths"], record["depths"], record["skipped_lengths"]) == ([30, 32], [0, 50, 100], [64])
    assert len(record["accuracy"]) == 3 and all(len(row) == 2 for row in record["accuracy"])
    assert all(a in (0.0, 0.5, 1.0) for row in record["accuracy"] for a in row)
    assert record["prompt_tokens"] == [[[30, 30], [32, 32]]] * 3
    assert (out / "passkey.png").read_bytes().startswith(PNG)
    printed = capsys.readouterr().out
    assert "32 tok" in printed and str(out / "passkey.json") in printed and "[64] skipped" in printed

    again = tmp_path / "again"
    cli.evaluate(output_dir=run, passkey=True, passkey_lengths="30,32", passkey_depths="0,50,100",
                 passkey_trials=2, out=again)  # fmt: skip
    assert json.loads((again / "passkey.json").read_text())["accuracy"] == record["accuracy"]  # deterministic


# ---------------------------------------------------------------- loss by position


def test_loss_by_position_buckets_average_to_the_validation_loss(tiny_run, tmp_path):
    trained = tiny_run("gpt2")
    model, run, _, _ = load_model(trained.run_dir)
    overall, tokens, windows = validation_loss(model, trained.data, run.seq_len, max_windows=3, batch_size=2)
    result = loss_by_position(model, trained.data, run.seq_len, buckets=5, max_windows=3, batch_size=2)
    assert result.buckets == [(0, 6), (6, 12), (12, 19), (19, 25), (25, 32)]  # 32 / 5: unequal, contiguous
    assert sum(result.tokens) == tokens and result.windows == windows == 3
    mean = sum(lo * n for lo, n in zip(result.loss, result.tokens, strict=True)) / sum(result.tokens)
    assert abs(mean - overall) < 1e-5
    assert max(result.loss) - min(result.loss) > 1e-4  # buckets of different tokens differ: not one value copied
    json_path, png_path = write_loss_by_position(result, tmp_path)
    buckets = [list(b) for b in result.buckets]
    expected = {"seq_len": 32, "buckets": buckets, "loss": result.loss, "tokens": result.tokens, "windows": 3}
    assert json.loads(json_path.read_text()) == expected
    assert png_path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="--by-position 33"):
        loss_by_position(model, trained.data, run.seq_len, buckets=33)


def test_by_position_writes_next_to_eval_json(tiny_run, tmp_path, capsys):
    trained = tiny_run("gpt2")
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run, ignore=shutil.ignore_patterns("export", "eval"))
    cli.evaluate(model=[run], data=trained.data, max_windows=2, batch_size=2, by_position=4)
    record = json.loads((run / "loss_by_position.json").read_text())
    assert record["buckets"] == [[0, 8], [8, 16], [16, 24], [24, 32]] and record["windows"] == 2
    assert (run / "eval.json").is_file() and (run / "loss_by_position.png").is_file()
    assert "loss by position ->" in capsys.readouterr().out


# ---------------------------------------------------------------- CLI modes


def test_options_of_other_modes_are_refused_by_name(tmp_path):
    passkey_only = [("passkey_lengths", "64"), ("passkey_depths", "50"), ("passkey_trials", 2), ("seed", 3)]
    for option, value in [*passkey_only, ("by_position", 4)]:  # the lm-eval matrix
        with pytest.raises(typer.BadParameter, match=f"--{option.replace('_', '-')} does not apply to the lm-eval"):
            cli.evaluate(model=[tmp_path], **{option: value})
    for option, value in passkey_only:
        with pytest.raises(typer.BadParameter, match=f"--{option.replace('_', '-')} does not apply to --data"):
            cli.evaluate(model=[tmp_path], data=tmp_path / "val", **{option: value})
    others = [("data", tmp_path / "val"), ("by_position", 4), ("tasks", "arc_easy"), ("prompt", "Hi"),
              ("max_windows", 2), ("dtype", "bfloat16"), ("steps", "all"), ("limit", 2.0)]  # fmt: skip
    for option, value in others:
        with pytest.raises(typer.BadParameter, match=f"--{option.replace('_', '-')} does not apply to --passkey") as e:
            cli.evaluate(model=[tmp_path], passkey=True, **{option: value})
        assert e.value.param_hint == f"--{option.replace('_', '-')}"
    with pytest.raises(typer.BadParameter, match="one model"):
        cli.evaluate(model=[tmp_path, tmp_path], passkey=True)
    with pytest.raises(typer.BadParameter, match="neither trainer_config.json nor config.json") as e:
        cli.evaluate(model=[tmp_path], passkey=True)
    assert e.value.param_hint == "--model"
    with pytest.raises(typer.BadParameter, match="--passkey-depths: expected integers"):
        cli.evaluate(model=[tmp_path], passkey=True, passkey_depths="half")
