"""Text continuation with a run's TorchTitan model or an exported / Hugging Face folder.

Both kinds of model go through one token loop and one sampler over the last position's logits,
so a run and its export (:mod:`titanenv.export`) give the same text for the same seed. There
is no KV cache: the whole window is run again for each new token, which is fine for the small
models and short texts this is for.

The sampler (:class:`Sampler`), at each step, over the float32 logits of the tokenizer's real
ids (rows of a padded vocabulary are dropped):

1. greedy (``greedy=True`` or ``temperature == 0``): the argmax (ties: the lowest id);
2. otherwise softmax of ``logits / temperature`` in float64;
3. top-p (nucleus): sort the probabilities descending (stable: ties by id), keep the shortest
   prefix whose mass reaches ``top_p`` (at least one token);
4. draw ``u`` uniform in [0, 1) from a CPU :class:`torch.Generator` seeded with ``seed`` and take
   the first kept token whose cumulative mass exceeds ``u * kept mass`` (inverse CDF).

Each prompt gets its own generator seeded with ``seed``, so a prompt's text does not depend on
the other prompts in the list, nor on the device (sampling always runs on CPU).

Prompts are encoded as the data was: for a run, with the run's ``tokenizer.json`` and no
special tokens (titanenv data has no BOS; an empty prompt starts from the end-of-document
token, as every document after the first does in training); for a Hugging Face folder, with
its tokenizer's own rule (an export's ``tokenizer_config.json`` says ``add_bos_token: false``).
Generation stops at the end-of-document / EOS token(s), which are not part of the text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ModelNotFound",
    "Sampler",
    "TextModel",
    "continue_ids",
    "generate",
    "generate_text",
    "load_text_model",
    "read_prompts",
]

RUN_MARKER = "trainer_config.json"
"""A run folder of ``titanenv train`` has this file (:data:`titanenv.train.recipes.CONFIG_RECORD`)."""
HF_MARKER = "config.json"
"""An exported or Hugging Face model folder has this file."""


class ModelNotFound(FileNotFoundError):
    """The model argument is not a run folder nor a Hugging Face folder; the message says what it needs."""


@dataclass(frozen=True)
class Sampler:
    """How the next token is picked from one position's logits (see the module docstring).

    Attributes:
        temperature: divides the logits; > 0, or 0 for greedy.
        top_p: nucleus mass in (0, 1]; 1 keeps every token.
        greedy: argmax, ignoring ``temperature`` and ``top_p``.

    Raises:
        ValueError: on a negative temperature or ``top_p`` outside (0, 1].
    """

    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """The next token id.

        Args:
            logits: ``float[V]`` of one position, real ids only, on CPU.
            generator: CPU generator; one ``float64`` uniform is drawn from it unless greedy.
        """
        if self.is_greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        keep = int(torch.searchsorted(cum, torch.tensor([self.top_p], dtype=cum.dtype))[0]) + 1
        keep = min(keep, cum.numel())
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        target = torch.tensor([u * float(cum[keep - 1])], dtype=cum.dtype)  # a point in the kept mass
        index = int(torch.searchsorted(cum[:keep], target, right=True)[0])  # first cum > target
        return int(order[min(index, keep - 1)])


@dataclass(frozen=True)
class TextModel:
    """A model and tokenizer, ready for :func:`continue_ids`.

    Attributes:
        forward: ``int64[1, L]`` token ids on ``device`` to ``float[1, L, >= vocab_size]`` logits.
        encode: prompt text to token ids (the rule in the module docstring).
        decode: token ids to text (special tokens dropped).
        vocab_size: real token ids; logits beyond are vocabulary padding and never picked.
        stop_ids: end-of-document / EOS ids; generation stops at the first one.
        context: the model sees at most this many trailing tokens (training ``seq_len``, or the
            Hugging Face config's ``max_position_embeddings``).
        device: where ``forward`` runs.
        description: for logs, e.g. ``run OUT step 8`` or ``hugging face folder PATH``.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int
    stop_ids: frozenset[int]
    context: int
    device: torch.device
    description: str


@torch.no_grad()
def continue_ids(
    model: TextModel, ids: Sequence[int], *, max_new_tokens: int, sampler: Sampler, seed: int = 0
) -> list[int]:
    """New token ids after ``ids`` (stop id excluded), at most ``max_new_tokens`` of them.

    Raises:
        ValueError: if ``ids`` is empty.
    """
    if not ids:
        raise ValueError("empty prompt: the model needs at least one token to continue from")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens, new = list(ids), []
    for _ in range(max_new_tokens):
        window = torch.tensor([tokens[-model.context :]], dtype=torch.int64, device=model.device)
        logits = model.forward(window)[0, -1, : model.vocab_size].float().cpu()
        nxt = sampler.pick(logits, generator)
        if nxt in model.stop_ids:
            break
        tokens.append(nxt)
        new.append(nxt)
    return new


def load_text_model(model: str | os.PathLike[str], *, step: int | None = None, device: str = "cpu") -> TextModel:
    """Load a run folder (the training code's model, :func:`titanenv.train.model.load_model`) or a
    Hugging Face folder (transformers ``AutoModelForCausalLM`` / ``AutoTokenizer``, local files only).

    Args:
        model: a run folder of ``titanenv train`` (has ``trainer_config.json`` and ``checkpoint/``)
            or an exported / Hugging Face folder (has ``config.json``).
        step: checkpoint step of a run (default: the latest complete one); runs only.
        device: ``cpu`` or ``cuda``. Hugging Face weights load as float32 on CPU, in their
            stored dtype on CUDA.

    Raises:
        ModelNotFound: ``model`` is missing or holds neither marker file.
        FileNotFoundError: the run has no (such) complete checkpoint, or no tokenizer.
        ValueError: ``step`` with a Hugging Face folder, or an unknown ``device``.
        RuntimeError: ``device="cuda"`` without a usable GPU.
    """
    path = Path(model)
    dev = _device(device)
    if (path / RUN_MARKER).is_file():
        return _run_model(path, step, dev)
    if (path / HF_MARKER).is_file():
        if step is not None:
            raise ValueError(
                f"--step {step}: {path} is a Hugging Face folder (one set of weights); --step picks a run's checkpoint"
            )
        return _hf_model(path, dev)
    what = "no such folder" if not path.exists() else f"neither {RUN_MARKER} nor {HF_MARKER} in it"
    raise ModelNotFound(
        f"{path}: {what}. MODEL is a run folder of `titanenv train` (with {RUN_MARKER} and checkpoint/step-N/) "
        f"or an exported / Hugging Face folder (with {HF_MARKER}, the weights and the tokenizer files, "
        "e.g. RUN/export/step-N from `titanenv export`)"
    )


def generate_text(
    model: str | os.PathLike[str],
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    step: int | None = None,
    device: str = "cpu",
) -> list[str]:
    """Continue each prompt with a run's model or a Hugging Face folder, offline.

    Sets the offline environment first (:func:`titanenv.offline.apply`), so nothing reaches
    for the network. Deterministic for a given ``seed`` (sampling: module docstring).

    Args:
        model: run folder or Hugging Face folder (see :func:`load_text_model`).
        prompts: texts to continue.
        max_new_tokens: upper bound on generated tokens per prompt.
        temperature: > 0 samples (lower is sharper); 0 is greedy.
        top_p: nucleus mass in (0, 1].
        seed: seeds a fresh generator for each prompt.
        greedy: argmax decoding (``temperature``, ``top_p`` and ``seed`` are ignored).
        step: checkpoint step of a run (default: latest complete).
        device: ``cpu`` or ``cuda``.

    Returns:
        One continuation per prompt, without the prompt.

    Raises:
        ModelNotFound, FileNotFoundError, ValueError, RuntimeError: see :func:`load_text_model`
        and :class:`Sampler`; ValueError also for an empty prompt to a model with no start token.
    """
    from titanenv import offline

    offline.apply()
    sampler = Sampler(temperature=temperature, top_p=top_p, greedy=greedy)
    loaded = load_text_model(model, step=step, device=device)
    return [
        loaded.decode(continue_ids(loaded, loaded.encode(p), max_new_tokens=max_new_tokens, sampler=sampler, seed=seed))
        for p in prompts
    ]


def read_prompts(values: Sequence[str]) -> list[str]:
    """The prompts of ``--prompt`` values, in order.

    ``TEXT`` is one prompt; ``@FILE`` is one prompt per non-empty line of FILE (UTF-8; the
    line break is not part of the prompt), or, for ``FILE.jsonl``, the ``"prompt"`` string of
    each JSON line (so prompts may hold line breaks); ``@@TEXT`` is the literal ``@TEXT``.

    Raises:
        FileNotFoundError: no such FILE.
        ValueError: a JSONL line that is not an object with a string ``"prompt"``.
    """
    prompts: list[str] = []
    for value in values:
        if value.startswith("@@") or not value.startswith("@"):
            prompts.append(value[1:] if value.startswith("@@") else value)
            continue
        path = Path(value[1:])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such prompt file (--prompt @FILE; use @@TEXT for a literal @TEXT)")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix != ".jsonl":
            prompts += [line for line in lines if line.strip()]
            continue
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{n}: expected a JSON object with a string "prompt"')
            prompts.append(row["prompt"])
    return prompts


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: str | os.PathLike[str],
    prompt: str,
    *,
    max_new_tokens: int = 32,
    context: int = 512,
    stop_at_eod: bool = True,
) -> str:
    """Greedy continuation of ``prompt`` by an already loaded run model (``titanenv eval --prompt``).

    Args:
        model: from :func:`titanenv.train.model.load_model` (CPU).
        tokenizer: ``tokenizer.json`` or a folder holding it.
        prompt: text to continue.
        max_new_tokens: upper bound on generated tokens.
        context: keep at most this many trailing tokens as model input (<= training seq_len).
        stop_at_eod: stop at the tokenizer's end-of-document token (same rule as preprocessing).

    Returns:
        The generated text only (without the prompt).

    Raises:
        FileNotFoundError: if there is no tokenizer at ``tokenizer``.
    """
    loaded = _with_run_tokenizer(model, tokenizer, context, torch.device("cpu"), "run model", stop_at_eod)
    return loaded.decode(
        continue_ids(loaded, loaded.encode(prompt), max_new_tokens=max_new_tokens, sampler=Sampler(greedy=True))
    )


