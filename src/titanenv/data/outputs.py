"""Where outputs go, and how finished pieces or array tasks become them.

Names: ``BASE`` per split (``--output-prefix``, ``--val-output-prefix``); in an array task
``BASE-iiiii-of-nnnnn``; with several ``--json-keys`` a ``_<key>`` suffix. Each output is joined
from its parts in order (:func:`titanenv.data.indexed.concat`), then its manifest is written.

A run holds ``PREFIX.lock`` while it writes (:func:`claim`, :mod:`titanenv.data.lock`) and first
removes temporary files that dead processes of this host left. The join checks the free space
before it writes anything.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from titanenv import atomic
from titanenv.data import indexed, lock, manifest


@contextmanager
def claim(output_prefix: Path, bases: Iterable[Path] = (), shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold the lock of a run's outputs, then sweep stale temporary files; yields the lock file.

    The lock is ``PREFIX.lock`` (``PREFIX-iiiii-of-nnnnn.lock`` for array task ``shard``), so
    array tasks do not block each other but two runs of one task, or a merge and a single run of
    ``PREFIX``, do. Swept: files named ``BASE*.tmp.PID.HOST*`` beside each base (and
    ``output_prefix``) and every temporary file in ``PREFIX.parts``, of dead pids on this host.

    Raises:
        lock.PrefixInUse: another run holds the lock (the message names its pid and host).
    """
    output_prefix = Path(output_prefix)
    target = shard_prefix(output_prefix, *shard) if shard else output_prefix
    with lock.PrefixLock(target) as held:
        for base in {output_prefix, *map(Path, bases)}:
            atomic.sweep_temp(base.parent, (base.name,))
        atomic.sweep_temp(Path(f"{output_prefix}.parts"))
        yield held.path


def check_space(needs: dict[Path, int], action: str) -> None:
    """Refuse before writing when a filesystem has less free space than its outputs need.

    Args:
        needs: bytes each output prefix will take (its folder's filesystem must hold them).
        action: what is being done, for the message ("merge into", "joining the parts into").

    Raises:
        atomic.DiskFull: names the output, the folder, the bytes needed and the bytes free.
    """
    by_device: dict[int, list[Any]] = {}  # [first prefix, folder, bytes needed]
    for prefix, nbytes in needs.items():
        folder = prefix.parent
        folder.mkdir(parents=True, exist_ok=True)
        entry = by_device.setdefault(os.stat(folder).st_dev, [prefix, folder, 0])
        entry[2] += nbytes
    for prefix, folder, nbytes in by_device.values():
        free = atomic.free_bytes(folder)
        if free < nbytes:
            raise atomic.DiskFull(
                errno.ENOSPC,
                f"{action} {prefix} needs {nbytes} bytes in {folder}, {free} bytes free there "
                f"({(nbytes - free) / 1e6:.1f} MB short); free up space there, or write to another "
                "filesystem, then rerun the same command",
            )


def shard_prefix(prefix: Path, index: int, count: int) -> Path:
    """``PREFIX-iiiii-of-nnnnn``: where array task ``index`` of ``count`` writes."""
    return prefix.with_name(f"{prefix.name}-{index:05d}-of-{count:05d}")


def prefix_for(base: Path, key: str, keys: tuple[str, ...], shard: tuple[int, int] | None = None) -> Path:
    """The prefix of one output: the base, the shard suffix in an array task, ``_<key>`` for several keys."""
    p = shard_prefix(base, *shard) if shard else Path(base)
    return p if len(keys) == 1 else p.with_name(f"{p.name}_{key}")


def outputs_json(outputs: dict[tuple[str, int], Path], keys: tuple[str, ...]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for (split, j), prefix in outputs.items():
        out.setdefault(split, {})[keys[j]] = str(prefix)
    return out


def complete(prefix: Path) -> bool:
    return all(p.is_file() for p in (indexed.bin_path(prefix), indexed.idx_path(prefix), manifest.path_for(prefix)))


def write(
    outputs: dict[tuple[str, int], Path],
    keys: tuple[str, ...],
    dtype: np.dtype[Any],
    common: manifest.Manifest,
    parts: dict[tuple[str, int], list[Path]],
    per_output: dict[tuple[str, int], dict[str, int]] | None = None,
    *,
    action: str = "joining the parts into",
) -> manifest.Manifest:
    """Join ``parts[(split, key index)]`` into each output, then write its manifest (last).

    Args:
        common: the run-wide manifest (:meth:`Manifest.build` or :meth:`Manifest.merge`).
        per_output: ``{(split, key index): {"max_token_id": int, ...}}``; its ``max_token_id``
            (-1 when the output has no tokens) goes into that output's ``output`` entry.
        action: names the step in a full-disk message.

    Raises:
        atomic.DiskFull: before writing, when the outputs' filesystem has less free space than
            the parts take (the outputs are as large as their parts); or while writing.
        indexed.IndexCorrupt: a part's index is damaged (named).

    Returns:
        The first output's manifest: ``common`` with its ``output`` (this prefix, its documents and tokens).
    """
    result: manifest.Manifest | None = None
    check_space(
        {
            Path(prefix): sum(
                indexed.bin_path(p).stat().st_size + indexed.idx_path(p).stat().st_size for p in parts[key]
            )
            for key, prefix in outputs.items()
        },
        action,
    )
    for (split, j), prefix in outputs.items():
        manifest.path_for(prefix).unlink(missing_ok=True)  # the data is about to change
        docs, tokens = indexed.concat(parts[(split, j)], prefix, dtype)
        top = per_output[(split, j)]["max_token_id"] if per_output and (split, j) in per_output else None
        m = common.for_output(
            manifest.OutputRecord(str(prefix), split, keys[j], docs, tokens, None if top is None else int(top))
        )
        m.write(prefix)
        result = m if result is None else result
    assert result is not None, "outputs holds the train split's first key"
    return result
