"""SFT data (titanenv.train.sft): reading, tokens and loss mask, packing, resume, and the dataloader hook.

Real tokenizers from sample_data: GPT-2 (staged like a run's, with an export-style
``tokenizer_config.json``: BOS = EOS, ``add_bos_token: false``) and TorchTitan's test
tokenizer. Expected token ids are computed here with the ``tokenizers`` library itself.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import tyro
from tokenizers import Tokenizer
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titanenv.train.dataloader import MegatronDataloader
from titanenv.train.rundir import stage_tokenizer
from titanenv.train.sft import SFTDataset, SFTFormatError, adds_bos, encode_example, read_sft

GPT2_EOS = "<|endoftext|>"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def raw(folder: Path, text: str) -> list[int]:
    ids: list[int] = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return ids


def take(dataset: SFTDataset, n: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    it = iter(dataset)
    return [next(it) for _ in range(n)]


@pytest.fixture
def gpt2(sample: Path, tmp_path: Path) -> Path:
    """GPT-2 staged as a run's tokenizer folder, with the config titanenv's exports write."""
    folder = stage_tokenizer(sample / "gpt2_tokenizer.json", tmp_path / "gpt2")
    config = {"bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "add_bos_token": False, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tokenizer_copy(sample: Path, tmp_path: Path, name: str, **config: Any) -> Path:
    """A copy of TorchTitan's test tokenizer folder with ``config`` merged into its tokenizer_config.json."""
    folder = tmp_path / name
    shutil.copytree(sample / "torchtitan_test_tokenizer", folder)
    path = folder / "tokenizer_config.json"
    merged = json.loads(path.read_text()) | config
    path.write_text(json.dumps({k: v for k, v in merged.items() if v is not None}))
    return folder


# ---------------------------------------------------------------- tokens and loss mask


def test_prompt_response_labels_mask_exactly_the_prompt(gpt2: Path, tmp_path: Path) -> None:
    rows = [
        {"prompt": "Translate to French: cheese\n", "response": "fromage"},
        {"prompt": "What is 2+2? ", "response": "4, of course."},
    ]
    path = write_jsonl(tmp_path / "two.jsonl", rows)
    eos = Tokenizer.from_file(str(gpt2 / "tokenizer.json")).token_to_id(GPT2_EOS)
    examples = []
    for row in rows:
        prompt, ids = raw(gpt2, row["prompt"]), raw(gpt2, row["prompt"]) + raw(gpt2, row["response"]) + [eos]
        # label j is token j+1; it carries loss only when token j+1 is response or EOS (no BOS: add_bos_token false)
        examples.append((ids[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt) :]))
    pad = 3
    seq_len = sum(len(inputs) for inputs, _ in examples) + pad
    expected = []
    for first, second in (examples, examples[::-1]):  # ChatDataset shuffles: either order is one pack
        inputs = first[0] + second[0] + [eos] * pad
        labels = first[1] + second[1] + [IGNORE_INDEX] * pad
        positions = [*range(len(first[0])), *range(len(second[0])), *range(pad)]
        expected.append((inputs, labels, positions))

    tok = HuggingFaceTokenizer(tokenizer_path=str(gpt2))
    [(sample, labels)] = take(SFTDataset(read_sft(path), tok, seq_len, positions=True), 1)
    assert sample["input"].dtype == labels.dtype == sample["positions"].dtype == torch.int64
    assert sample["input"].shape == labels.shape == (seq_len,)
    got = (sample["input"].tolist(), labels.tolist(), sample["positions"].tolist())
    assert got in expected
    assert labels.tolist().count(eos) == 2 and labels[-pad:].eq(IGNORE_INDEX).all()  # both EOS learned, pad not

    [(plain, labels_again)] = take(SFTDataset(read_sft(path), tok, seq_len, positions=False), 1)
    assert set(plain) == {"input"} and torch.equal(labels_again, labels)


def test_bos_only_where_the_tokenizer_adds_it(sample: Path, tmp_path: Path) -> None:
    record = {"line": 1, "prompt": "abc", "response": "de"}
    plain = tokenizer_copy(sample, tmp_path, "plain")  # no add_bos_token, post-processor adds none
    asked = tokenizer_copy(sample, tmp_path, "asked", add_bos_token=True)
    llama3 = tokenizer_copy(sample, tmp_path, "llama3")  # post-processor adds BOS, as Meta Llama 3's does
    spec = json.loads((llama3 / "tokenizer.json").read_text())
    bos_tok = "<|begin_of_text|>"
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos_tok: {"id": bos_tok, "ids": [2002], "tokens": [bos_tok]}},
    }
    (llama3 / "tokenizer.json").write_text(json.dumps(spec))
    body = raw(plain, "abc") + raw(plain, "de") + [2003]
    for folder, bos in ((plain, []), (asked, [2002]), (llama3, [2002])):
        tok = HuggingFaceTokenizer(tokenizer_path=str(folder))
        assert (tok.bos_id, tok.eos_id) == (2002, 2003)
        assert adds_bos(tok) == bool(bos), folder.name
        ids, _ = encode_example(record, tok, tok.eos_id, adds_bos(tok))
        assert ids == bos + body, folder.name  # one BOS at most, never before the response
        [(sample, labels)] = take(SFTDataset([record], tok, len(ids) - 1, positions=False), 1)
        assert sample["input"].tolist() == ids[:-1]
        assert labels.tolist() == [IGNORE_INDEX] * (len(bos) + 2) + ids[len(bos) + 3 :], folder.name


