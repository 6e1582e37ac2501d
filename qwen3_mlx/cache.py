"""KV cache: mlx-lm's KVCache grows in 256-token steps and trims, which is what the chat engine needs.

With kv_bits, mlx-lm's QuantizedKVCache stores keys and values with MLX's affine quantization
(group 64 along each head's dimension). Each token is quantized on its own, so trimming, prefix
reuse and retries stay exact against a fresh quantized prefill.

The quantized cache keeps its scales and biases in bf16 whatever the compute dtype. Under the
float32 CPU policy that makes 8-bit KV 53 % of a bf16 cache instead of 56 % (float32 scales), and
the attention reads them in place (qwen3_mlx/cpu/kv_attention.py). Keys and values are rounded to
bf16 before they are quantized, as mlx-lm does on a bf16 model: that rounding (2^-9 relative) is
well under the 8-bit step (1/255 of a group's range).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from qwen3_mlx.errors import ConfigError
from qwen3_mlx.model import CausalLM

KV_BITS = (4, 8)
KV_GROUP_SIZE = 64
KV_SCALE_BYTES = 2  # bf16 scales and biases (f16 when the model computes in f16)


class CompactQuantizedKVCache(QuantizedKVCache):
    """mlx-lm's QuantizedKVCache, with float32 keys and values quantized through bf16."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        """Quantize and append keys and values; return the packed cache up to its offset."""
        if keys.dtype == mx.float32:
            keys, values = keys.astype(mx.bfloat16), values.astype(mx.bfloat16)
        return super().update_and_fetch(keys, values)


def make_cache(model: CausalLM, kv_bits: int | None = None) -> list[Any]:
    """One growable, trimmable KV cache per decoder layer (quantized to kv_bits when given)."""
    if kv_bits is None:
        return [KVCache() for _ in model.layers]
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS}, not {kv_bits}")
    head_dim = getattr(getattr(model, "args", None), "head_dim", KV_GROUP_SIZE)
    if head_dim % KV_GROUP_SIZE:
        raise ConfigError(
            f"--kv-bits needs a head size that is a multiple of {KV_GROUP_SIZE} (the "
            f"quantization group); this model's is {head_dim}"
        )
    return [CompactQuantizedKVCache(group_size=KV_GROUP_SIZE, bits=kv_bits) for _ in model.layers]


def kv_bytes_per_token(args: Any, kv_bits: int | None, dtype_bytes: int) -> int:
    """Bytes the KV cache takes per token: keys and values of every layer and kv head.

    Quantized: kv_bits per element plus a bf16 scale and bias per group of 64, whatever dtype_bytes.
    """
    elements = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim
    if kv_bits is None:
        return elements * dtype_bytes
    return elements * kv_bits // 8 + (elements // KV_GROUP_SIZE) * 2 * KV_SCALE_BYTES


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

    def __init__(self, model: CausalLM, kv_bits: int | None = None):
        self.kv_bits = kv_bits
        self.cache = make_cache(model, kv_bits)
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

    def clear(self) -> None:
        """Drop everything (the model changed under the cache, e.g. its RoPE)."""
        trim_cache(self.cache, 0)
        self.tokens = []
