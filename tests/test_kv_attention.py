"""Decode attention (qwen3_mlx/cpu/kv_attention.py). Over a quantized KV cache the native fused kernel
matches a float64 reference and mlx-lm's quantized attention on the same packed cache, for 8 and
4 bits, float32/bf16/f16 scales, GQA ratios, batches, contexts across its 256-token chunks and
strided cache views, on every instruction set. Over a float32 cache the native kernel matches a
float64 reference and mx.fast.scaled_dot_product_attention the same way, and follows any strides.
The model decodes the same tokens with the kernels and without them, each quantized call within
float32 rounding of mlx-lm's; everything they do not take (prefill chunks, masks, other dtypes)
goes to mlx-lm's or MLX's path."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from greedy import greedy_decode

from qwen3_mlx.cpu import kv_attention
from qwen3_mlx.cpu.native import checked_reason

REPO = Path(__file__).resolve().parent.parent

native = kv_attention.native_attention()
needs_native = pytest.mark.skipif(
    native is None,
    reason=f"native attention not available: {checked_reason('quantized_decode_attention')}",
)


def packed_cache(shape, bits, group, dtype, capacity):
    """Random keys and values quantized into a buffer of `capacity` tokens, sliced to T."""
    B, H, T, D = shape
    keys = mx.random.normal((B, H, capacity, D)) * 2
    values = mx.random.normal((B, H, capacity, D))
    pack = [mx.quantize(a.astype(dtype), group_size=group, bits=bits) for a in (keys, values)]
    return [tuple(part[..., :T, :] for part in packed) for packed in pack]


def float64_float_attention(q, k, v, scale):
    """softmax(scale q K^T) V in float64, query head h*R + r on KV head h."""
    B, Hq, _, D = q.shape
    k, v = np.array(k, dtype=np.float64), np.array(v, dtype=np.float64)
    H = k.shape[1]
    qn = np.array(q, dtype=np.float64).reshape(B, H, Hq // H, D)
    scores = np.einsum("bhrd,bhtd->bhrt", qn, k) * scale
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhrt,bhtd->bhrd", weights, v).reshape(B, Hq, 1, D)


def float64_attention(q, keys, values, scale, group, bits):
    """The same over packed keys and values, dequantized exactly (float32 scales)."""

    def dense(packed):
        w, s, b = packed
        return mx.dequantize(
            w, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits
        )

    return float64_float_attention(q, dense(keys), dense(values), scale)


CASES = [
    # (B, Hq, Hkv, T, D, bits, group, scale dtype, capacity)
    (1, 32, 8, 700, 128, 8, 64, mx.bfloat16, 768),  # Qwen3-4B heads, a sliced cache
    (1, 32, 8, 700, 128, 4, 64, mx.bfloat16, 768),
    (1, 16, 8, 513, 128, 8, 64, mx.float32, 513),  # Qwen3-0.6B heads, one past two chunks
    (1, 16, 8, 300, 128, 4, 64, mx.float16, 512),
    (2, 6, 2, 257, 64, 8, 32, mx.bfloat16, 512),  # a batch, 3 query heads per KV head
    (1, 4, 4, 1, 64, 4, 64, mx.float32, 256),  # one token, no GQA
    (1, 10, 2, 40, 128, 8, 128, mx.float32, 64),  # 5 rows: a block of 4 and one more
    (1, 16, 2, 45, 128, 4, 32, mx.bfloat16, 64),  # 8 rows: two blocks of 4; an odd key row left
    (1, 8, 8, 7, 64, 8, 32, mx.float16, 16),  # 7 tokens: fewer than a vector's lanes
    (1, 12, 4, 260, 256, 4, 128, mx.bfloat16, 300),  # D 256: several column passes, 3 rows
    (1, 8, 4, 33, 96, 8, 32, mx.float32, 40),  # D 96: column passes of 64 and then 32
    (1, 8, 4, 33, 96, 4, 32, mx.bfloat16, 40),
]


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[:7])))
def test_the_native_kernel_matches_float64_and_mlx_lm(case, isa, monkeypatch) -> None:
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)  # never above what the CPU has
    B, Hq, Hkv, T, D, bits, group, dtype, capacity = case
    mx.random.seed(sum(case[:7]))
    keys, values = packed_cache((B, Hkv, T, D), bits, group, dtype, capacity)
    q = mx.random.normal((B, Hq, 1, D))
    scale = D**-0.5
    ours = native.quantized_decode_attention(q, *keys, *values, scale, group, bits, 2)
    reference = kv_attention._reference(q, keys, values, scale, None, group_size=group, bits=bits)
    exact = float64_attention(q, keys, values, scale, group, bits)
    assert ours.shape == q.shape and ours.dtype == mx.float32
    assert np.abs(np.array(ours) - exact).max() < 2e-5
    assert np.abs(np.array(ours) - np.array(reference)).max() < 2e-5


@needs_native
def test_bad_inputs_are_refused_with_a_message() -> None:
    keys, values = packed_cache((1, 2, 8, 64), 8, 64, mx.bfloat16, 8)
    q = mx.zeros((1, 4, 1, 64))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        native.quantized_decode_attention(q, *keys, *values, 1.0, 64, 2, 1)
    with pytest.raises(ValueError, match="q must be float32"):
        native.quantized_decode_attention(q[:, :, :0], *keys, *values, 1.0, 64, 8, 1)
    with pytest.raises(ValueError, match="L <= the keys' T"):
        native.quantized_decode_attention(mx.zeros((1, 4, 9, 64)), *keys, *values, 1.0, 64, 8, 1)
    with pytest.raises(ValueError, match="keys and values"):
        native.quantized_decode_attention(q, *keys, *values, 1.0, 64, 4, 1)  # packed at 8 bits
    mixed = (values[0], values[1].astype(mx.float32), values[2])
    with pytest.raises(ValueError, match="one float dtype"):
        native.quantized_decode_attention(q, *keys, *mixed, 1.0, 64, 8, 1)


def test_masked_and_non_float32_calls_take_mlx_lms_path(monkeypatch) -> None:
    calls = []
    original = kv_attention._reference
    monkeypatch.setattr(
        kv_attention, "_reference", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    )
    few = kv_attention.DECODE_POSITIONS
    keys, values = packed_cache((1, 2, few + 4, 64), 8, 64, mx.bfloat16, few + 4)
    for q, mask in (
        (mx.zeros((1, 4, 3, 64)), "causal"),  # a verify pass: the native decode attention
        (mx.zeros((1, 4, few + 1, 64)), "causal"),  # a prefill chunk
        (mx.zeros((1, 4, 1, 64)), mx.ones((1, few + 4))),
        (mx.zeros((1, 4, 2, 64), dtype=mx.bfloat16), "causal"),
    ):
        out = kv_attention.quantized_attention(q, keys, values, 0.125, mask, 64, 8)
        assert out.shape == q.shape and out.dtype == q.dtype  # bf16 scales cast to q's dtype
    # A float32 causal chunk takes the native prefill attention over the dequantized layer
    # (test_prefill_attention checks its values) and falls back only without the extension.
    native_prefill = kv_attention.native_prefill_attention() is not None
    expected = [(1, 4, 1, 64), (1, 4, 2, 64)]
    if not native_prefill:
        expected.insert(0, (1, 4, few + 1, 64))
    if native is None:
        expected.insert(0, (1, 4, 3, 64))
    assert calls == expected


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_the_model_decodes_the_same_with_and_without_the_kernel(bits, monkeypatch) -> None:
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(REPO / "models" / "qwen3-tiny-chat")
    errors = []

    class Checking:
        """The kernel, each call compared with mlx-lm's attention over the same cache."""

        def quantized_decode_attention(self, q, *args):
            out = native.quantized_decode_attention(q, *args)
            keys, values, (scale, group, bits_, _) = args[:3], args[3:6], args[6:]
            reference = kv_attention._reference(
                q, keys, values, scale, None, group_size=group, bits=bits_
            )
            errors.append(np.abs(np.array(out) - np.array(reference)).max())
            return out

    monkeypatch.setattr(kv_attention, "native_attention", Checking)
    with_kernel = greedy_decode(model, tokenizer, bits)
    assert len(errors) == 24 * len(model.layers) and max(errors) < 1e-5
    monkeypatch.setattr(kv_attention, "native_attention", lambda: None)
    without = greedy_decode(model, tokenizer, bits)
    assert with_kernel[0] == without[0]
    # Each run fills its own cache, so a last-bit difference in one step's attention can put a
    # later key or value on the other side of one of the quantizer's rounding boundaries: a step
    # of 1/255 of its group's range at 8 bits, ~2e-3 in these logits (seen with the AVX-512
    # kernel; 6e-4 with the portable one) while every call agrees to ~1e-6. So the calls are
    # checked one by one above, and the two runs to within a few such steps.
    assert np.abs(with_kernel[1] - without[1]).max() < 1e-2


