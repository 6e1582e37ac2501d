"""KV cache: mlx-lm's KVCache grows in 256-token steps and trims, which is what the chat engine needs."""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import KVCache


def make_cache(model: Any) -> list[KVCache]:
    """One growable, trimmable KV cache per decoder layer."""
    return [KVCache() for _ in model.layers]


def cache_length(cache: list[KVCache]) -> int:
    """Tokens the cache currently holds."""
    return cache[0].offset if cache else 0


def trim_cache(cache: list[KVCache], length: int) -> None:
    """Trim every layer back to its first `length` tokens."""
    excess = cache_length(cache) - length
    if excess > 0:
        for layer_cache in cache:
            layer_cache.trim(excess)
