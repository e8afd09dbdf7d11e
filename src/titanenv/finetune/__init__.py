"""``titanenv finetune``: LoRA fine-tuning of a Hugging Face Llama, or of a titanenv run, offline.

A fine-tune is a training run (:mod:`titanenv.train`) with three differences, all resolved here
on the login node before anything starts or is submitted:

- **The base** (``--from``): a Hugging Face ``LlamaForCausalLM`` folder (safetensors), a repo id
  already in the local Hub cache (``HF_HOME``; fetched with ``titanenv assets fetch --add
  model:ORG/NAME``), or a ``titanenv train`` run folder, whose newest checkpoint is exported
  first (``titanenv export``). TorchTitan reads it with ``--checkpoint.initial-load-path DIR
  --checkpoint.initial-load-in-hf``; on a requeue the run's own checkpoints win, as always.
- **The model config is checked against the recipe** field by field (:func:`check_base`):
  vocabulary, every dimension, the norm epsilon and RoPE (theta and llama3 scaling). A mismatch
  names the ``config.json`` field, both values and the fix, before torchrun starts.
- **LoRA** (:mod:`titanenv.train.lora`): ``--lora-rank``, ``--lora-alpha``, ``--lora-dropout``
  and ``--target-modules`` (TorchTitan names; attention and MLP by default) override the
  recipe's. Only the adapters train; the trainer fails at start-up otherwise.

Data is either ``--data PREFIX`` (``titanenv preprocess`` output: every token trains) or
``--sft FILE.jsonl`` (prompt/response or chat messages: the loss is masked on the prompt; see
:mod:`titanenv.train.sft`). Every other flag is ``titanenv train``'s, including ``--submit``:
the batch job is the same sbatch script, run as ``sbatch jsc/run_training_jwb.sbatch finetune
FLAGS``. Then ``titanenv export RUN`` writes the adapter in PEFT's format (``--merge``: a full
model) and ``titanenv eval --model`` scores either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from titanenv.train.settings import TrainArgs, option

__all__ = [
    "HF_DEFAULT_RECIPE",
    "BaseMismatch",
    "FinetuneArgs",
    "FinetuneError",
    "check_base",
    "check_data",
    "resolve",
    "resolve_base",
]

HF_DEFAULT_RECIPE = "titanenv_1b_lora"


def _modules(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    from titanenv.train.lora import LORA_TARGETS

    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(
            f"{value!r}: name TorchTitan llama3 Linears, comma-separated, from {','.join(LORA_TARGETS)} "
            "(q/k/v are fused as wqkv)"
        )
    return names


@dataclass(frozen=True, kw_only=True)
class FinetuneArgs(TrainArgs):
    """The flags of ``titanenv finetune``: ``titanenv train``'s table plus the base, SFT data and LoRA rows."""

    # fmt: off
    base: Path = field(metadata=option(
        "--from", titan="--checkpoint.initial-load-path",
        help="Base model: a Hugging Face Llama folder (config.json, *.safetensors, tokenizer.json), a repo id "
        "in the local Hub cache (HF_HOME), or a `titanenv train` run folder (its newest checkpoint is exported)."))
    data: Path | None = field(default=None, metadata=option(
        "--data", help="Tokenized dataset prefix (PREFIX.bin/.idx from `titanenv preprocess`): every token trains. "
        "Or use --sft."))
    sft: Path | None = field(default=None, metadata=option(
        "--sft", titan="--dataloader.sft-path",
        help="Instruction data, JSONL: {\"prompt\": ..., \"response\": ...} or {\"messages\": [...]} per line; "
        "the loss is masked on the prompt."))
    tokenizer: Path | None = field(default=None, metadata=option(  # type: ignore[assignment]
        "--tokenizer", help="tokenizer.json, or a folder with it. Default: the base model's."))
    recipe: str = field(default="", metadata=option(
        "--recipe", always=True,
        help=f"Config function in titanenv.train.recipes. Default: {HF_DEFAULT_RECIPE} for a Hugging Face base, "
        "RECIPE_lora for a titanenv run of RECIPE or its export (e.g. titanenv_debug_lora)."))
    lora_rank: int | None = field(default=None, metadata=option(
        "--lora-rank", titan="--lora.rank", help="LoRA rank r (PEFT's r). Default: the recipe's."))
    lora_alpha: float | None = field(default=None, metadata=option(
        "--lora-alpha", titan="--lora.alpha", help="LoRA alpha: adapters scale by alpha/r. Default: the recipe's."))
    lora_dropout: float | None = field(default=None, metadata=option(
        "--lora-dropout", titan="--lora.dropout", help="Dropout on the adapters' input. Default: the recipe's."))
    target_modules: tuple[str, ...] | None = field(default=None, metadata=option(
        "--target-modules", titan="--lora.target-modules", cli_type=str | None, parse=_modules, show=",".join,
        help="Comma-separated TorchTitan Linears with adapters: wqkv,wo (attention), w1,w2,w3 (MLP). "
        "Default: the recipe's (all five)."))
    vocab_size: int | None = field(default=None, metadata=option(
        "--vocab-size", titan="--vocab-size", help="Model vocabulary. Default: the base's config.json vocab_size."))
    # fmt: on


