"""The native causal prefill attention (qwen3_mlx/native/prefill_attention.cpp): within float32
rounding of a float64 reference and of mx.fast's "causal" attention, for chunks after a cached
prefix, GQA groups, strided caches and query counts that fill no block, on every instruction
set; refused inputs; the tiny model's greedy tokens the same with it and without."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from greedy import greedy_decode

from qwen3_mlx.cpu import kv_attention
from qwen3_mlx.cpu.native import checked_reason

native = kv_attention.native_prefill_attention()
needs_native = pytest.mark.skipif(
    native is None, reason=f"native prefill attention: {checked_reason('prefill_attention')}"
)

CASES = [
    # (B, Hq, Hkv, L, T, D, capacity): keys T - L + l visible to query l; capacity > T: a view
    (1, 4, 2, 2, 2, 32, 2),  # the smallest chunk
    (1, 16, 8, 70, 70, 128, 80),  # Qwen3-0.6B heads, a prompt shorter than one block
    (1, 32, 8, 130, 300, 128, 300),  # Qwen3-4B heads, a chunk after 170 cached tokens
    (2, 6, 2, 65, 97, 64, 128),  # a batch, 3 query heads per KV head, one past a block
]


def float64_causal_attention(q, k, v, scale: float) -> np.ndarray:
    """softmax(scale q K^T + lower-right causal mask) V in float64, GQA by heads."""
    q, k, v = (np.array(a).astype(np.float64) for a in (q, k, v))
    L, T, group = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = scale * q @ k.swapaxes(2, 3)
    scores[..., np.arange(T)[None, :] > (T - L + np.arange(L))[:, None]] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


def counting(calls: list) -> type:
    """A stand-in for the extension that records each prefill_attention call's query shape."""

    class Counting:
        def prefill_attention(self, *args):
            calls.append(args[0].shape)
            return native.prefill_attention(*args)

    return Counting


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_matches_float64_and_mx_fast(case, isa, monkeypatch) -> None:
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)  # never above what the CPU has
    B, Hq, Hkv, L, T, D, capacity = case
    mx.random.seed(sum(case))
    q = mx.random.normal((B, Hq, L, D))
    k = (mx.random.normal((B, Hkv, capacity, D)) * 2)[..., :T, :]
    v = mx.random.normal((B, Hkv, capacity, D))[..., :T, :]
    scale = D**-0.5
    ours = np.array(native.prefill_attention(q, k, v, scale, 2))
    fast = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    np.testing.assert_allclose(ours, float64_causal_attention(q, k, v, scale), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, np.array(fast), rtol=1e-5, atol=1e-5)


@needs_native
def test_bad_inputs_are_refused_with_a_message() -> None:
    q, k = mx.zeros((1, 4, 8, 64)), mx.zeros((1, 2, 8, 64))
    with pytest.raises(ValueError, match="T >= L"):
        native.prefill_attention(q, k[:, :, :4], k[:, :, :4], 1.0, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.prefill_attention(q[..., :48], k[..., :48], k[..., :48], 1.0, 1)
    with pytest.raises(ValueError, match="q must be float32"):
        native.prefill_attention(q.astype(mx.bfloat16), k, k, 1.0, 1)


@needs_native
def test_the_model_decodes_the_same_with_and_without_it(monkeypatch) -> None:
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(Path(__file__).resolve().parents[1] / "models" / "qwen3-tiny-chat")
    calls = []
    monkeypatch.setattr(kv_attention, "native_prefill_attention", counting(calls))
    with_kernel = greedy_decode(model, tokenizer, None, repeats=4, steps=12)
    assert len(calls) == len(model.layers)  # the prompt, every layer
    monkeypatch.setattr(kv_attention, "native_prefill_attention", lambda: None)
    without = greedy_decode(model, tokenizer, None, repeats=4, steps=12)
    assert with_kernel[0] == without[0]
    assert np.abs(with_kernel[1] - without[1]).max() < 1e-4


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_a_chunk_over_a_quantized_cache_takes_it(bits, monkeypatch) -> None:
    """A quantized KV cache (bf16 scales, as qwen3_mlx.cache keeps them): the chunk's attention
    dequantizes the cache to float32 and runs natively, within float32 rounding of mlx-lm's
    quantized attention (MLX's row-by-row kernel, formerly the route)."""
    mx.random.seed(bits)
    q = mx.random.normal((1, 4, 20, 64))
    keys, values = (
        mx.quantize(mx.random.normal((1, 2, 50, 64)).astype(mx.bfloat16), group_size=32, bits=bits)
        for _ in range(2)
    )
    expected = kv_attention._reference(q, keys, values, 0.125, "causal", group_size=32, bits=bits)
    calls = []
    monkeypatch.setattr(kv_attention, "native_prefill_attention", counting(calls))
    actual = kv_attention.quantized_attention(q, keys, values, 0.125, "causal", 32, bits)
    assert calls == [(1, 4, 20, 64)]
    np.testing.assert_allclose(np.array(actual), np.array(expected), rtol=1e-5, atol=1e-5)
