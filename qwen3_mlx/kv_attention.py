"""Attention over a quantized KV cache: the native fused kernel for a CPU decode step, else mlx-lm's.

mlx-lm's `quantized_scaled_dot_product_attention` (two `quantized_matmul`s and a softmax) is the
reference and serves the GPU, prefill chunks and masked batches. On MLX's CPU backend it attends
1.3-1.5x slower than the float fused kernel while reading 3.6x fewer bytes, so one query position
over float32 queries takes the native kernel (qwen3_mlx/native/attention.cpp) when it was built:
keys, values, scales and biases read once and in place, the softmax fused, results within float32
rounding of mlx-lm's. The cache keeps bf16 scales (qwen3_mlx/cache.py); MLX's CPU kernel for
bf16 scales is a scalar loop, so the fallback casts them to the query dtype first (a transient
of two values per 64 cached elements).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from qwen3_mlx import native_kernel
from qwen3_mlx.cpu_quantized import THREADS

Packed = tuple[mx.array, mx.array, mx.array]

_checked: tuple[ModuleType | None, str | None] | None = None


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


def native_attention() -> ModuleType | None:
    """The extension when its decode attention is present and passed its self-test, else None."""
    global _checked
    if _checked is None:
        module = native_kernel.native()
        if module is None:
            _checked = (None, native_kernel.fallback_reason())
        elif not hasattr(module, "quantized_decode_attention"):
            _checked = (None, "the extension was built without the attention kernel")
        else:
            try:
                _checked = (module, _self_test(module))
            except Exception as error:  # an ABI mismatch shows up as a TypeError or C++ exception
                _checked = (module, f"its attention self-test failed ({type(error).__name__})")
            if _checked[1] is not None:
                _checked = (None, _checked[1])
    return _checked[0]


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
    if mask is None and q.shape[2] == 1 and q.dtype == mx.float32 and bits in (4, 8):
        module = native_attention()
        if module is not None:
            return module.quantized_decode_attention(
                q, *keys, *values, scale, group_size, bits, THREADS
            )
    return _reference(q, keys, values, scale, mask, group_size=group_size, bits=bits)