# ---------------------------------------------------------------------------------------------
# Float32 KV cache

native_float = kv_attention.native_float_attention()
needs_native_float = pytest.mark.skipif(
    native_float is None,
    reason=f"native float attention not available: {checked_reason('decode_attention')}",
)


def check_float(q, k, v, threads=2) -> None:
    """The native kernel within float32 rounding of float64 and of mx.fast."""
    scale = q.shape[-1] ** -0.5
    ours = native_float.decode_attention(q, k, v, scale, threads)
    fast = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    assert ours.shape == q.shape and ours.dtype == mx.float32
    np.testing.assert_allclose(ours, float64_float_attention(q, k, v, scale), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(ours, fast, rtol=1e-5, atol=2e-6)


FLOAT_CASES = [
    # (B, Hq, Hkv, T, D, capacity): capacity > T makes the cache a view strided along T
    (1, 8, 8, 1, 128, 4),  # no GQA, one token
    (1, 16, 8, 255, 128, 300),  # Qwen3-0.6B heads, one short of a chunk
    (1, 32, 8, 256, 128, 256),  # Qwen3-4B heads, exactly one chunk
    (2, 16, 2, 257, 64, 512),  # a batch, 8 query heads per KV head, one past a chunk
    (1, 12, 4, 700, 128, 768),  # 3 query heads per KV head (a pair and one), three chunks
    (1, 6, 2, 33, 48, 40),  # D a multiple of 16, not 32: AVX2 where AVX-512 was asked for
    (1, 4, 2, 40, 24, 64),  # D not a multiple of 16: the portable kernels on every ISA
]


@needs_native_float
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("case", FLOAT_CASES, ids=lambda case: "-".join(map(str, case)))
def test_the_native_float_kernel_matches_float64_and_mx_fast(case, isa, monkeypatch) -> None:
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)  # never above what the CPU has
    B, Hq, Hkv, T, D, capacity = case
    mx.random.seed(sum(case))
    k = (mx.random.normal((B, Hkv, capacity, D)) * 2)[..., :T, :]
    v = mx.random.normal((B, Hkv, capacity, D))[..., :T, :]
    check_float(mx.random.normal((B, Hq, 1, D)), k, v)


