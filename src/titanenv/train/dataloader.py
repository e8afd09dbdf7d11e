"""Pre-tokenized Megatron ``.bin/.idx`` data as a TorchTitan dataloader.

The token stream of an :class:`~titanenv.data.indexed.IndexedDataset` (documents
concatenated, each already ending in the end-of-document token) is cut into
contiguous windows of ``seq_len + 1`` tokens; window ``i`` covers
``tokens[i*seq_len : (i+1)*seq_len + 1]``, so neighbouring windows share one token
and no token is dropped except the tail that does not fill a window. A window gives
``input = w[:-1]`` and ``label = w[1:]`` (both int64, shape ``[seq_len]``).

Order is deterministic: per epoch, a permutation of the window indices seeded by
``(seed, epoch)`` (or the natural order with ``shuffle=False``). Data-parallel rank
``r`` of ``W`` takes every ``W``-th window of that order starting at ``r``; the
epoch is cut to a multiple of ``W`` windows so every rank yields the same number of
samples. When an epoch ends the next one starts (logged), so the loader never runs
dry. The position inside the epoch is checkpointed, so a resumed run continues with
exactly the sample that would have come next.

Plug-in point: TorchTitan builds ``config.dataloader`` with
``build(dp_world_size=, dp_rank=, tokenizer=, seq_len=, local_batch_size=,
snapshot_every_n_steps=)``; ``seq_len`` and the batch size therefore come from
``--training.seq-len`` / ``--training.local-batch-size``, not from this config.

With ``sft_path`` set (``--dataloader.sft-path FILE.jsonl``, what ``titanenv finetune --sft``
passes) the same loader serves instruction data instead: packed, prompt-masked examples
from :class:`titanenv.train.sft.SFTDataset`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from titanenv.data import manifest as manifestlib
from titanenv.data import tokenizer as toklib
from titanenv.data.indexed import IndexedDataset, bin_path, idx_path
from titanenv.train import sft

__all__ = [
    "MegatronDataloader",
    "TokenWindowDataset",
    "document_positions",
    "resolve_eod_id",
]


def document_positions(inputs: np.ndarray, eod_id: int) -> np.ndarray:
    """Per-document positions for one window of input ids.

    Position 0 is the window's first token and every token right after an
    ``eod_id``; positions count up from there. TorchTitan's FlexAttention/varlen
    backends read a reset to 0 as a document start and mask attention across it.

    Args:
        inputs: ``[L]`` integer token ids.
        eod_id: end-of-document token id.

    Returns:
        ``[L]`` int64 positions, each ``< L``.
    """
    n = inputs.shape[0]
    idx = np.arange(n, dtype=np.int64)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = inputs[:-1] == eod_id
    last_start = np.maximum.accumulate(np.where(starts, idx, 0))
    return idx - last_start


def resolve_eod_id(tokenizer_dir: str | os.PathLike[str], eod_token: str, manifest: manifestlib.Manifest | None) -> int:
    """The end-of-document id that separates documents in the data.

    ``eod_token`` when given (looked up in ``tokenizer_dir/tokenizer.json``); else the
    ``eod_id`` that ``titanenv preprocess`` recorded in the data's manifest; else the
    rule preprocess applies (:func:`titanenv.data.tokenizer.load`: the EOS of
    ``tokenizer_config.json``, then well-known EOD tokens).

    Raises:
        ValueError: if no EOD id can be found, or ``eod_token`` is not in the tokenizer.
    """
    if not eod_token and manifest is not None and manifest.tokenizer.eod_id is not None:
        return manifest.tokenizer.eod_id
    info = toklib.load(tokenizer_dir, eod_token or None)
    if info.eod_id is None:
        raise ValueError(
            f"{info.path}: no end-of-document token found; pass --dataloader.eod-token TOKEN "
            "(the token `titanenv preprocess --append-eod` appended)"
        )
    return info.eod_id


class TokenWindowDataset(IterableDataset[tuple[dict[str, torch.Tensor], torch.Tensor]], Stateful):
    """Endless, resumable stream of ``(inputs, labels)`` windows for one DP rank.

    Args:
        prefix: dataset path without ``.bin``/``.idx``.
        seq_len: tokens per sample (``L``).
        dp_rank: this rank's index in the data-parallel group.
        dp_world_size: size of the data-parallel group (``W``).
        shuffle: permute windows per epoch (seeded); else natural order.
        seed: base seed of the per-epoch permutation.
        eod_id: when set, also yield per-document ``positions`` (see
            :func:`document_positions`); when ``None``, yield no positions
            (plain causal attention over the whole window).

    Yields:
        ``({"input": int64[L], "positions": int64[L]}, labels int64[L])``;
        ``positions`` only when ``eod_id`` is set.

    Raises:
        FileNotFoundError: if ``prefix.bin``/``prefix.idx`` is missing.
        titanenv.data.indexed.IndexCorrupt: (a ``ValueError``) if the index is damaged or
            disagrees with ``.bin``; checked once here (see :func:`titanenv.data.indexed.validate`).
        ValueError: if the data holds fewer than ``W`` windows.
    """

    def __init__(
        self,
        prefix: str | os.PathLike[str],
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 1234,
        eod_id: int | None = None,
    ) -> None:
        if not (bin_path(prefix).is_file() and idx_path(prefix).is_file()):
            raise FileNotFoundError(
                f"no tokenized dataset at {bin_path(prefix)} / {idx_path(prefix)}; "
                "run `titanenv preprocess` to create it (pass the prefix, without extension)"
            )
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world_size})")
        self.prefix = str(prefix)
        # The windows read only the token stream, so a damaged index would go unnoticed:
        # IndexedDataset validates it (sizes, pointers, document indices, .bin size) first.
        self._tokens = IndexedDataset(prefix, check=True).tokens
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.shuffle = shuffle
        self.seed = seed
        self.eod_id = eod_id
        n_windows = max(0, (self._tokens.size - 1) // seq_len)
        # Equal share per rank keeps DP ranks in lock-step across epochs.
        self.windows_per_rank = n_windows // dp_world_size
        if self.windows_per_rank == 0:
            raise ValueError(
                f"{self.prefix}: {self._tokens.size} tokens make {n_windows} windows of "
                f"{seq_len}+1 tokens, fewer than the {dp_world_size} data-parallel ranks; "
                "use more data or a shorter --training.seq-len"
            )
        self._epoch = 0
        self._next = 0  # samples of this epoch already yielded by this rank

    def _order(self, epoch: int) -> np.ndarray:
        n = self.windows_per_rank * self.dp_world_size
        if not self.shuffle:
            order = np.arange(n, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation((self._tokens.size - 1) // self.seq_len)[:n]
        return order[self.dp_rank :: self.dp_world_size]

    def window(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Sample for global window ``index`` (shapes as in the class docstring)."""
        start = index * self.seq_len
        w = np.asarray(self._tokens[start : start + self.seq_len + 1], dtype=np.int64)
        inputs = torch.from_numpy(w[:-1].copy())
        labels = torch.from_numpy(w[1:].copy())
        sample = {"input": inputs}
        if self.eod_id is not None:
            sample["positions"] = torch.from_numpy(document_positions(w[:-1], self.eod_id))
        return sample, labels

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        # With DataLoader workers, each holds a copy of this object (and its own state,
        # which StatefulDataLoader checkpoints per worker) and takes every k-th sample.
        worker = get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        while True:
            order = self._order(self._epoch)[offset::stride]
            while self._next < len(order):
                index = int(order[self._next])
                # Count before yielding: a state_dict taken after this sample resumes after it.
                self._next += 1
                yield self.window(index)
            self._epoch += 1
            self._next = 0
            logger.warning(
                f"{self.prefix}: dp rank {self.dp_rank} finished its {self.windows_per_rank} "
                f"windows; starting epoch {self._epoch}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "next": self._next,
            "seq_len": self.seq_len,
            "windows_per_rank": self.windows_per_rank,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["seq_len"] != self.seq_len or state_dict["windows_per_rank"] != self.windows_per_rank:
            raise ValueError(
                f"{self.prefix}: checkpointed data position was for seq_len {state_dict['seq_len']} "
                f"with {state_dict['windows_per_rank']} windows per rank, but this run has seq_len "
                f"{self.seq_len} with {self.windows_per_rank}; resume with the same data and "
                "sequence length, or start in a fresh --dump-folder"
            )
        self._epoch = int(state_dict["epoch"])
        self._next = int(state_dict["next"])


class MegatronDataloader(ParallelAwareDataloader):  # type: ignore[misc]  # torchtitan ships no type hints
    """TorchTitan dataloader over a Megatron ``.bin/.idx`` dataset (see module docstring).

    Batches are ``({"input": int64[B, L], ["positions": int64[B, L]]}, labels int64[B, L])``
    with ``B = local_batch_size``; ``positions`` only with ``document_positions``. With
    ``sft_path`` the samples come from :class:`~titanenv.train.sft.SFTDataset` (labels
    ``-100`` on prompts and padding) instead of :class:`TokenWindowDataset`.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):  # type: ignore[misc]  # torchtitan ships no type hints
        path: str = ""
        """Dataset prefix without extension: PATH.bin and PATH.idx, as written by `titanenv preprocess`."""

        shuffle: bool = True
        """Visit windows in a seeded random order per epoch (False: file order)."""

        seed: int = 1234
        """Seed of the per-epoch window permutation; same seed, same order."""

        document_positions: bool = True
        """Emit per-document positions so FlexAttention/varlen mask attention at document ends.
        Must be False with plain causal SDPA attention (the CPU recipe), which cannot use them."""

        eod_token: str = ""
        """End-of-document token separating documents (only used with document_positions).
        Empty: the EOD id in PATH.manifest.json (from `titanenv preprocess`), else the tokenizer's EOS."""

        sft_path: str = ""
        """JSONL of prompt/response or messages (titanenv finetune --sft); when set, `path` is not used.
        Examples are packed and prompt-masked (titanenv.train.sft); path, shuffle, seed and eod_token
        do not apply, and the tokenizer's EOS ends each example."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer | None,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs: Any,
    ) -> None:
        dataset: TokenWindowDataset | sft.SFTDataset
        if config.sft_path:
            dataset = _sft_dataset(config, tokenizer, seq_len, dp_rank, dp_world_size)
        else:
            dataset = _megatron_dataset(config, tokenizer, seq_len, dp_rank, dp_world_size)
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=local_batch_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )


def _megatron_dataset(
    config: MegatronDataloader.Config,
    tokenizer: BaseTokenizer | None,
    seq_len: int,
    dp_rank: int,
    dp_world_size: int,
) -> TokenWindowDataset:
    """The token windows of ``config.path``, checked against the tokenizer and its manifest."""
    if not config.path:
        raise ValueError("no dataset given: pass --dataloader.path PREFIX (the output prefix of `titanenv preprocess`)")
    tokenizer_dir = getattr(tokenizer, "tokenizer_path", None)  # HuggingFaceTokenizer keeps its folder
    if tokenizer_dir is not None:
        # Raises TokenizerMismatch when the data was made with another tokenizer.json.
        manifest = manifestlib.check_tokenizer(config.path, toklib.load(tokenizer_dir))
        if manifest is None:
            logger.warning(f"{config.path}: no {manifestlib.SUFFIX}; cannot check it matches the tokenizer")
    else:
        manifest = manifestlib.read(config.path)
    eod_id = None
    if config.document_positions:
        if tokenizer_dir is None and (manifest is None or manifest.tokenizer.eod_id is None):
            raise ValueError("document_positions needs the EOD id: a data manifest or a tokenizer folder")
        eod_id = resolve_eod_id(tokenizer_dir or "", config.eod_token, manifest)
        if manifest is not None and not manifest.append_eod:
            logger.warning(
                f"{config.path} was preprocessed without --append-eod: documents run together "
                "and attention is masked only at window starts"
            )
    dataset = TokenWindowDataset(
        config.path,
        seq_len,
        dp_rank,
        dp_world_size,
        shuffle=config.shuffle,
        seed=config.seed,
        eod_id=eod_id,
    )
    logger.info(
        f"Megatron data {config.path}: {dataset._tokens.size:,} tokens, "
        f"{dataset.windows_per_rank:,} windows of {seq_len} per dp rank ({dp_world_size} ranks)"
    )
    return dataset


def _sft_dataset(
    config: MegatronDataloader.Config,
    tokenizer: BaseTokenizer | None,
    seq_len: int,
    dp_rank: int,
    dp_world_size: int,
) -> sft.SFTDataset:
    """The packed SFT examples of ``config.sft_path`` (read and validated first)."""
    if getattr(tokenizer, "tokenizer_path", None) is None:
        raise ValueError(
            "--dataloader.sft-path needs the Hugging Face tokenizer folder (--hf-assets-path FOLDER) "
            "to tokenize the examples"
        )
    if config.num_workers > 0:
        # ChatDataset does not split its examples between DataLoader workers: each would yield them all.
        raise ValueError(
            f"--dataloader.sft-path packs examples in the training process; set --dataloader.num-workers 0 "
            f"(got {config.num_workers})"
        )
    if config.path:
        logger.warning(
            f"--dataloader.sft-path {config.sft_path} is set, so --dataloader.path {config.path} is not used"
        )
    records = sft.read_sft(config.sft_path)
    return sft.SFTDataset(
        records,
        tokenizer,
        seq_len,
        dp_rank,
        dp_world_size,
        positions=config.document_positions,
        source=config.sft_path,
    )
