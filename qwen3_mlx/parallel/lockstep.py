"""Rank 0 leads, the other ranks follow: one model run in lockstep over a group.

Rank 0 runs the engine exactly as a single process does (Chat, the sampler); only its model is
wrapped. Each call of the wrapped model first sends a small header to every rank (which cache,
how many tokens it holds, the input shape), then the input token ids, both as `all_sum`s to which
the other ranks add zeros. The followers run the same forward pass on their shard with their own
copy of the cache, so every collective of the pass is matched. Sampled tokens reach the followers
as the next call's input, so all ranks always hold the same tokens; only rank 0 samples.

Every collective of one call hangs on one chain of data (header -> tokens -> layers -> logits),
so both sides run them in the same order, and rank 0 queues the whole pass at once
(`mx.async_eval`) so none is left half done. A call returns the logits of the last position only:
the vocabulary-split head then gathers one row, and a 512-token prefill chunk costs no head. A
speculative verify pass asks for every position (`every_position`, told to the followers in the
header), and its rejected positions need no message of their own: a follower trims its copy of a
cache to the length rank 0 announces with the next call.

The server's cache operations beyond a forward pass (fork a prefix-cache entry, merge a reply into
the batched cache, extract it, keep some rows: cache_ops.py) go the same way: rank 0 runs one on
its caches, then sends its header (and, for keep, the row indices); the followers run the same
function on theirs. Everything that touches the model or a cache runs on one thread of rank 0 (the
REPL's, or the server's decoding thread), so the followers see the operations in rank 0's order.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

from qwen3_mlx.cache_ops import CacheOps
from qwen3_mlx.errors import DistributedError
from qwen3_mlx.model import Model

# The header: op, cache key, number, other, length, kv bits, a cache to drop, exit code. By op:
#   FORWARD  key: the cache (0: none), number: tokens it holds, other: batch size, length: tokens,
#            code: 1 for the logits of every position (a verify pass), 0 for the last one
#   FORK     key: the new cache, number: tokens to copy, other: the cache copied from
#   MERGE    key: the batched cache, number: tokens the row holds, other: the row's cache
#   EXTRACT  key: the batched cache, number: the row's index, other: the row's cache
#   KEEP     key: the batched cache, other: how many rows (their indices follow)
#   STOP     code: the followers' exit status
HEADER_SIZE = 8
FORWARD, STOP, FORK, MERGE, EXTRACT, KEEP = 1, 2, 3, 4, 5, 6


def _last_logits(model: Model, tokens: mx.array, cache: Any, every: bool = False) -> mx.array:
    """The logits of the last position only: [B, 1, vocab] (every: of every position)."""
    h = model.model(tokens, cache)
    h = h if every else h[:, -1:, :]
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _broadcast(values: mx.array, group: Any, leads: bool) -> mx.array:
    """Rank 0's values on every rank (the others add zeros)."""
    return mx.distributed.all_sum(values if leads else mx.zeros_like(values), group=group)


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back until a call's collectives are all queued (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


_leaders: list[LeaderModel] = []


def stop_followers(code: int = 0) -> None:
    """Stop the followers of every model this process leads (the CLI calls it on the way out)."""
    while _leaders:
        _leaders.pop().stop(code)


