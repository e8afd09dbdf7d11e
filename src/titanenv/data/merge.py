"""``titanenv preprocess --merge``: join the outputs of a job array's tasks, in task order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from titanenv.data import indexed, manifest, outputs


def merge(output_prefix: Path, num_shards: int) -> manifest.Manifest:
    """Join the array tasks' outputs ``PREFIX-iiiii-of-nnnnn`` (all complete) into ``PREFIX``, streaming.

    Every split and key the tasks wrote is merged. Memory stays constant whatever the number
    of documents (see :func:`titanenv.data.indexed.concat`). Holds ``PREFIX.lock`` while it
    runs; every task's index is validated and the free space checked before anything is written.
    Each merged manifest's ``output.max_token_id`` is the maximum over the tasks (-1: no tokens).

    Returns:
        The manifest of the first merged output.

    Raises:
        FileNotFoundError: a task has no manifest (not finished); it is named.
        ValueError: the tasks were run with different tokenizers or settings.
        manifest.ManifestError: a task's manifest misses a field or has one of the wrong type (named).
        indexed.IndexCorrupt: a task's ``.idx`` is damaged or disagrees with its ``.bin`` (named).
        lock.PrefixInUse: another run writes ``PREFIX`` (its pid and host are named).
        atomic.DiskFull: less free space than the merged outputs need (both numbers named).
    """
    output_prefix = Path(output_prefix)
    with outputs.claim(output_prefix):
        return _merge(output_prefix, num_shards)


def _merge(output_prefix: Path, num_shards: int) -> manifest.Manifest:
    manifests = [_shard_manifest(output_prefix, i, num_shards) for i in range(num_shards)]
    first = manifests[0]
    keys = first.json_keys
    bases = {s: Path(b) for s, b in first.bases.items()}
    targets = {(s, j): outputs.prefix_for(bases[s], k, keys) for s in bases for j, k in enumerate(keys)}
    shards = {
        (s, j): [outputs.prefix_for(bases[s], k, keys, (i, num_shards)) for i in range(num_shards)]
        for s in bases
        for j, k in enumerate(keys)
    }
    common = manifest.Manifest.merge(manifests, outputs.outputs_json(targets, keys), str(output_prefix))
    for prefixes in shards.values():
        for p in prefixes:
            indexed.validate(p)  # all of them before the first byte is written
    per_output = {t: {"max_token_id": max((_max_token_id(p) for p in shards[t]), default=-1)} for t in targets}
    return outputs.write(targets, keys, np.dtype(first.dtype), common, shards, per_output, action="merge into")


def _max_token_id(prefix: Path) -> int:
    """From the task's manifest; tasks written before it was recorded are read (streaming)."""
    m = manifest.read(prefix)
    value = m.output.max_token_id if m is not None and m.output is not None else None
    return int(value) if value is not None else indexed.max_token_id(prefix)


def _shard_manifest(prefix: Path, index: int, count: int) -> manifest.Manifest:
    base = outputs.shard_prefix(prefix, index, count)
    m = manifest.read(base)
    if m is None:  # several keys: the manifest sits beside PREFIX-iiiii-of-nnnnn_<key>
        found = sorted(base.parent.glob(f"{base.name}_*{manifest.SUFFIX}"))
        m = manifest.read(found[0]) if found else None
    if m is None:
        raise FileNotFoundError(f"{manifest.path_for(base)}: array task {index} has not finished; rerun it")
    return m