@needs_native_float
def test_the_native_float_kernel_follows_any_strides() -> None:
    mx.random.seed(3)
    q = mx.random.normal((2, 8, 1, 64))
    by_token = mx.random.normal((2, 300, 4, 64)).transpose(0, 2, 1, 3)  # [B, T, H, D] as a model's
    check_float(q, by_token[:, :, :290], by_token[:, :, 5:295])
    columns = mx.random.normal((2, 4, 64, 300)).swapaxes(2, 3)  # the last axis strided
    check_float(q, columns, columns * 0.5 + 1, threads=1)


@needs_native_float
def test_the_native_float_kernel_gives_zeros_for_an_empty_cache() -> None:
    empty = mx.zeros((1, 2, 0, 64))
    out = native_float.decode_attention(mx.ones((1, 4, 1, 64)), empty, empty, 0.125, 2)
    assert out.shape == (1, 4, 1, 64) and not mx.any(out).item()


@needs_native_float
def test_bad_float_inputs_are_refused_with_a_message() -> None:
    k = v = mx.zeros((1, 2, 8, 64))
    q = mx.zeros((1, 4, 1, 64))
    with pytest.raises(ValueError, match=r"q must be float32 \[B, Hq, L, D\]"):
        native_float.decode_attention(q.astype(mx.bfloat16), k, v, 1.0, 1)
    with pytest.raises(ValueError, match="L <= the keys' T"):
        native_float.decode_attention(mx.zeros((1, 4, 9, 64)), k, v, 1.0, 1)
    with pytest.raises(ValueError, match="q must be float32"):
        native_float.decode_attention(q[:, :, :0], k, v, 1.0, 1)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        native_float.decode_attention(mx.zeros((1, 5, 1, 64)), k, v, 1.0, 1)
    with pytest.raises(ValueError, match=r"keys and values must be float32 \[B, Hkv, T, D\]"):
        native_float.decode_attention(q, k[..., :32], v[..., :32], 1.0, 1)
    with pytest.raises(ValueError, match="keys and values"):
        native_float.decode_attention(q, k, v.astype(mx.float16), 1.0, 1)


