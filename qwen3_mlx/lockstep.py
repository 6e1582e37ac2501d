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
the vocabulary-split head then gathers one row, and a 512-token prefill chunk costs no head.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

from qwen3_mlx.distributed import DistributedError

# The header: op, cache key, tokens the cache holds, batch, length, kv bits, a cache to drop, code.
HEADER_SIZE = 8
FORWARD, STOP = 1, 2


def _last_logits(model: Any, tokens: mx.array, cache: Any) -> mx.array:
    """The logits of the last position only: [B, 1, vocab]."""
    h = model.model(tokens, cache)[:, -1:, :]
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

    def __init__(self, model: Any, group: Any):
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

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        if cache and type(cache[0]).__name__ not in ("KVCache", "QuantizedKVCache"):
            raise DistributedError(
                f"a {type(cache[0]).__name__} (batched decoding) cannot be used by a group of ranks"
            )
        B, L = inputs.shape
        key = self._key(cache) if cache else 0
        offset = cache[0].offset if cache else 0
        kv_bits = getattr(cache[0], "bits", 0) if cache else 0
        drop = self._dropped.pop() if self._dropped else 0
        with self.lock, _uninterrupted():
            header = mx.array([FORWARD, key, offset, B, L, kv_bits, drop, 0], dtype=mx.int32)
            header = _broadcast(header, self.group, True)
            # The token ids depend on the header, so the two collectives keep their order.
            tokens = _broadcast(inputs.astype(mx.int32) + 0 * header[0], self.group, True)
            logits = _last_logits(self.inner, tokens, cache)
            mx.async_eval(logits)
        return logits

    def stop(self, code: int = 0) -> None:
        """Tell the followers to exit with `code` (once; after everything queued has run)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            header = mx.array([STOP, 0, 0, 0, 0, 0, 0, code], dtype=mx.int32)
            mx.eval(_broadcast(header, self.group, True))


def follow(model: Any, group: Any) -> int:
    """Run rank 0's model calls on this rank's shard until it stops; return its exit code."""
    from qwen3_mlx.cache import make_cache, trim_cache  # (mlx-lm: kept out of join_group's path)

    caches: dict[int, list[Any]] = {}
    empty = mx.zeros((HEADER_SIZE,), dtype=mx.int32)
    while True:
        header = _broadcast(empty, group, False).tolist()
        op, key, offset, B, L, kv_bits, drop, code = header
        caches.pop(drop, None)
        if op == STOP:
            return code
        if op != FORWARD:
            raise DistributedError(f"rank {group.rank()} got an unknown message {header}")
        cache = None
        if key:
            cache = caches.setdefault(key, make_cache(model, kv_bits or None))
            held = cache[0].offset
            if held < offset:
                raise DistributedError(
                    f"rank {group.rank()} holds {held} tokens of a cache rank 0 says holds "
                    f"{offset}: a KV cache restored from a file cannot be used by a group"
                )
            trim_cache(cache, offset)
        tokens = _broadcast(mx.zeros((B, L), dtype=mx.int32), group, False)
        mx.eval(_last_logits(model, tokens, cache))


def ignore_interrupts() -> None:
    """Followers leave Ctrl-C to rank 0 (on one machine the terminal sends it to every rank)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def lost_connection(error: BaseException) -> DistributedError:
    """The one-line error for a collective that failed because a rank went away."""
    return DistributedError(f"lost the connection to another rank ({error})")
