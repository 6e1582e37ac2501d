"""Decode attention on MLX's CPU backend: native fused kernels for one query position, else MLX's.

Quantized KV cache (`quantized_attention`): mlx-lm's `quantized_scaled_dot_product_attention` (two
`quantized_matmul`s and a softmax) is the reference and serves the GPU and masked batches. A
float32 prefill chunk on the CPU (the "causal" mask) dequantizes the layer's cache to float32 and
takes the native causal attention below (MLX's row-by-row quantized kernel made a 0.6B 512-token
chunk 7.8x slower than with a float cache). On MLX's CPU backend it attends 1.3-1.5x slower than the float fused kernel while reading
3.6x fewer bytes, so one query position over float32 queries takes the native kernel
(qwen3_mlx/native/attention.cpp) when it was built: keys, values, scales and biases read once and
in place, the softmax fused, results within float32 rounding of mlx-lm's. The cache keeps bf16
scales (qwen3_mlx/cache.py); MLX's CPU kernel for bf16 scales is a scalar loop, so the fallback
casts them to the query dtype first (a transient of two values per 64 cached elements).

Float32 KV cache (`float_attention`): a prefill chunk (the "causal" mask) takes the native causal
attention (qwen3_mlx/native/prefill_attention.cpp): with a mask MLX's CPU path multiplies through
the BLAS, and a fresh install's reference BLAS made one 4B layer's attention 6x its projections
at 512 tokens and 45x at 4,096; the native op tiles both products and never writes the [L, T]
scores (~300x at 512). For one query position `mx.fast.scaled_dot_product_attention`
on the CPU runs OpenBLAS matrix products that pack the cache first (3.5 ms per layer at 1,024
tokens, Qwen3-4B heads); the native kernel (qwen3_mlx/native/float_attention.cpp) reads each key
and value row once for all the query heads sharing it. Masks, several query positions, other
dtypes and the GPU keep `mx.fast`. The cache's tensors must have a contiguous last axis for the
native kernel's vector code (mlx-lm's caches slice only along T); other strides take its portable
loops.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from qwen3_mlx.cpu import native as native_kernel
from qwen3_mlx.cpu.quantized import THREADS

Packed = tuple[mx.array, mx.array, mx.array]


def _reference(q: mx.array, keys: Packed, values: Packed, scale: float, mask: Any, **quant: int):
    keys = (keys[0], keys[1].astype(q.dtype), keys[2].astype(q.dtype))
    values = (values[0], values[1].astype(q.dtype), values[2].astype(q.dtype))
    # mlx-lm scales its queries argument in place (`queries *= scale`): hand it a copy.
    return quantized_scaled_dot_product_attention(
        mx.array(q), keys, values, scale=scale, mask=mask, **quant
    )


def _self_test(module: ModuleType) -> str | None:
    """None if a small decode step matches mlx-lm's quantized attention, else what failed."""
    pattern = mx.arange(2 * 40 * 64, dtype=mx.float32).reshape(1, 2, 40, 64)
    keys = mx.quantize(mx.sin(pattern).astype(mx.bfloat16), group_size=64, bits=8)
    values = mx.quantize(mx.cos(pattern).astype(mx.bfloat16), group_size=64, bits=8)
    q = mx.linspace(-1, 1, 4 * 64).reshape(1, 4, 1, 64)
    expected = _reference(q, keys, values, 0.125, None, group_size=64, bits=8)
    actual = module.quantized_decode_attention(q, *keys, *values, 0.125, 64, 8, 1)
    if not mx.allclose(actual, expected, rtol=1e-4, atol=1e-5).item():
        return "its attention self-test differed from mlx-lm's quantized attention"
    return None


def _float_self_test(module: ModuleType) -> str | None:
    """None if a small decode step matches mx.fast.scaled_dot_product_attention, else what failed."""
    pattern = mx.arange(2 * 40 * 64, dtype=mx.float32).reshape(1, 2, 40, 64)
    keys, values = mx.sin(pattern), mx.cos(pattern)
    q = mx.linspace(-1, 1, 4 * 64).reshape(1, 4, 1, 64)
    expected = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.125)
    actual = module.decode_attention(q, keys, values, 0.125, 1)
    if not mx.allclose(actual, expected, rtol=1e-4, atol=1e-5).item():
        return "its float attention self-test differed from mx.fast.scaled_dot_product_attention"
    return None