def _device(name: str) -> torch.device:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r}: use cpu or cuda (cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    return torch.device(name)


def _run_model(output_dir: Path, step: int | None, device: torch.device) -> TextModel:
    from titanenv.train.model import load_model

    net, run, step, _ = load_model(output_dir, step=step)
    net.to(device)
    tokenizer = run.tokenizer_dir
    if not tokenizer.is_dir() and (output_dir / "tokenizer").is_dir():
        tokenizer = output_dir / "tokenizer"  # the run folder was moved: its own copy
    return _with_run_tokenizer(net, tokenizer, run.seq_len, device, f"run {output_dir} step {step}", True)


def _with_run_tokenizer(
    net: torch.nn.Module,
    tokenizer: str | os.PathLike[str],
    context: int,
    device: torch.device,
    description: str,
    stop_at_eod: bool,
) -> TextModel:
    from titanenv.data import tokenizer as toklib

    info = toklib.load(tokenizer)
    tok, eod = info.tokenizer, info.eod_id

    def encode(text: str) -> list[int]:
        ids: list[int] = tok.encode(text, add_special_tokens=False).ids  # as preprocessing encodes documents
        return ids if ids or eod is None else [eod]

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = net(ids)
        return out

    return TextModel(
        forward=forward,
        encode=encode,
        decode=lambda ids: str(tok.decode(ids)),
        vocab_size=info.vocab_size,
        stop_ids=frozenset([eod] if stop_at_eod and eod is not None else []),
        context=context,
        device=device,
        description=description,
    )


def _hf_model(folder: Path, device: torch.device) -> TextModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    dtype: torch.dtype | str = torch.float32 if device.type == "cpu" else "auto"
    net: torch.nn.Module = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    net.to(device).eval()
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(net.generation_config, "eos_token_id", None)
    stop |= set(configured if isinstance(configured, list) else [] if configured is None else [configured])
    context = int(getattr(net.config, "max_position_embeddings", None) or 2048)

    def encode(text: str) -> list[int]:
        ids: list[int] = tok(text)["input_ids"]
        return ids if ids or tok.eos_token_id is None else [tok.eos_token_id]  # as for a run: start a document

    def forward(ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = net(input_ids=ids).logits
        return out

    return TextModel(
        forward=forward,
        encode=encode,
        decode=lambda ids: str(tok.decode(ids, skip_special_tokens=True)),
        vocab_size=len(tok),
        stop_ids=frozenset(int(i) for i in stop),
        context=context,
        device=device,
        description=f"hugging face folder {folder}",
    )
