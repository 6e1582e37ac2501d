"""The KV cache operations beyond a forward pass: fork a prefix, merge a row, extract it, keep rows.

The server's prefix cache forks entries and its batch decoder moves replies in and out of one
batched cache (mlx-lm's BatchKVCache). Each operation is written once, here: a single process
runs them through `CacheOps`; under a group, rank 0's model hands out a subclass that first tells
the other ranks, which run the same functions on their own copies of the caches (lockstep.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from qwen3_mlx.model import CausalLM


def copy_prefix(target: list[Any], source: list[Any], length: int) -> None:
    """Make target (fresh layers) hold the first `length` tokens of source; source is untouched.

    KVCache writes into its buffers in place, so the target gets sliced copies, never the
    source's own arrays.
    """
    for mine, theirs in zip(target, source, strict=True):
        if theirs.keys is not None and length > 0:
            mine.keys = theirs.keys[..., :length, :]
            mine.values = theirs.values[..., :length, :]
            mine.offset = length


def merge_row(batch: list[Any] | None, row: list[Any]) -> list[Any]:
    """The batch cache with the row's cache appended as its last row (a new one if batch is None)."""
    from mlx_lm.models.cache import BatchKVCache

    merged = [BatchKVCache.merge([layer]) for layer in row]
    if batch is None:
        return merged
    for batch_layer, new_layer in zip(batch, merged, strict=True):
        batch_layer.extend(new_layer)
    return batch


def extract_row(batch: list[Any], index: int, row: list[Any]) -> None:
    """Copy row `index` of the batch cache back into the row's own cache layers."""
    for own, batch_layer in zip(row, batch, strict=True):
        part = batch_layer.extract(index)
        own.keys, own.values, own.offset = part.keys, part.values, part.offset


def keep_rows(batch: list[Any], keep: Sequence[int]) -> None:
    """Keep only the rows `keep` of the batch cache (in that order)."""
    kept = mx.array(list(keep))
    for batch_layer in batch:
        batch_layer.filter(kept)


class CacheOps:
    """The operations on this process's caches alone (a group's rank 0 uses a subclass)."""

    def fork(self, source: list[Any], length: int, target: list[Any]) -> None:
        """copy_prefix."""
        copy_prefix(target, source, length)

    def merge(self, batch: list[Any] | None, row: list[Any]) -> list[Any]:
        """merge_row."""
        return merge_row(batch, row)

    def extract(self, batch: list[Any], index: int, row: list[Any]) -> None:
        """extract_row."""
        extract_row(batch, index, row)

    def keep(self, batch: list[Any], keep: Sequence[int]) -> None:
        """keep_rows."""
        keep_rows(batch, keep)


LOCAL = CacheOps()


def cache_ops(model: CausalLM) -> CacheOps:
    """The cache operations to use with `model`: its own (a group's rank 0) or the local ones."""
    ops = getattr(model, "cache_ops", None)
    return ops if isinstance(ops, CacheOps) else LOCAL