def test_float_attention_takes_mx_fast_for_what_the_kernel_does_not(monkeypatch) -> None:
    taken = []

    class Recorder:
        def decode_attention(self, q, *args):
            taken.append(("native", q.shape[2], q.dtype))
            return mx.zeros(q.shape)

        def prefill_attention(self, q, *args):
            taken.append(("native prefill", q.shape[2], q.dtype))
            return mx.zeros(q.shape)

    fast = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(kv_attention, "native_float_attention", Recorder)
    monkeypatch.setattr(kv_attention, "native_prefill_attention", Recorder)
    monkeypatch.setattr(
        mx.fast,
        "scaled_dot_product_attention",
        lambda q, *a, **k: taken.append(("fast", q.shape[2], q.dtype)) or fast(q, *a, **k),
    )
    cache = mx.ones((1, 2, 16, 64))
    decode = mx.ones((1, 4, 1, 64))
    few = kv_attention.DECODE_POSITIONS
    for q, keys, mask in (
        (decode, cache, None),
        (mx.ones((1, 4, 3, 64)), mx.ones((1, 2, 18, 64)), "causal"),  # a verify pass
        (mx.ones((1, 4, 3, 48)), mx.ones((1, 2, 18, 48)), "causal"),  # D no multiple of 32
        (mx.ones((1, 4, few, 64)), mx.ones((1, 2, few, 64)), "causal"),  # no cache before it
        (mx.ones((1, 4, few + 1, 64)), mx.ones((1, 2, 40, 64)), "causal"),  # a prefill chunk
        (decode, cache, mx.ones((1, 16), dtype=mx.bool_)),  # a masked (padded) batch row
        (mx.ones((1, 4, 3, 64)), mx.ones((1, 2, 18, 64)), None),  # no mask: not causal
        (decode.astype(mx.bfloat16), cache.astype(mx.bfloat16), None),
        (mx.ones((1, 4, few + 1, 48)), mx.ones((1, 2, 40, 48)), "causal"),  # D % 32, long
    ):
        out = kv_attention.float_attention(q, keys, keys, 0.125, mask)
        assert out.shape == q.shape
    assert taken == [
        ("native", 1, mx.float32),
        ("native", 3, mx.float32),
        ("native", 3, mx.float32),
        ("native", few, mx.float32),
        ("native prefill", few + 1, mx.float32),
        ("fast", 1, mx.float32),
        ("fast", 3, mx.float32),
        ("fast", 1, mx.bfloat16),
        ("fast", few + 1, mx.float32),
    ]


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_few_positions_over_a_quantized_cache_are_each_their_own_step(bits, isa, monkeypatch):
    """As the float cache's test below: each position of a verify pass is bit for bit its own
    one-position call (here with the second chunk masked whole for the first position), and
    within float32 rounding of the dequantized cache's causal attention."""
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)  # never above what the CPU has
    B, Hq, Hkv, T, L, D = 1, 32, 8, 257, 5, 128
    mx.random.seed(bits)
    keys, values = packed_cache((B, Hkv, T, D), bits, 64, mx.bfloat16, T + 40)
    q = mx.random.normal((B, Hq, L, D))
    scale = D**-0.5
    ours = native.quantized_decode_attention(q, *keys, *values, scale, 64, bits, 2)
    for position in range(L):
        seen = T - L + position + 1
        alone = native.quantized_decode_attention(
            q[:, :, position : position + 1],
            *(part[..., :seen, :] for part in keys),
            *(part[..., :seen, :] for part in values),
            scale,
            64,
            bits,
            2,
        )
        assert mx.array_equal(ours[:, :, position : position + 1], alone).item(), position

    def dense(packed):
        w, s, b = packed
        return mx.dequantize(
            w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=bits
        )

    fast = mx.fast.scaled_dot_product_attention(
        q, dense(keys), dense(values), scale=scale, mask="causal"
    )
    np.testing.assert_allclose(ours, fast, rtol=1e-4, atol=2e-5)