def test_messages_carry_loss_only_on_assistant_turns(sample: Path, tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    folder = tokenizer_copy(sample, tmp_path, "chat", chat_template=template)
    turns = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    bos, eos = 2002, 2003
    ids, target = [bos], [False]
    for role, content in turns:
        head, body = raw(folder, f"[{role}]"), raw(folder, content) + [eos]
        ids += head + body
        target += [False] * len(head) + [role == "assistant"] * len(body)
    tok = HuggingFaceTokenizer(tokenizer_path=str(folder))
    whole = "<|begin_of_text|>" + "".join(f"[{r}]{c}<|end_of_text|>" for r, c in turns)
    assert tok.tokenizer.encode(whole, add_special_tokens=False).ids == ids  # pieces tokenize as the whole does
    [(sample_, labels)] = take(SFTDataset(read_sft(path), tok, len(ids) - 1, positions=False), 1)
    assert sample_["input"].tolist() == ids[:-1]
    assert labels.tolist() == [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], target[1:], strict=True)]
    assert [t for t in labels.tolist() if t != IGNORE_INDEX] == raw(folder, "hello") + [eos] + raw(folder, "ciao") + [
        eos
    ]


def test_messages_need_a_chat_template(gpt2: Path, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"prompt": "a", "response": "b"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    tok = HuggingFaceTokenizer(tokenizer_path=str(gpt2))
    with pytest.raises(
        ValueError, match=re.escape(f"{path}:2: 1 messages lines") + f".*{re.escape(str(gpt2))}.*prompt"
    ):
        SFTDataset(read_sft(path), tok, 64, source=str(path))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"prompt": "a", "response": ', "not JSON"),
        ('{"prompt": "a"}', 'missing key "response"'),
        ('{"prompt": "a", "response": 3}', '"response" is a int, not a string'),
        ('["prompt", "response"]', "a JSON list, not an object"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "a"}]}', "messages[0] has unknown role 'bot'"),
    ],
)
def test_bad_line_names_file_line_problem_and_fix(tmp_path: Path, line: str, problem: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, "", line])
    with pytest.raises(SFTFormatError, match=re.escape(f"{path}:3: {problem}")) as err:
        read_sft(path)
    assert '{"prompt": str, "response": str}' in str(err.value) and '{"messages": [' in str(err.value)
    assert isinstance(err.value, ValueError)


def test_empty_file_and_blank_lines(tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(SFTFormatError, match=re.escape(f"{empty}: no examples")):
        read_sft(empty)
    path = write_jsonl(tmp_path / "ok.jsonl", ["", {"prompt": "p", "response": "r", "id": 7}, ""])
    assert read_sft(path) == [{"line": 2, "prompt": "p", "response": "r"}]
    with pytest.raises(FileNotFoundError, match="sft-path"):
        read_sft(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- packing, over-long, resume


def test_over_long_examples_are_dropped_counted_and_named(sample: Path, tmp_path: Path, caplog) -> None:
    folder = sample / "torchtitan_test_tokenizer"
    rows = [{"prompt": "ab", "response": "c" * n} for n in (3, 9, 4, 10, 2, 8)]
    lengths = [len(raw(folder, r["prompt"]) + raw(folder, r["response"])) + 1 for r in rows]
    seq_len = 10
    # lines 2 and 4 have more than seq_len + 1 tokens; line 6 exactly seq_len + 1, so it is kept
    assert lengths == [6, 12, 7, 13, 5, 11]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    tok = HuggingFaceTokenizer(tokenizer_path=str(folder))
    with caplog.at_level(logging.WARNING):
        ds = SFTDataset(read_sft(path), tok, seq_len, infinite=False, positions=False, source=str(path))
    s = ds.stats
    assert (s.documents, s.written, s.too_long, s.too_long_lines) == (6, 4, 2, [2, 4])
    assert s.documents == s.written + s.too_long
    assert f"{path}: dropped 2 of 6 examples" in caplog.text and "(lines 2, 4)" in caplog.text
    packs = list(ds)
    assert sum(labels.tolist().count(tok.eos_id) for _, labels in packs) == 4  # each kept example's EOS, once
    assert sum(int(labels.ne(IGNORE_INDEX).sum()) for _, labels in packs) == s.target_tokens


def test_nothing_fits_is_an_error(sample: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "ab", "response": "c" * 20}])
    tok = HuggingFaceTokenizer(tokenizer_path=str(sample / "torchtitan_test_tokenizer"))
    with pytest.raises(ValueError, match="0 examples fit --training.seq-len 8"):
        SFTDataset(read_sft(path), tok, 8)


