"""A multi-entry prefix cache: several PromptCaches, LRU, bounded in bytes.

Each entry is one PromptCache (a KV cache and the exact ids it holds). A prompt is served by the
entry sharing its longest prefix: used in place when the prompt extends all of it (the next step
of the same conversation), otherwise forked at the common prefix, so the conversation the entry
belongs to keeps its own tail for its next step. Nothing here knows HTTP; the REPL could use it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwen3_mlx.cache import PromptCache, common_prefix_length
from qwen3_mlx.cache_ops import cache_ops


@dataclass(frozen=True)
class CacheChoice:
    """The entry a prompt runs in and how many of its tokens the cache already holds."""

    cache: PromptCache
    cached_tokens: int  # prompt tokens that will not be prefilled again


def cache_bytes(cache: PromptCache) -> int:
    """Bytes the entry's key and value buffers take (their allocated size, not only the used part)."""
    total = 0
    for layer in cache.cache:
        for array in (layer.keys, layer.values):
            if array is not None:
                total += array.nbytes
    return total


def fork(model: Any, source: PromptCache, length: int) -> PromptCache:
    """A new entry holding the first `length` tokens of source; source is left as it is."""
    copy = PromptCache(model)
    cache_ops(model).fork(source.cache, length, copy.cache)  # sliced copies (cache_ops.py)
    copy.tokens = list(source.tokens[:length])
    return copy


class PrefixCache:
    """LRU entries of PromptCache, bounded by `max_bytes` (entries in use are never dropped).

    An entry in use by a running reply is busy until release(): it is never run in again, but
    a concurrent prompt may fork the prefix it holds (a reply only writes past the tokens its
    entry lists, and each write makes new arrays, so a fork's slices stay as they were). Call
    choose() from the thread that runs the model; release() from any.
    """

    def __init__(self, model: Any, max_bytes: int, max_entries: int = 64, shared: bool = True):
        self.model = model
        self.max_bytes = max_bytes
        # shared=False: every reply starts from an empty cache and nothing is kept, so no client
        # learns from cached_tokens how much of its prompt another conversation holds.
        self.shared = shared
        self.max_entries = max_entries
        self.entries: list[PromptCache] = []  # least recently used first
        self.busy: set[int] = set()  # id() of the entries in use
        self.lock = threading.Lock()

    def choose(self, prompt: Sequence[int]) -> CacheChoice:
        """The entry to run `prompt` in (made most recent and busy), forked or new when none
        extends."""
        with self.lock:
            best, shared, idle = None, 0, False
            for entry in self.entries if self.shared else ():
                length = common_prefix_length(entry.tokens, prompt)
                free = id(entry) not in self.busy
                if length > shared or (length == shared > 0 and free and not idle):
                    best, shared, idle = entry, length, free
            shared = min(shared, len(prompt) - 1)  # the last prompt token always runs again
            if best is not None and idle and shared == len(best.tokens):
                self.entries.remove(best)
                chosen = best
            elif best is not None and shared > 0:
                chosen = fork(self.model, best, shared)
            else:
                chosen, shared = PromptCache(self.model), 0
            self.entries.append(chosen)
            self.busy.add(id(chosen))
            self._evict()
        return CacheChoice(chosen, shared)

    def release(self, entry: PromptCache) -> None:
        """The reply using `entry` ended: it may be chosen, forked or dropped again."""
        with self.lock:
            self.busy.discard(id(entry))
            if not self.shared and entry in self.entries:
                self.entries.remove(entry)
            self._evict()

    def _evict(self) -> None:
        """Drop least recently used idle entries until the byte and entry bounds hold."""
        while len(self.entries) > 1 and (
            self.total_bytes() > self.max_bytes or len(self.entries) > self.max_entries
        ):
            victim = next((entry for entry in self.entries if id(entry) not in self.busy), None)
            if victim is None:
                return
            self.entries.remove(victim)

    def total_bytes(self) -> int:
        """Bytes held by every entry."""
        return sum(cache_bytes(entry) for entry in self.entries)
