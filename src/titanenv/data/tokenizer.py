"""Find and load a Hugging Face ``tokenizer.json`` without touching the network."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

# Tried in order when the tokenizer folder does not name its EOS token.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class TokenizerNotFound(FileNotFoundError):
    """The tokenizer is not on disk; the message holds the command that fetches it."""


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer and the facts the data and training stages record about it."""

    tokenizer: Tokenizer
    path: Path
    """The ``tokenizer.json`` file."""
    sha256: str
    vocab_size: int
    """Ids in use, special tokens included (``get_vocab_size(with_added_tokens=True)``)."""
    eod_id: int | None


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not an existing local path: a Hub repo id (never ``./x/y``, ``/x/y``, ``~/x``)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def resolve(model: str | os.PathLike[str]) -> Path:
    """Find ``tokenizer.json`` for a tokenizer argument: titanenv's one tokenizer-folder resolver
    (``preprocess --tokenizer-model``, ``train --tokenizer``, the training preflight, the doctor).

    Args:
        model: a ``tokenizer.json`` file (any name), a folder holding one, or a Hub repo id
            (``org/name``, :func:`is_hub_id`) looked up in the local cache (``HF_HOME``) only.

    Returns:
        The absolute path of the ``tokenizer.json`` (symlinks resolved, except in the Hub cache).

    Raises:
        TokenizerNotFound: nothing matches; the message says how to fetch it.
    """
    path = Path(model)
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return (path / "tokenizer.json").resolve()
        raise TokenizerNotFound(f"{path}: folder has no tokenizer.json")
    text = os.fspath(model)
    if is_hub_id(text):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(text, "tokenizer.json")
        if isinstance(found, str):
            return Path(found)
        raise TokenizerNotFound(
            f"tokenizer {text!r} is not in the local Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). On a login node, run:\n"
            f"  TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch --add {shlex.quote('tokenizer:' + text)}"
        )
    raise TokenizerNotFound(f"{text}: no such tokenizer file or folder")


def load(model: str | os.PathLike[str], eod_token: str | None = None) -> TokenizerInfo:
    """Load a tokenizer and find its end-of-document id.

    The EOD token is ``eod_token`` when given, else the ``eos_token`` of a
    ``tokenizer_config.json`` beside the file, else the first of :data:`EOD_CANDIDATES`
    in the vocabulary; ``eod_id`` is None when none is found.

    Raises:
        TokenizerNotFound: see :func:`resolve`.
        ValueError: the file is not a valid ``tokenizer.json``, or ``eod_token`` is not in it.
    """
    path = resolve(model)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    name = eod_token or _configured_eos(path.parent / "tokenizer_config.json")
    if eod_token is not None and tok.token_to_id(eod_token) is None:
        raise ValueError(f"{path}: --eod-token {eod_token!r} is not in the vocabulary")
    candidates = (name, *EOD_CANDIDATES) if name else EOD_CANDIDATES
    eod = next((i for c in candidates if (i := tok.token_to_id(c)) is not None), None)
    return TokenizerInfo(tok, path, sha, tok.get_vocab_size(with_added_tokens=True), eod)


def _configured_eos(config: Path) -> str | None:
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