class BaseMismatch(ValueError):
    """The base model's ``config.json`` does not match the recipe; ``fields`` names each differing field."""

    def __init__(self, config_path: Path, recipe: str, fields: list[tuple[str, Any, Any]]) -> None:
        self.fields = [f for f, _, _ in fields]
        lines = [f"  {name}: config.json has {got!r}, recipe {recipe} builds {want!r}" for name, got, want in fields]
        super().__init__(
            f"{config_path}: the base model does not match recipe {recipe}:\n" + "\n".join(lines) + "\n"
            "fix: pick the recipe of this model's shape with --recipe, or a base of the recipe's shape"
        )


def resolve_base(base: str | Path) -> tuple[Path, str | None]:
    """The Hugging Face folder of ``base`` and the default recipe for it.

    Returns:
        ``(folder, recipe)``: the recipe is ``RECIPE_lora`` for a titanenv run of ``RECIPE`` or its
        export, else None (the caller's default).

    Raises:
        FileNotFoundError: nothing usable at ``base``; the message has the command that fetches it.
        ValueError: a run that is itself a LoRA fine-tune, or has no ``_lora`` recipe.
    """
    path = Path(base)
    if (path / "trainer_config.json").is_file():
        from titanenv import export
        from titanenv.train.model import read_run_record
        from titanenv.train.recipes import recipe_names

        run = read_run_record(path)
        if run.lora is not None:
            raise ValueError(
                f"{path}: a LoRA fine-tune; fine-tune its merged export instead: titanenv export {path} --merge"
            )
        recipe = f"{run.recipe}_lora"
        if recipe not in recipe_names():
            raise ValueError(f"{path}: recipe {run.recipe} has no LoRA variant; pass --recipe")
        return export.cached_export(path).absolute(), recipe
    if path.is_dir():
        return path.absolute(), _export_recipe(path)
    if not path.exists() and str(base).count("/") == 1 and not str(base).startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(base), local_files_only=True)), None
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"--from {base}: not in the local Hub cache (HF_HOME); fetch it on a login node: "
                f"TITANENV_OFFLINE=0 ./container_run.sh titanenv assets fetch --add model:{base}"
            ) from None
    raise FileNotFoundError(
        f"--from {base}: no such folder; pass a Hugging Face model folder, a repo id in the Hub cache, "
        "or a `titanenv train` run folder"
    )