class LeaderModel:
    """Rank 0's model: each call is announced to the followers, which run it on their shards."""

    leads_group = True  # (speculative.verify_round asks it for every position's logits)

    def __init__(self, model: Model, group: Any):
        self.inner = model
        self.group = group
        self.lock = threading.Lock()  # the server's worker thread and the main thread's stop()
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._dropped: list[int] = []
        self._next_key = 1
        self.stopped = False
        _leaders.append(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _key(self, cache: Any) -> int:
        first = cache[0]
        if first not in self._keys:
            self._keys[first] = key = self._next_key
            self._next_key += 1
            weakref.finalize(first, self._dropped.append, key)
        return self._keys[first]

    def _header(
        self, op: int, key: int, number: int, other: int, L: int = 0, bits: int = 0, code: int = 0
    ) -> Any:
        """Rank 0's header on every rank (not evaluated yet); call with the lock held."""
        if self.stopped:
            raise DistributedError("the other ranks were stopped; this model cannot run again")
        drop = self._dropped.pop() if self._dropped else 0
        values = [op, key, number, other, L, bits, drop, code]
        return _broadcast(mx.array(values, dtype=mx.int32), self.group, True)

    @property
    def cache_ops(self) -> CacheOps:
        """The cache operations (cache_ops.py), each one mirrored by the other ranks."""
        return MirroredCacheOps(self)

    def __call__(
        self, inputs: mx.array, cache: Any = None, *, every_position: bool = False
    ) -> mx.array:
        """The logits of the last position (every_position: of each, as a verify pass needs)."""
        from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

        if cache and not isinstance(cache[0], (KVCache, QuantizedKVCache, BatchKVCache)):
            # (a rotating window, say: the followers have no protocol for it)
            raise DistributedError(
                f"a {type(cache[0]).__name__} cannot be used by a group of ranks"
            )
        B, L = inputs.shape
        key = self._key(cache) if cache else 0
        offset = cache[0].offset if cache and not isinstance(cache[0], BatchKVCache) else 0
        kv_bits = getattr(cache[0], "bits", 0) if cache else 0
        with self.lock, _uninterrupted():
            header = self._header(FORWARD, key, offset, B, L, kv_bits or 0, int(every_position))
            # The token ids depend on the header, so the two collectives keep their order.
            tokens = _broadcast(inputs.astype(mx.int32) + 0 * header[0], self.group, True)
            logits = _last_logits(self.inner, tokens, cache, every_position)
            mx.async_eval(logits)
        return logits

    def announce(self, op: int, key: int, number: int, other: int, rows: Sequence = ()) -> None:
        """Tell the followers to run a cache operation rank 0 has just run (rows: KEEP's)."""
        with self.lock, _uninterrupted():
            header = self._header(op, key, number, other)
            if rows:
                indices = mx.array(rows, dtype=mx.int32) + 0 * header[0]
                header = _broadcast(indices, self.group, True)
            mx.eval(header)

    def stop(self, code: int = 0) -> None:
        """Tell the followers to exit with `code` (once; after everything queued has run)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            header = mx.array([STOP, 0, 0, 0, 0, 0, 0, code], dtype=mx.int32)
            mx.eval(_broadcast(header, self.group, True))


class MirroredCacheOps(CacheOps):
    """Rank 0's cache operations: each runs here, then the followers run it on their caches."""

    def __init__(self, leader: LeaderModel):
        self.leader = leader

    def fork(self, source: list[Any], length: int, target: list[Any]) -> None:
        """copy_prefix, mirrored."""
        super().fork(source, length, target)
        leader = self.leader
        leader.announce(FORK, leader._key(target), length, leader._key(source))

    def merge(self, batch: list[Any] | None, row: list[Any]) -> list[Any]:
        """merge_row, mirrored."""
        merged = super().merge(batch, row)
        leader = self.leader
        leader.announce(MERGE, leader._key(merged), row[0].offset, leader._key(row))
        return merged

    def extract(self, batch: list[Any], index: int, row: list[Any]) -> None:
        """extract_row, mirrored."""
        super().extract(batch, index, row)
        self.leader.announce(EXTRACT, self.leader._key(batch), index, self.leader._key(row))

    def keep(self, batch: list[Any], keep: Any) -> None:
        """keep_rows, mirrored."""
        rows = list(keep)
        super().keep(batch, rows)
        self.leader.announce(KEEP, self.leader._key(batch), 0, len(rows), rows)


def follow(model: Model, group: Any) -> int:
    """Run rank 0's model calls on this rank's shard until it stops; return its exit code."""
    return Follower(model, group).run()


class Follower:
    """A follower's copies of rank 0's caches, by key, and the operations it runs on them."""

    def __init__(self, model: Model, group: Any):
        self.model = model
        self.group = group
        self.caches: dict[int, list[Any]] = {}

    def run(self) -> int:
        """Run rank 0's operations until it stops; its exit code."""
        from qwen3_mlx import cache_ops

        empty = mx.zeros((HEADER_SIZE,), dtype=mx.int32)
        while True:
            header = _broadcast(empty, self.group, False).tolist()
            op, key, number, other, L, kv_bits, drop, code = header
            self.caches.pop(drop, None)
            if op == STOP:
                return code
            if op == FORWARD:
                self._forward(key, number, other, L, kv_bits, bool(code))
            elif op == FORK:
                target = self.caches[key] = self._new(kv_bits)
                cache_ops.copy_prefix(target, self._known(other), number)
            elif op == MERGE:
                row = self._holding(other, number)
                self.caches[key] = cache_ops.merge_row(self.caches.get(key), row)
            elif op == EXTRACT:
                row = self._known(other)
                cache_ops.extract_row(self._known(key), number, row)
                mx.eval([layer.state for layer in row])
            elif op == KEEP:
                rows = _broadcast(mx.zeros((other,), dtype=mx.int32), self.group, False)
                cache_ops.keep_rows(self._known(key), rows.tolist())
            else:
                raise DistributedError(f"rank {self.group.rank()} got an unknown message {header}")

    def _new(self, kv_bits: int) -> list[Any]:
        from qwen3_mlx.cache import make_cache  # (mlx-lm: kept out of join_group's path)

        return make_cache(self.model, kv_bits or None)

    def _known(self, key: int) -> list[Any]:
        if key not in self.caches:
            raise DistributedError(
                f"rank {self.group.rank()} has no copy of a cache rank 0 uses (key {key})"
            )
        return self.caches[key]

    def _holding(self, key: int, offset: int) -> list[Any]:
        """Cache `key`, trimmed to the `offset` tokens rank 0's copy holds."""
        from qwen3_mlx.cache import trim_cache

        cache = self._known(key)
        held = cache[0].offset
        if held < offset:
            raise DistributedError(
                f"rank {self.group.rank()} holds {held} tokens of a cache rank 0 says holds "
                f"{offset}: a KV cache restored from a file cannot be used by a group"
            )
        trim_cache(cache, offset)
        return cache

    def _forward(self, key: int, offset: int, B: int, L: int, kv_bits: int, every: bool) -> None:
        cache = None
        if key:
            if key not in self.caches:
                self.caches[key] = self._new(kv_bits)
            cache = self.caches[key]
            if type(cache[0]).__name__ != "BatchKVCache":  # a batch's rows leave by KEEP
                self._holding(key, offset)
        tokens = _broadcast(mx.zeros((B, L), dtype=mx.int32), self.group, False)
        mx.eval(_last_logits(self.model, tokens, cache, every))


def ignore_interrupts() -> None:
    """Followers leave Ctrl-C to rank 0 (on one machine the terminal sends it to every rank)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def lost_connection(error: BaseException) -> DistributedError:
    """The one-line error for a collective that failed because a rank went away."""
    return DistributedError(f"lost the connection to another rank ({error})")