VERIFY_CASES = [
    # (B, Hq, Hkv, T, L, D): the last L of T positions, causal
    (1, 32, 8, 133, 5, 128),  # Qwen3-4B heads, a verify pass of 5 after 128 tokens
    (1, 16, 8, 257, 2, 128),  # the first position sees 256 keys: the second chunk masked whole
    (2, 12, 4, 700, 8, 64),  # a batch, 3 query heads per KV head, three chunks
    (1, 4, 2, 16, 16, 48),  # every position new (T = L); D not a multiple of 32
    (1, 4, 2, 40, 3, 24),  # D not a multiple of 16: the portable kernels
]


@needs_native_float
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("case", VERIFY_CASES, ids=lambda case: "-".join(map(str, case)))
def test_a_few_positions_are_each_their_own_one_position_step(case, isa, monkeypatch) -> None:
    """A speculative verify pass's attention: position l of the last L sees keys [0, T - L + l],
    bit for bit what the one-position call that would decode it gives, and within float32
    rounding of mx.fast's causal attention."""
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)  # never above what the CPU has
    B, Hq, Hkv, T, L, D = case
    mx.random.seed(sum(case))
    k = (mx.random.normal((B, Hkv, T + 9, D)) * 2)[..., :T, :]  # a view strided along T
    v = mx.random.normal((B, Hkv, T + 9, D))[..., :T, :]
    q = mx.random.normal((B, Hq, L, D))
    scale = D**-0.5
    ours = native_float.decode_attention(q, k, v, scale, 2)
    assert ours.shape == q.shape
    for position in range(L):
        seen = T - L + position + 1
        alone = native_float.decode_attention(
            q[:, :, position : position + 1], k[..., :seen, :], v[..., :seen, :], scale, 2
        )
        assert mx.array_equal(ours[:, :, position : position + 1], alone).item(), position
    fast = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    np.testing.assert_allclose(ours, fast, rtol=1e-5, atol=2e-6)


@needs_native_float
def test_the_model_decodes_the_same_with_and_without_the_float_kernel(monkeypatch) -> None:
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(REPO / "models" / "qwen3-tiny-chat")
    calls = []

    class Counting:
        def decode_attention(self, *args):
            calls.append(args[0].shape)
            return native_float.decode_attention(*args)

    monkeypatch.setattr(kv_attention, "native_float_attention", Counting)
    with_kernel = greedy_decode(model, tokenizer, None)
    assert len(calls) == 24 * len(model.layers)  # every decode step of every layer
    monkeypatch.setattr(kv_attention, "native_float_attention", lambda: None)
    without = greedy_decode(model, tokenizer, None)
    assert with_kernel[0] == without[0]
    assert np.abs(with_kernel[1] - without[1]).max() < 1e-4