def _export_recipe(folder: Path) -> str | None:
    """``RECIPE_lora`` when ``folder`` is a titanenv export of a run of ``RECIPE`` that is still there, else None."""
    from titanenv.train.recipes import recipe_names

    try:
        run_dir = Path(json.loads((folder / "titanenv-export.json").read_text())["run_dir"])
        recipe = json.loads((run_dir / "trainer_config.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"{recipe}_lora" if f"{recipe}_lora" in recipe_names() else None


def _hf_rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE fields of a ``config.json`` in one shape: transformers 5's ``rope_parameters`` or 4.x's."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    return params


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return bool(a == b)


def check_base(hf_dir: Path, recipe: str, tokenizer_dir: Path) -> int:
    """Check the base's ``config.json`` against ``recipe``; returns the model vocabulary to build.

    Compared: ``model_type``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``hidden_act``,
    ``rms_norm_eps``, ``tie_word_embeddings``, ``attention_bias``, ``mlp_bias`` and RoPE
    (``rope_theta``, ``rope_type``, ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``), against what :func:`titanenv.export.convert.hf_config`
    writes for the recipe's model, so the mapping lives in one place. ``vocab_size`` must hold
    the tokenizer's vocabulary.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors weights in ``hf_dir``.
        BaseMismatch: naming every differing field.
    """
    import torch

    from titanenv.export.convert import hf_config
    from titanenv.train.recipes import load_recipe, set_vocab_size, tokenizer_vocab_size, use_causal_sdpa

    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; --from must be a Hugging Face model folder")
    if not any(hf_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{hf_dir}: no *.safetensors weights (TorchTitan reads safetensors only); re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    cfg = json.loads(path.read_text())
    vocab = int(cfg.get("vocab_size", 0))
    config = load_recipe(recipe)
    set_vocab_size(config, vocab)
    use_causal_sdpa(config.model_spec)
    model_config = config.model_spec.model
    model_config.update_from_config(config=config)
    with torch.device("meta"):
        state = model_config.build().state_dict()
    want = hf_config(model_config, state, config.training.seq_len)
    got = dict(cfg)
    heads = got.get("num_attention_heads")
    got.setdefault("num_key_value_heads", heads)
    if heads:
        got.setdefault("head_dim", int(got.get("hidden_size", 0)) // int(heads))
    got.setdefault("hidden_act", "silu")
    got.setdefault("attention_bias", False)
    got.setdefault("mlp_bias", False)
    got.setdefault("tie_word_embeddings", False)  # LlamaConfig's default
    names = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
             "attention_bias", "mlp_bias"]  # fmt: skip
    bad = [(n, got.get(n), want[n]) for n in names if not _same(got.get(n), want[n])]
    rope_got, rope_want = _hf_rope(got), want["rope_parameters"]
    for key in sorted(set(rope_got) | set(rope_want)):
        scaled = key in ("rope_type", "rope_theta") or rope_want.get("rope_type") != "default"
        if scaled and not _same(rope_got.get(key), rope_want.get(key)):
            name = key if key == "rope_theta" else f"rope_scaling.{key}"
            bad.append((name, rope_got.get(key), rope_want.get(key)))
    # A config.json with both spellings (transformers 5 and 4.x) must agree in both.
    theta_named = any(name == "rope_theta" for name, _, _ in bad)
    if "rope_theta" in got and not theta_named and not _same(got["rope_theta"], rope_want["rope_theta"]):
        bad.append(("rope_theta", got["rope_theta"], rope_want["rope_theta"]))
    tok_vocab = tokenizer_vocab_size(tokenizer_dir)
    if vocab < tok_vocab:
        bad.append(("vocab_size", vocab, f">= {tok_vocab} (the tokenizer's)"))
    if bad:
        raise BaseMismatch(path, recipe, bad)
    return vocab


class FinetuneError(ValueError):
    """A fine-tune setting that cannot work; ``flag`` is the ``titanenv finetune`` flag to fix."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")
        self.message = message


def check_data(args: FinetuneArgs) -> int | None:
    """Exactly one of ``--data`` and ``--sft``; the number of SFT examples (None for ``--data``).

    Raises:
        FinetuneError: no data, both, a missing ``.bin``/``.idx``, or a bad SFT line (``FILE:LINE``).
    """
    if (args.data is None) == (args.sft is None):
        raise FinetuneError("--data/--sft", "pass exactly one of --data PREFIX and --sft FILE.jsonl")
    if args.data is not None:
        for suffix in (".bin", ".idx"):
            if not Path(f"{args.data}{suffix}").is_file():
                raise FinetuneError(
                    "--data", f"{args.data}{suffix}: no such file; create it with `titanenv preprocess`"
                )
        return None
    assert args.sft is not None
    from titanenv.train.sft import read_sft

    try:
        return len(read_sft(args.sft))
    except (OSError, ValueError) as e:
        raise FinetuneError("--sft", str(e)) from None


def resolve(args: FinetuneArgs) -> FinetuneArgs:
    """``args`` with the base, tokenizer, recipe, vocabulary and LoRA settled, checked against each other.

    Raises:
        FinetuneError: naming the flag, for every failed check (nothing has started).
    """
    from titanenv.train.lora import LoraOptions
    from titanenv.train.recipes import load_recipe, recipe_names

    try:
        hf_dir, run_recipe = resolve_base(args.base)
    except (OSError, ValueError) as e:
        raise FinetuneError("--from", str(e)) from None
    recipe = args.recipe or run_recipe or HF_DEFAULT_RECIPE
    if recipe not in recipe_names():
        raise FinetuneError("--recipe", f"{recipe!r}: choose one of {', '.join(recipe_names())}")
    tokenizer = Path(args.tokenizer or hf_dir).absolute()
    tok_json = tokenizer if tokenizer.is_file() else tokenizer / "tokenizer.json"
    if not tok_json.is_file():
        raise FinetuneError("--tokenizer", f"{tok_json}: no such file; pass --tokenizer")
    try:
        vocab = check_base(hf_dir, recipe, tok_json.parent)
    except (OSError, ValueError) as e:
        raise FinetuneError("--from", str(e)) from None
    if args.vocab_size not in (None, vocab):
        raise FinetuneError("--vocab-size", f"{args.vocab_size}: the base has vocab_size {vocab}")
    config = load_recipe(recipe)
    base = config.lora
    lora = LoraOptions(
        rank=base.rank if args.lora_rank is None else args.lora_rank,
        alpha=base.alpha if args.lora_alpha is None else args.lora_alpha,
        dropout=base.dropout if args.lora_dropout is None else args.lora_dropout,
        target_modules=list(base.target_modules if args.target_modules is None else args.target_modules),
    )
    if lora.rank <= 0:
        raise FinetuneError("--lora-rank", f"recipe {recipe} has no LoRA adapters; pass --lora-rank R "
                            f"or --recipe {recipe}_lora")  # fmt: skip
    try:
        lora.validate()
    except ValueError as e:
        flag = {"--lora.rank": "--lora-rank", "--lora.dropout": "--lora-dropout"}.get(str(e).split()[0])
        raise FinetuneError(flag or "--target-modules", str(e)) from None
    extra = tuple(args.extra)
    if not config.checkpoint.initial_load_in_hf and "--checkpoint.initial-load-in-hf" not in extra:
        extra = ("--checkpoint.initial-load-in-hf", *extra)
    sft = None if args.sft is None else args.sft.absolute()
    return replace(args, base=hf_dir, tokenizer=tokenizer, recipe=recipe, vocab_size=vocab, sft=sft, extra=extra)
