"""Instruction data (``titanenv finetune --sft FILE.jsonl``) as TorchTitan SFT samples.

Each non-blank line of the file is one JSON object of either shape::

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

:func:`read_sft` checks every line before anything starts. :class:`SFTDataset` tokenizes
the examples, drops (and reports) those that do not fit, and hands the rest to TorchTitan's
:class:`~torchtitan.hf_datasets.text_datasets.ChatDataset`, whose greedy packing, shuffling,
re-looping and checkpoint state are used unchanged.

Loss mask: labels are ``-100`` (TorchTitan's ``IGNORE_INDEX``) wherever the next token is
prompt, so the loss counts only the response:

- ``prompt``/``response``: ``tokens = [BOS] + encode(prompt) + encode(response) + [EOS]``;
  the response and the EOS carry loss. The two strings are encoded separately, exactly as
  given: put any separator (a newline, a space) into them.
- ``messages``: the text is the tokenizer's chat template (``chat_template`` in
  ``tokenizer_config.json`` or ``chat_template.jinja``), rendered with the ``bos_token`` and
  ``eos_token`` strings as Hugging Face does. The assistant turns carry loss: turn ``i``
  spans the tokens between ``template(messages[:i], add_generation_prompt=True)`` and
  ``template(messages[:i + 1])`` (incremental prefix rendering, so multi-turn works).
  As in ChatDataset, trailing newlines are stripped and an EOS is appended unless the text
  already ends with one; it carries loss when the last message is the assistant's.

BOS rule: a ``prompt``/``response`` example starts with BOS exactly when Hugging Face's
``tokenizer(prompt)`` would add one: ``add_bos_token`` of ``tokenizer_config.json`` when the
key is there, else whether ``tokenizer.json``'s post-processor adds it (Meta Llama 3's adds
``<|begin_of_text|>``). titanenv's own exports say ``add_bos_token: false`` (BOS = EOS = EOD),
so their examples have no BOS, like their pre-training data. Chat-template text gets no BOS
beyond what the template writes itself (``{{ bos_token }}``), as in Hugging Face's
``apply_chat_template``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.hf_datasets.text_datasets import ChatDataset
from torchtitan.tools.logging import logger

__all__ = [
    "ROLES",
    "SFTDataset",
    "SFTFormatError",
    "SFTStats",
    "adds_bos",
    "encode_example",
    "has_chat_template",
    "read_sft",
]

ROLES = ("system", "user", "assistant")
"""Accepted ``role`` values of a ``messages`` line."""

SHAPES = (
    'each line must be one JSON object, either {"prompt": str, "response": str} or '
    '{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} '
    "with at least one assistant turn"
)
SHOWN_LINES = 5
"""How many line numbers of dropped examples a warning names."""


class SFTFormatError(ValueError):
    """A line of an SFT file is not one of the accepted shapes; the message names ``FILE:LINE``."""


def _check(source: str, lineno: int, obj: Any) -> dict[str, Any]:
    """The validated record of one parsed line (with its line number), or SFTFormatError."""

    def bad(problem: str) -> SFTFormatError:
        return SFTFormatError(f"{source}:{lineno}: {problem}; {SHAPES}")

    if not isinstance(obj, dict):
        raise bad(f"a JSON {type(obj).__name__}, not an object")
    if "messages" in obj and ("prompt" in obj or "response" in obj):
        raise bad('both "messages" and "prompt"/"response"; use one shape per line')
    if "messages" not in obj:
        for key in ("prompt", "response"):
            if key not in obj:
                raise bad(f'missing key "{key}" (keys: {", ".join(sorted(obj)) or "none"})')
            if not isinstance(obj[key], str):
                raise bad(f'"{key}" is a {type(obj[key]).__name__}, not a string')
        if not obj["response"]:
            raise bad('"response" is empty')
        return {"line": lineno, "prompt": obj["prompt"], "response": obj["response"]}
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad('"messages" must be a non-empty list')
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise bad(f'messages[{i}] must be an object with a string "content"')
        if msg.get("role") not in ROLES:
            raise bad(f"messages[{i}] has unknown role {msg.get('role')!r} (accepted: {', '.join(ROLES)})")
        clean.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise bad("no assistant turn, so nothing to learn")
    return {"line": lineno, "messages": clean}


def read_sft(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate every line of an SFT JSONL file.

    Blank lines are skipped; every other line must be valid (one bad line fails the file,
    before anything is trained).

    Returns:
        One record per example, in file order, with its 1-based ``line`` number:
        ``{"line": int, "prompt": str, "response": str}`` or
        ``{"line": int, "messages": [{"role": str, "content": str}, ...]}`` (other keys of a
        line are dropped). ``len(result)`` is the number of documents in.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        SFTFormatError: (a ``ValueError``) naming ``FILE:LINE``, the problem (not UTF-8, not
            JSON, not an object, missing key, wrong type, empty response, unknown role, no
            assistant turn) and the two accepted shapes; or naming ``FILE`` if it holds no example.
    """
    source = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no SFT file at {source}; pass a JSONL file (--dataloader.sft-path FILE.jsonl)")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SFTFormatError(f"{source}:{lineno}: not UTF-8 ({e.reason}); {SHAPES}") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise SFTFormatError(f"{source}:{lineno}: not JSON ({e.msg} at column {e.colno}); {SHAPES}") from None
            records.append(_check(source, lineno, obj))
    if not records:
        raise SFTFormatError(f"{source}: no examples (the file is empty or only blank lines); {SHAPES}")
    return records