def _prefill_self_test(module: ModuleType) -> str | None:
    """None if a small causal chunk after a cached prefix matches MLX's, else what failed."""
    pattern = mx.arange(2 * 40 * 64, dtype=mx.float32).reshape(1, 2, 40, 64)
    keys, values = mx.sin(pattern), mx.cos(pattern)
    q = mx.linspace(-1, 1, 4 * 9 * 64).reshape(1, 4, 9, 64)
    expected = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.125, mask="causal")
    actual = module.prefill_attention(q, keys, values, 0.125, 1)
    if not mx.allclose(actual, expected, rtol=1e-4, atol=1e-5).item():
        return "its prefill attention self-test differed from mx.fast.scaled_dot_product_attention"
    return None


def native_attention() -> ModuleType | None:
    """The extension when its quantized decode attention passed its self-test, else None."""
    return native_kernel.checked("quantized_decode_attention", _self_test)


def native_float_attention() -> ModuleType | None:
    """The extension when its float32 decode attention passed its self-test, else None."""
    return native_kernel.checked("decode_attention", _float_self_test)


def native_prefill_attention() -> ModuleType | None:
    """The extension when its causal prefill attention passed its self-test, else None."""
    return native_kernel.checked("prefill_attention", _prefill_self_test)


# Query positions up to which a causal chunk after a cache (a speculative verify pass) takes the
# decode attention of either cache, which reads each key once for all of them and gives each
# position bit for bit what its own one-position step would. Float32 cache at Qwen3-4B's heads,
# 2 threads, per layer: 5 positions 0.13 / 3.8 ms at 133 / 4,096 tokens against the prefill
# kernel's 0.53 / 13.6 (whose tiles pay off for long chunks); 16 positions 0.38 / 10.4 against
# 0.48 / 14.3; at 32 it loses. A quantized cache's prefill path also dequantizes the whole cache.
DECODE_POSITIONS = 16


def quantized_attention(
    q: mx.array,
    keys: Packed,
    values: Packed,
    scale: float,
    mask: Any,
    group_size: int,
    bits: int,
) -> mx.array:
    """softmax(scale q K^T + mask) V over packed (weights, scales, biases) keys and values."""
    cpu = mx.default_device() == mx.cpu  # the native ops run on CPU streams only
    if _decode_kernel_takes(q, keys[0], mask) and cpu and q.dtype == mx.float32 and bits in (4, 8):
        module = native_attention()
        if module is not None:
            return module.quantized_decode_attention(
                q, *keys, *values, scale, group_size, bits, THREADS
            )
    if _causal_float32_cpu(q, mask):
        module = native_prefill_attention()
        if module is not None:
            # A prefill chunk: one layer's cache dequantized to float32 (what the reference's
            # quantized_matmul multiplies, exactly), then the native causal attention; a transient
            # of 4 bytes per cached element of this layer, freed when the layer is done.
            k, v = (_dequantized(packed, q.dtype, group_size, bits) for packed in (keys, values))
            return module.prefill_attention(q, k, v, scale, THREADS)
    return _reference(q, keys, values, scale, mask, group_size=group_size, bits=bits)


def _is_causal(mask: Any) -> bool:
    return isinstance(mask, str) and mask == "causal"


def _decode_kernel_takes(q: mx.array, keys: mx.array, mask: Any) -> bool:
    """Whether the decode attention takes these queries over keys [B, Hkv, T, ...]: one position
    without a mask, or up to DECODE_POSITIONS causal ones (the last of T)."""
    positions = q.shape[2]
    if positions == 1:
        return mask is None
    return positions <= min(DECODE_POSITIONS, keys.shape[2]) and _is_causal(mask)


def _causal_float32_cpu(q: mx.array, mask: Any) -> bool:
    """Whether a chunk of float32 queries with the "causal" mask on the CPU suits the native
    prefill attention."""
    return (
        q.dtype == mx.float32
        and _is_causal(mask)
        and q.shape[-1] % 32 == 0
        and mx.default_device() == mx.cpu
    )


def _dequantized(packed: Packed, dtype: mx.Dtype, group_size: int, bits: int) -> mx.array:
    """The cache's keys or values in dtype, from scales and biases cast to dtype first (as the
    reference does: bf16 scales would round the result to bf16)."""
    weights, scales, biases = packed
    return mx.dequantize(
        weights, scales.astype(dtype), biases.astype(dtype), group_size=group_size, bits=bits
    )


def float_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any) -> mx.array:
    """softmax(scale q K^T + mask) V over float keys and values [B, Hkv, T, D] (GQA by heads)."""
    float32_cpu = q.dtype == k.dtype == v.dtype == mx.float32 and mx.default_device() == mx.cpu
    if float32_cpu and _decode_kernel_takes(q, k, mask):
        module = native_float_attention()
        if module is not None:
            return module.decode_attention(q, k, v, scale, THREADS)
    if k.dtype == v.dtype == mx.float32 and _causal_float32_cpu(q, mask):
        module = native_prefill_attention()
        if module is not None:
            return module.prefill_attention(q, k, v, scale, THREADS)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
