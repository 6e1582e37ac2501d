"""Decode attention over a quantized KV cache (qwen3_mlx/kv_attention.py): the native fused kernel
matches a float64 reference and mlx-lm's quantized attention on the same packed cache, for 8 and
4 bits, float32/bf16/f16 scales, GQA ratios, batches, contexts across its 256-token chunks and
strided cache views, on every instruction set; the model decodes the same tokens with it and with
mlx-lm's path; and everything it does not take (prefill chunks, masks) goes to mlx-lm's path."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx import kv_attention
from qwen3_mlx.cache import make_cache

REPO = Path(__file__).resolve().parent.parent

native = kv_attention.native_attention()
needs_native = pytest.mark.skipif(
    native is None, reason=f"native attention not available: {kv_attention._checked}"
)


def packed_cache(shape, bits, group, dtype, capacity):
    """Random keys and values quantized into a buffer of `capacity` tokens, sliced to T."""
    B, H, T, D = shape
    keys = mx.random.normal((B, H, capacity, D)) * 2
    values = mx.random.normal((B, H, capacity, D))
    pack = [mx.quantize(a.astype(dtype), group_size=group, bits=bits) for a in (keys, values)]
    return [tuple(part[..., :T, :] for part in packed) for packed in pack]


def float64_attention(q, keys, values, scale, group, bits):
    def dense(packed):
        w, s, b = packed
        return np.array(
            mx.dequantize(
                w, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits
            ),
            dtype=np.float64,
        )

    k, v = dense(keys), dense(values)
    B, Hq, _, D = q.shape
    H = k.shape[1]
    qn = np.array(q, dtype=np.float64).reshape(B, H, Hq // H, D)
    scores = np.einsum("bhrd,bhtd->bhrt", qn, k) * scale
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhrt,bhtd->bhrd", weights, v).reshape(B, Hq, 1, D)


CASES = [
    # (B, Hq, Hkv, T, D, bits, group, scale dtype, capacity)
    (1, 32, 8, 700, 128, 8, 64, mx.bfloat16, 768),  # Qwen3-4B heads, a sliced cache
    (1, 32, 8, 700, 128, 4, 64, mx.bfloat16, 768),
    (1, 16, 8, 513, 128, 8, 64, mx.float32, 513),  # Qwen3-0.6B heads, one past two chunks
    (1, 16, 8, 300, 128, 4, 64, mx.float16, 512),
    (2, 6, 2, 257, 64, 8, 32, mx.bfloat16, 512),  # a batch, 3 query heads per KV head
    (1, 4, 4, 1, 64, 4, 64, mx.float32, 256),  # one token, no GQA
    (1, 10, 2, 40, 128, 8, 128, mx.float32, 64),  # 5 rows: a block of 4 and one more
]


@needs_native
@pytest.mark.parametrize("isa", [None, "avx2", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[:7])))
def test_the_native_kernel_matches_float64_and_mlx_lm(case, isa, monkeypatch) -> None:
    if isa is not None:
        monkeypatch.setenv("QWEN3_MLX_QMV_ISA", isa)
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
    with pytest.raises(ValueError, match="keys and values"):
        native.quantized_decode_attention(q, *keys, *values, 1.0, 64, 4, 1)  # packed at 8 bits
    mixed = (values[0], values[1].astype(mx.float32), values[2])
    with pytest.raises(ValueError, match="one float dtype"):
        native.quantized_decode_attention(q, *keys, *mixed, 1.0, 64, 8, 1)


def test_prefill_and_masked_calls_take_mlx_lms_path(monkeypatch) -> None:
    calls = []
    original = kv_attention._reference
    monkeypatch.setattr(
        kv_attention, "_reference", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    )
    keys, values = packed_cache((1, 2, 16, 64), 8, 64, mx.bfloat16, 16)
    for q, mask in (
        (mx.zeros((1, 4, 3, 64)), "causal"),
        (mx.zeros((1, 4, 1, 64)), mx.ones((1, 16))),
    ):
        out = kv_attention.quantized_attention(q, keys, values, 0.125, mask, 64, 8)
        assert out.shape == q.shape and out.dtype == mx.float32  # bf16 scales cast to q's dtype
    assert calls == [(1, 4, 3, 64), (1, 4, 1, 64)]


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_the_model_decodes_the_same_with_and_without_the_kernel(bits, monkeypatch) -> None:
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(REPO / "models" / "qwen3-tiny-chat")
    prompt = tokenizer.encode("Reverse these words: moon river star lake bird tree") * 6

    def decode() -> tuple[list[int], np.ndarray]:
        cache = make_cache(model, bits)
        logits = model(mx.array([prompt]), cache=cache)[0, -1]
        tokens, rows = [], []
        for _ in range(24):
            token = int(mx.argmax(logits).item())
            tokens.append(token)
            logits = model(mx.array([[token]]), cache=cache)[0, -1]
            rows.append(np.array(logits))
        return tokens, np.stack(rows)

    with_kernel = decode()
    monkeypatch.setattr(kv_attention, "native_attention", lambda: None)
    without = decode()
    assert with_kernel[0] == without[0]
    assert np.abs(with_kernel[1] - without[1]).max() < 1e-3
