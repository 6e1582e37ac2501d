"""A decode step with two native nodes per decoder layer (qwen3_mlx/native/decode_layer.cpp).

The separate ops of a layer (three mat-vec calls and the o projection, the norms, RoPE, attention,
SwiGLU, and the cache's slice update and slices) make about 17 graph nodes. At Qwen3-0.6B's shape
building and encoding them took the main thread 5.7 ms of CPU per step, and the pool's worker
went to sleep between the mat-vecs, on the same two cores that stream 15 ms of weights
(benchmarks/bench_decode_step.py). Here a layer is `decode_qkv`, the cache's two slice updates
(MLX's, which donate the buffer as before) and `decode_rest`: four nodes. They run the same
kernels in the same order on the same rows, so their outputs are bit for bit the separate ops'
(their self-test checks that, and tests/test_decode_layer.py over whole models).

It applies to one row of one to eight positions (a decode step, a speculative verify pass)
when every layer can take it: float32 compute on the CPU, 4-bit native layers without biases, a
plain float32 `KVCache` of mlx-lm with room for the positions, no tensor-parallel group. Anything
else (a longer prefill chunk, a quantized or batched cache, the GPU, bf16 checkpoints) keeps the
separate ops, as does the one step in 256 where mlx-lm's cache grows its buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from qwen3_mlx.cpu import native as native_kernel
from qwen3_mlx.cpu import ops as cpu_ops
from qwen3_mlx.cpu.kv_attention import native_float_attention
from qwen3_mlx.cpu.quantized import THREADS, CpuQuantizedLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _separate(module: ModuleType, h, normed, parts, norms, inv_freq, keys, values, offset, scale):
    """What the separate native ops give for one layer (the self-test's reference)."""
    (wq, wk, wv, wo, wg, wu, wd), group = parts, 64
    q_weight, k_weight, post, following = norms
    L, heads = h.shape[1], keys.shape[1]
    q, k, v = module.quantized_matmuls(normed, *zip(wq, wk, wv, strict=True), group, 1, False)
    q, k = module.qk_norm_rope(q, k, q_weight, k_weight, inv_freq, 1e-6, offset, 1.0)
    keys[..., offset : offset + L, :] = k
    values[..., offset : offset + L, :] = v.reshape(1, L, heads, -1).transpose(0, 2, 1, 3)
    keys, values = keys[..., : offset + L, :], values[..., : offset + L, :]
    attended = module.decode_attention(q, keys, values, scale, 1)
    attended = attended.transpose(0, 2, 1, 3).reshape(1, L, -1)
    delta = module.quantized_matmul(attended, *wo, group, 1, False)
    h1, n1 = module.add_rms_norm(h, delta, post, 1e-6)
    gate, up = module.quantized_matmuls(n1, *zip(wg, wu, strict=True), group, 1, False)
    delta = module.quantized_matmul(module.swiglu(gate, up), *wd, group, 1, False)
    return module.add_rms_norm(h1, delta, following, 1e-6)


def _self_test(module: ModuleType) -> str | None:
    """None if a small layer's fused step, for one position and for three, equals the separate
    ops bit for bit, else what failed."""
    # The fused layer stands for the separate ops: each must have passed its own test first.
    if cpu_ops.fused_ops() is None or native_float_attention() is None:
        return "the separate decode ops it replaces did not pass their self-tests"
    D, inner, heads, kv_heads, head_dim, capacity, offset = 128, 256, 4, 2, 64, 12, 5
    sizes = [(heads * head_dim, D), (kv_heads * head_dim, D), (kv_heads * head_dim, D)]
    sizes += [(D, heads * head_dim), (inner, D), (inner, D), (D, inner)]
    parts = [
        mx.quantize(mx.sin(mx.arange(n * k, dtype=mx.float32) * (0.37 + i)).reshape(n, k) * 0.1)
        for i, (n, k) in enumerate(sizes)
    ]
    weights = [array for part in parts for array in part]
    norms = [mx.linspace(0.5, 1.5, n) for n in (head_dim, head_dim, D, D)]
    inv_freq = cpu_ops.default_inv_freq(head_dim, 10_000.0)
    cache = mx.sin(mx.arange(kv_heads * capacity * head_dim, dtype=mx.float32) * 0.01)
    cache = cache.reshape(1, kv_heads, capacity, head_dim)
    for L in (1, 3):
        h = mx.cos(mx.arange(L * D, dtype=mx.float32) * 0.1).reshape(1, L, D)
        normed = module.rms_norm(h, norms[2], 1e-6)
        expected_keys, expected_values = mx.array(cache), mx.array(cache + 0)
        expected = _separate(
            module, h, normed, parts, norms, inv_freq, expected_keys, expected_values, offset, 0.125
        )
        keys, values = mx.array(cache), mx.array(cache + 0)
        q, k, v = module.decode_qkv(
            normed, weights[:9], norms[0], norms[1], inv_freq, kv_heads, offset, 1.0, 1e-6, 64, 1
        )
        keys[..., offset : offset + L, :] = k
        values[..., offset : offset + L, :] = v
        actual = module.decode_rest(
            h, q, keys, values, weights[9:], norms[2], norms[3], offset, 0.125, 1e-6, 1e-6, 64, 1
        )
        pairs = [*zip(actual, expected, strict=True)]
        pairs += [(keys, expected_keys), (values, expected_values)]
        if not all(mx.array_equal(a, e).item() for a, e in pairs):
            return "its decode_qkv / decode_rest self-test differed from the separate ops"
    return None


def native_layer() -> ModuleType | None:
    """The extension when its fused decode layer passed its self-test, else None."""
    return native_kernel.checked("decode_rest", _self_test)


def _layer_parts(layer: nn.Module) -> tuple[list[mx.array], int] | None:
    """The layer's 21 projection arrays and their group size, if the fused node takes them."""
    attention, mlp = layer.self_attn, layer.mlp
    if attention.group is not None or mlp.group is not None:
        return None
    if attention.rope.dims != attention.head_dim or attention.q_norm.eps != attention.k_norm.eps:
        return None
    arrays, group_size = [], None
    for name in PROJECTIONS:
        linear = (attention if name in PROJECTIONS[:4] else mlp)[name]
        if type(linear) is not CpuQuantizedLinear or "bias" in linear or "biases" not in linear:
            return None
        scales = linear["scales"]
        if group_size is None:
            group_size = linear.group_size
        if linear.group_size != group_size or not native_kernel.supports_layer(
            linear.bits, linear.group_size, linear.mode, scales.dtype
        ):
            return None
        arrays += (linear["weight"], scales, linear["biases"])
    return arrays, group_size


def _room(layer_cache: Any, positions: int) -> bool:
    """Whether a layer's cache is a plain float32 KVCache with rows free for the positions."""
    return (
        type(layer_cache) is KVCache
        and layer_cache.keys is not None
        and layer_cache.offset + positions <= layer_cache.keys.shape[2]
        and layer_cache.keys.dtype == mx.float32
        and layer_cache.keys.shape[0] == 1
    )


def decode_step(
    layers: Sequence[nn.Module], final_norm: nn.Module, h: mx.array, normed: mx.array, cache: Any
) -> mx.array | None:
    """The final norm's output after every layer, two native nodes each, for one row of 1 to
    MATVEC_ROWS positions; None (nothing done) where the fused nodes do not apply."""
    B, L, _ = h.shape
    if B != 1 or not 1 <= L <= native_kernel.MATVEC_ROWS or h.dtype != mx.float32 or not layers:
        return None
    if cache is None or mx.default_device() != mx.cpu or not all(_room(c, L) for c in cache):
        return None
    module = native_layer()
    if module is None:
        return None
    found = [_layer_parts(layer) for layer in layers]
    if any(parts is None for parts in found):
        return None
    int8 = native_kernel.int8_decode_reason() is None
    norm_weights = [layer.post_attention_layernorm["weight"] for layer in layers]
    following = [layer.input_layernorm for layer in layers[1:]] + [final_norm]
    if any(w.dtype != mx.float32 for w in norm_weights):
        return None
    for layer, layer_cache, (arrays, group_size), post, after in zip(
        layers, cache, found, norm_weights, following, strict=True
    ):
        attention, offset = layer.self_attn, layer_cache.offset
        q, k, v = module.decode_qkv(
            normed,
            arrays[:9],
            attention.q_norm["weight"],
            attention.k_norm["weight"],
            attention.rope.inverse_frequencies(),
            attention.n_kv_heads,
            offset,
            attention.rope.attention_factor,
            attention.q_norm.eps,
            group_size,
            THREADS,
            int8,
        )
        layer_cache.keys[..., offset : offset + L, :] = k
        layer_cache.values[..., offset : offset + L, :] = v
        layer_cache.offset = offset + L
        h, normed = module.decode_rest(
            h,
            q,
            layer_cache.keys,
            layer_cache.values,
            arrays[9:],
            post,
            after["weight"],
            offset,
            attention.scale,
            layer.post_attention_layernorm.eps,
            after.eps,
            group_size,
            THREADS,
            int8,
        )
    return normed
