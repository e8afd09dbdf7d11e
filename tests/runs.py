"""Tiny real training runs for tests that need a checkpoint (export, generation, evaluation).

:func:`make_tiny_run` preprocesses the bundled C4 sample with the real data stage and trains
the ``titanenv_debug`` recipe for a few steps on CPU through ``titanenv.train.cli.train``
(torchrun, one process). The session fixture ``tiny_run`` in ``tests/conftest.py`` builds
each tokenizer's run once per session::

    def test_something(tiny_run):
        run = tiny_run("gpt2")  # or "test"
        run.run_dir, run.data, run.tokenizer, run.step

About 30 s per run on 2 cores (most of it torchrun and imports).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
TOKENIZERS = {
    "test": SAMPLE / "torchtitan_test_tokenizer",  # vocabulary 2,020 -> model 2,048
    "gpt2": SAMPLE / "gpt2_tokenizer.json",  # vocabulary 50,257 -> model 50,304
}
SEQ_LEN = 32
BATCH = 2
STEPS = 3


@dataclass(frozen=True)
class TinyRun:
    """A finished ``titanenv train`` run folder and what made it.

    Attributes:
        run_dir: the ``--output-dir`` (``checkpoint/step-STEPS``, ``trainer_config.json``, ``tokenizer/``).
        data: the tokenized dataset prefix (``PREFIX.bin``/``.idx``/``.manifest.json``) it trained on.
        tokenizer: the tokenizer argument passed to training (a file or a folder).
        step: the final (and only) complete checkpoint's step.
        seq_len: training sequence length in tokens.
        log: the file holding torchrun's output.
    """

    run_dir: Path
    data: Path
    tokenizer: Path
    step: int
    seq_len: int
    log: Path


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's fds 1 and 2 (inherited by torchrun and its workers) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def make_tiny_run(
    root: Path, tokenizer: str = "test", *, steps: int = STEPS, seq_len: int = SEQ_LEN, **train: Any
) -> TinyRun:
    """Preprocess sample C4 text with ``TOKENIZERS[tokenizer]`` and train ``steps`` steps into ``root/run``.

    ``train``: more ``titanenv train`` keyword arguments (e.g. ``export_at_end=True``).

    Raises:
        KeyError: an unknown ``tokenizer`` name.
        AssertionError: training did not leave a complete ``checkpoint/step-STEPS`` (log path named).
    """
    from titanenv.data import preprocess as pp
    from titanenv.train import checkpoints, cli

    tok = TOKENIZERS[tokenizer]
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data" / "train"
    pp.run(
        pp.PreprocessConfig(
            inputs=sorted(SAMPLE.glob("c4-sample.*.json.gz")),
            output_prefix=data,
            tokenizer_model=str(tok),
            append_eod=True,
        )
    )
    run_dir = root / "run"
    log = root / "train.log"
    with output_to(log):
        cli.train(
            data=data,
            tokenizer=tok,
            output_dir=run_dir,
            steps=steps,
            seq_len=seq_len,
            batch_size=BATCH,
            checkpoint_interval=1000,  # the last step is always saved
            preflight=False,
            extra=["--debug.seed", "0"],
            **train,
        )
    assert checkpoints.complete_steps(run_dir / "checkpoint") == [steps], log.read_text()[-3000:]
    return TinyRun(run_dir=run_dir, data=data, tokenizer=tok, step=steps, seq_len=seq_len, log=log)


def tiny_llama(folder: Path, seed: int, tokenizer_json: Path) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (hidden 32) with the GPT-2 tokenizer, saved in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=50256, eos_token_id=50256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=eot, bos_token=eot).save_pretrained(folder)
    return folder