@pytest.fixture
def varied(sample: Path, tmp_path: Path) -> tuple[list[dict[str, Any]], HuggingFaceTokenizer]:
    rows = [{"prompt": "q" * (1 + i % 3), "response": "r" * (2 + (i * 7) % 9)} for i in range(11)]
    tok = HuggingFaceTokenizer(tokenizer_path=str(sample / "torchtitan_test_tokenizer"))
    return read_sft(write_jsonl(tmp_path / "varied.jsonl", rows)), tok


def test_state_dict_resumes_with_exactly_the_next_samples(varied) -> None:
    records, tok = varied
    seq_len, ahead = 16, 5
    saw_pending = False
    for k in range(12):  # past the end of the first epoch (infinite): relooping resumes too
        ds = SFTDataset(records, tok, seq_len)
        it = iter(ds)
        for _ in range(k):
            next(it)
        live = ds.state_dict()
        state = copy.deepcopy(live)
        saw_pending |= bool(state["pending_input_ids"])
        expected = [next(it) for _ in range(ahead)]
        assert live == state, "state_dict() must be a copy that later packing does not change"
        resumed = SFTDataset(records, tok, seq_len)
        resumed.load_state_dict(state)
        got = take(resumed, ahead)
        for (a_in, a_lab), (b_in, b_lab) in zip(expected, got, strict=True):
            assert torch.equal(a_in["input"], b_in["input"]) and torch.equal(a_lab, b_lab), k
            assert torch.equal(a_in["positions"], b_in["positions"]), k
    assert saw_pending, "no state held a pending example: the resume edge case was not exercised"
    with pytest.raises(ValueError, match="seq_len 16.*fresh --dump-folder"):
        SFTDataset(records, tok, seq_len + 1).load_state_dict(state)


def test_same_records_same_samples(varied) -> None:
    records, tok = varied
    a, b = take(SFTDataset(records, tok, 16), 8), take(SFTDataset(records, tok, 16), 8)
    assert all(torch.equal(x[1], y[1]) and torch.equal(x[0]["input"], y[0]["input"]) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- the dataloader hook


def test_dataloader_sft_path_yields_batches_and_resumes(varied, tmp_path: Path) -> None:
    records, tok = varied
    path = write_jsonl(tmp_path / "loader.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in records])
    assert tyro.cli(MegatronDataloader.Config, args=["--sft-path", str(path)]).sft_path == str(path)

    def loader(positions: bool) -> MegatronDataloader:
        cfg = MegatronDataloader.Config(sft_path=str(path), document_positions=positions)
        return cfg.build(dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=16, local_batch_size=2)

    inputs, labels = next(iter(loader(positions=True)))
    assert set(inputs) == {"input", "positions"} and inputs["positions"].shape == (2, 16)
    plain = loader(positions=False)
    it = iter(plain)
    inputs, labels = next(it)
    assert set(inputs) == {"input"}
    assert inputs["input"].shape == labels.shape == (2, 16) and labels.dtype == inputs["input"].dtype == torch.int64
    assert labels.eq(IGNORE_INDEX).any() and labels.ne(IGNORE_INDEX).any()
    next(it)
    state, expected = plain.state_dict(), next(it)
    again = loader(positions=False)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))[1], expected[1])


def test_dataloader_without_sft_path_keeps_the_megatron_path(tmp_path: Path, varied) -> None:
    _, tok = varied
    with pytest.raises(ValueError, match="no dataset given: pass --dataloader.path"):
        MegatronDataloader.Config().build(dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=16, local_batch_size=2)
    with pytest.raises(FileNotFoundError, match="titanenv preprocess"):
        MegatronDataloader.Config(path=str(tmp_path / "none"), document_positions=False).build(
            dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=16, local_batch_size=2
        )
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="num-workers 0"):
        MegatronDataloader.Config(sft_path=str(path), num_workers=2).build(
            dp_world_size=1, dp_rank=0, tokenizer=tok, seq_len=16, local_batch_size=2
        )
    with pytest.raises(ValueError, match="sft-path needs the Hugging Face tokenizer folder"):
        MegatronDataloader.Config(sft_path=str(path)).build(
            dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=16, local_batch_size=2
        )
