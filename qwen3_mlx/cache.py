"""KV cache: mlx-lm's KVCache grows in 256-token steps and trims, which is what the chat engine needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.models.cache import KVCache


def make_cache(model: Any) -> list[KVCache]:
    """One growable, trimmable KV cache per decoder layer."""
    return [KVCache() for _ in model.layers]


def cache_length(cache: list[KVCache]) -> int:
    """Tokens the cache currently holds."""
    return cache[0].offset if cache else 0


def trim_cache(cache: list[KVCache], length: int) -> None:
    """Trim every layer back to its first `length` tokens (layers may hold different lengths)."""
    for layer_cache in cache:
        excess = layer_cache.offset - length
        if excess > 0:
            layer_cache.trim(excess)


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


class PromptCache:
    """A KV cache plus the exact token list it holds, so any later prompt can reuse its prefix."""

    def __init__(self, model: Any):
        self.cache = make_cache(model)
        self.tokens: list[int] = []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Trim the cache to the prefix it shares with prompt; return how many tokens are reused."""
        # The last prompt token always runs again: its logits pick the first reply token.
        keep = min(common_prefix_length(self.tokens, prompt), len(prompt) - 1)
        trim_cache(self.cache, keep)
        self.tokens = self.tokens[:keep]
        return keep

    def settle(self, fed: Sequence[int]) -> None:
        """Record what the cache holds after a reply that ended or was cut off anywhere.

        The generator may have run one step past the last token we saw, and an interrupt can land
        between two layers' updates, so every layer is trimmed to the shortest one and to `fed`.
        """
        keep = min(min((layer.offset for layer in self.cache), default=0), len(fed))
        trim_cache(self.cache, keep)
        self.tokens = list(fed[:keep])
