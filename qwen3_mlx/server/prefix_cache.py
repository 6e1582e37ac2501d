"""A multi-entry prefix cache: several PromptCaches, LRU, bounded in bytes.

Each entry is one PromptCache (a KV cache and the exact ids it holds). A prompt is served by the
entry sharing its longest prefix: used in place when the prompt extends all of it (the next step
of the same conversation), otherwise forked at the common prefix, so the conversation the entry
belongs to keeps its own tail for its next step. Nothing here knows HTTP; the REPL could use it.

With kv_bits (`serve --kv-bits`), an entry no reply is using is kept quantized (MLX's affine
quantization, group 64, as the REPL's --kv-bits cache) and counts its packed bytes against the
bound; a prompt that reuses one gets a float copy of the prefix, since the batch decodes in float.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from qwen3_mlx.cache import KV_GROUP_SIZE, PromptCache, common_prefix_length, make_cache
from qwen3_mlx.cache_ops import LOCAL, cache_ops
from qwen3_mlx.errors import ConfigError


@dataclass(frozen=True)
class CacheChoice:
    """The entry a prompt runs in and how many of its tokens the cache already holds."""

    cache: PromptCache
    cached_tokens: int  # prompt tokens that will not be prefilled again


def cache_bytes(cache: PromptCache) -> int:
    """Bytes the entry's key and value buffers take (their allocated size, not only the used part)."""
    total = 0
    for layer in cache.cache:
        for part in (layer.keys, layer.values):
            arrays = (
                part if isinstance(part, tuple) else (part,)
            )  # quantized: packed, scales, biases
            total += sum(array.nbytes for array in arrays if array is not None)
    return total


def fork(model: Any, source: PromptCache, length: int) -> PromptCache:
    """A new entry holding the first `length` tokens of source; source is left as it is."""
    copy = PromptCache(model)
    cache_ops(model).fork(source.cache, length, copy.cache)  # sliced copies (cache_ops.py)
    copy.tokens = list(source.tokens[:length])
    return copy


def freeze(model: Any, entry: PromptCache, kv_bits: int) -> PromptCache:
    """The entry quantized to kv_bits, its buffers cut to the tokens it holds."""
    frozen = PromptCache(model, kv_bits)
    length = len(entry.tokens)
    for mine, theirs in zip(frozen.cache, entry.cache, strict=True):
        if theirs.keys is None or length == 0:
            continue
        for name in ("keys", "values"):
            array = getattr(theirs, name)[..., :length, :]
            if array.dtype == mx.float32:  # through bf16, as the REPL's quantized cache does
                array = array.astype(mx.bfloat16)
            setattr(mine, name, tuple(mx.quantize(array, group_size=KV_GROUP_SIZE, bits=kv_bits)))
        mine.offset = length
    mx.eval([(layer.keys, layer.values) for layer in frozen.cache if layer.keys is not None])
    frozen.tokens = list(entry.tokens)
    return frozen


def thaw(model: Any, frozen: PromptCache, length: int) -> PromptCache:
    """A float entry holding the first `length` tokens of a quantized one (left as it is)."""
    copy = PromptCache(model)
    for mine, theirs in zip(copy.cache, frozen.cache, strict=True):
        if theirs.keys is None or length == 0:
            continue
        for name in ("keys", "values"):
            parts = [array[..., :length, :] for array in getattr(theirs, name)]
            setattr(
                mine, name, mx.dequantize(*parts, group_size=theirs.group_size, bits=theirs.bits)
            )
        mine.offset = length
    copy.tokens = list(frozen.tokens[:length])
    return copy


class PrefixCache:
    """LRU entries of PromptCache, bounded by `max_bytes` (entries in use are never dropped).

    An entry in use by a running reply is busy until release(): it is never run in again, but
    a concurrent prompt may fork the prefix it holds (a reply only writes past the tokens its
    entry lists, and each write makes new arrays, so a fork's slices stay as they were). Call
    choose() from the thread that runs the model; release() from any.
    """

    def __init__(
        self,
        model: Any,
        max_bytes: int,
        max_entries: int = 64,
        kv_bits: int | None = None,
        shared: bool = True,
    ):
        if kv_bits is not None:
            make_cache(model, kv_bits)  # a head size the quantization cannot group is refused here
            if cache_ops(model) is not LOCAL:  # the other ranks could not follow the quantizing
                raise ConfigError("serve --kv-bits runs in one process only, not under mlx.launch")
        self.model = model
        self.kv_bits = kv_bits
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
            self._freeze_idle()
            best, shared, idle = None, 0, False
            for entry in self.entries if self.shared else ():
                length = common_prefix_length(entry.tokens, prompt)
                free = id(entry) not in self.busy
                if length > shared or (length == shared > 0 and free and not idle):
                    best, shared, idle = entry, length, free
            shared = min(shared, len(prompt) - 1)  # the last prompt token always runs again
            if best is not None and idle and shared == len(best.tokens):
                self.entries.remove(best)
                chosen = best if best.kv_bits is None else thaw(self.model, best, shared)
            elif best is not None and shared > 0:
                chosen = (fork if best.kv_bits is None else thaw)(self.model, best, shared)
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
            if self.kv_bits is None:  # else at the next choose(), once it is quantized
                self._evict()

    def _freeze_idle(self) -> None:
        """Under kv_bits, quantize the float entries replies have released (on the model's
        thread: choose() runs there)."""
        if self.kv_bits is None:
            return
        for index, entry in enumerate(self.entries):
            if entry.kv_bits is None and id(entry) not in self.busy:
                self.entries[index] = freeze(self.model, entry, self.kv_bits)

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