def _tokenizer_config(tokenizer: HuggingFaceTokenizer) -> dict[str, Any]:
    path = Path(tokenizer.tokenizer_path) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def adds_bos(tokenizer: HuggingFaceTokenizer) -> bool:
    """Whether a ``prompt``/``response`` example starts with BOS (the module's BOS rule)."""
    if tokenizer.bos_id is None:
        return False
    config = _tokenizer_config(tokenizer)
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    return bool(getattr(tokenizer, "hf_adds_bos", False))


def has_chat_template(tokenizer: HuggingFaceTokenizer) -> bool:
    """Whether the tokenizer folder has a chat template (what ``messages`` lines need)."""
    jinja = Path(tokenizer.tokenizer_path) / HuggingFaceTokenizer.CHAT_TEMPLATE_FILE
    return jinja.is_file() or "chat_template" in _tokenizer_config(tokenizer)


def _raw(tokenizer: HuggingFaceTokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (special tokens in the text still count)."""
    ids: list[int] = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    return ids


def _render(tokenizer: HuggingFaceTokenizer, messages: Sequence[Mapping[str, str]], generation: bool) -> str:
    text: str = tokenizer.apply_chat_template(
        list(messages),
        add_generation_prompt=generation,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )
    return text


def encode_example(
    record: Mapping[str, Any], tokenizer: HuggingFaceTokenizer, eos_id: int, bos: bool
) -> tuple[list[int], list[bool]]:
    """Token ids of one record of :func:`read_sft` and, per token, whether it carries loss.

    ``bos``: whether a ``prompt``/``response`` example starts with ``tokenizer.bos_id``
    (see :func:`adds_bos`). ``messages`` records need the tokenizer's chat template (the
    caller checks it, see :func:`has_chat_template`). The rules are in the module docstring.
    """
    if "messages" not in record:
        prompt = ([tokenizer.bos_id] if bos else []) + _raw(tokenizer, record["prompt"])
        response = _raw(tokenizer, record["response"]) + [eos_id]
        return prompt + response, [False] * len(prompt) + [True] * len(response)
    messages = record["messages"]
    ids = _raw(tokenizer, _render(tokenizer, messages, False).rstrip("\n"))
    target = [False] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            start = len(_raw(tokenizer, _render(tokenizer, messages[:i], True)))
            end = min(len(_raw(tokenizer, _render(tokenizer, messages[: i + 1], False))), len(ids))
            target[start:end] = [True] * max(0, end - start)
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        target.append(messages[-1]["role"] == "assistant")
    return ids, target


@dataclass
class SFTStats:
    """What :class:`SFTDataset` did with the records: ``documents == written + too_long``."""

    documents: int = 0
    """Examples read."""

    written: int = 0
    """Examples kept for packing."""

    too_long: int = 0
    """Examples dropped because they exceed ``seq_len + 1`` tokens."""

    too_long_lines: list[int] = field(default_factory=list)
    """Line numbers of the dropped examples."""

    tokens: int = 0
    """Tokens of the kept examples (inputs, one fewer than the example's tokens each)."""

    target_tokens: int = 0
    """Of those, the positions whose label carries loss (not ``-100``)."""


class SFTDataset(ChatDataset):  # type: ignore[misc]  # torchtitan ships no type hints
    """Packed, resumable SFT samples for one data-parallel rank (TorchTitan's ChatDataset).

    All records are tokenized here, once (see the module docstring for the tokens and the
    loss mask); an example of more than ``seq_len + 1`` tokens is dropped, as ChatDataset
    drops it, but counted in :attr:`stats` and named in a warning. The kept examples, as a
    ``datasets.Dataset``, go to ChatDataset, which shuffles them (seed 42, reshuffled each
    epoch with seed ``42 + epoch``), shards them by rank, and packs them greedily: whole
    examples fill a sample of ``seq_len`` inputs; what does not fit starts the next sample,
    and the rest of the sample is padded with EOS inputs and ``-100`` labels. With
    ``infinite`` the epochs repeat. The order is deterministic, and :meth:`state_dict` /
    :meth:`load_state_dict` resume with exactly the sample that would have come next.

    Args:
        records: examples from :func:`read_sft` (each with its ``line``).
        tokenizer: TorchTitan's ``HuggingFaceTokenizer`` (its ``tokenizer_path`` is the folder).
        seq_len: inputs per sample (``L``).
        dp_rank: this rank's index in the data-parallel group.
        dp_world_size: size of the data-parallel group.
        infinite: start another epoch when the examples run out (else stop).
        positions: also yield per-example positions (0 at each example's start and at the
            padding); leave them out for plain causal SDPA attention.
        source: name of the data (the file) in messages.

    Yields:
        ``({"input": int64[L], "positions": int64[L]}, labels int64[L])``; ``positions`` only
        with ``positions=True``. ``labels[j]`` is the token after ``input[j]``, or ``-100``
        where that token is prompt or padding.

    Raises:
        ValueError: if the tokenizer has no EOS, if ``messages`` records meet a tokenizer
            without a chat template, or if fewer than ``dp_world_size`` examples fit ``seq_len``.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: HuggingFaceTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        *,
        infinite: bool = True,
        positions: bool = True,
        source: str = "sft",
    ) -> None:
        folder = tokenizer.tokenizer_path
        if tokenizer.eos_id is None:
            raise ValueError(
                f"{folder}: the tokenizer has no EOS token, which ends every SFT example; "
                'set "eos_token" in its tokenizer_config.json'
            )
        chats = [r["line"] for r in records if "messages" in r]
        if chats and not has_chat_template(tokenizer):
            raise ValueError(
                f"{source}:{chats[0]}: {len(chats)} messages lines, but the tokenizer in {folder} has no chat "
                'template ("chat_template" in tokenizer_config.json, or chat_template.jinja); add one there, '
                'or write the examples as {"prompt": str, "response": str} lines'
            )
        self.stats, rows = _encode_all(records, tokenizer, seq_len)
        self._report(source, seq_len)
        if self.stats.written < dp_world_size:
            raise ValueError(
                f"{source}: {self.stats.written} examples fit --training.seq-len {seq_len}, fewer than the "
                f"{dp_world_size} data-parallel ranks; use more examples or a longer --training.seq-len"
            )
        super().__init__(
            Dataset.from_list(rows),
            tokenizer,
            sample_processor=_unused,
            seq_len=seq_len,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            infinite=infinite,
        )
        self._dataset_id = source
        self.positions = positions

    def _report(self, source: str, seq_len: int) -> None:
        s = self.stats
        if s.too_long:
            lines = ", ".join(map(str, s.too_long_lines[:SHOWN_LINES])) + (", ..." if s.too_long > SHOWN_LINES else "")
            logger.warning(
                f"{source}: dropped {s.too_long} of {s.documents} examples longer than seq_len + 1 = "
                f"{seq_len + 1} tokens (lines {lines}); use a longer --training.seq-len or shorten them"
            )
        logger.info(
            f"SFT data {source}: {s.documents} examples in, {s.written} kept, {s.too_long} too long; "
            f"{s.tokens:,} tokens, {s.target_tokens:,} with loss"
        )

    def _tokenize_sample(self, sample: dict[str, Any]) -> tuple[list[int], list[int]]:
        """The pre-tokenized ``(input_ids, label_ids)`` of one kept example."""
        return list(sample["input_ids"]), list(sample["label_ids"])

    def _flush_buffers(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs, labels = super()._flush_buffers()
        if not self.positions:
            del inputs["positions"]
        return inputs, labels

    def state_dict(self) -> dict[str, Any]:
        """ChatDataset's state (copied, so later packing cannot change it) plus the data's shape."""
        state = {k: list(v) if isinstance(v, list) else v for k, v in super().state_dict().items()}
        return state | {"sft_examples": self.stats.written, "seq_len": self.seq_len}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a state of other data or another ``seq_len`` is refused.

        Raises:
            ValueError: if the state was saved with another number of kept examples or ``seq_len``.
        """
        saved = (state_dict.get("sft_examples", self.stats.written), state_dict.get("seq_len", self.seq_len))
        if saved != (self.stats.written, self.seq_len):
            raise ValueError(
                f"{self._dataset_id}: checkpointed data position was for {saved[0]} examples at seq_len "
                f"{saved[1]}, but this run has {self.stats.written} at {self.seq_len}; resume with the same "
                "file and sequence length, or start in a fresh --dump-folder"
            )
        super().load_state_dict(state_dict)


def _unused(sample: Mapping[str, Any]) -> Any:
    raise AssertionError("SFTDataset tokenizes its records itself")  # ChatDataset's hook, never called


def _encode_all(
    records: Iterable[Mapping[str, Any]], tokenizer: HuggingFaceTokenizer, seq_len: int
) -> tuple[SFTStats, list[dict[str, Any]]]:
    """Stats and the ``{"line", "input_ids", "label_ids"}`` rows of the examples that fit."""
    stats, rows = SFTStats(), []
    eos_id, bos = tokenizer.eos_id, adds_bos(tokenizer)
    for record in records:
        stats.documents += 1
        ids, target = encode_example(record, tokenizer, eos_id, bos)
        if len(ids) - 1 > seq_len:
            stats.too_long += 1
            stats.too_long_lines.append(record["line"])
            continue
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], target[1:], strict=True)]
        rows.append({"line": record["line"], "input_ids": ids[:-1], "label_ids": labels})
        stats.written += 1
        stats.tokens += len(labels)
        stats.target_tokens += sum(label != IGNORE_INDEX for label in labels)
    return stats, rows
