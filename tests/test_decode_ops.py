"""The native float32 decode ops (qwen3_mlx/cpu/ops.py, native/decode_ops.cpp): RMSNorm, RoPE
(plain and YaRN) and SwiGLU match a float64 reference and MLX's own ops on decode and prefill
shapes, strided inputs and far positions, on every instruction set; the fused layer ops
(add_rms_norm, qk_norm_rope) are bit for bit the separate ops; bad inputs get a message;
what they do not take (half precision, per-row offsets) keeps MLX's ops; and the tiny model
decodes the same tokens with them and without them."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from greedy import greedy_decode

from qwen3_mlx.cpu import ops as cpu_ops
from qwen3_mlx.cpu.native import checked_reason
from qwen3_mlx.rope import RoPE

REPO = Path(__file__).resolve().parent.parent

native = cpu_ops.native_ops()
needs_native = pytest.mark.skipif(
    native is None, reason=f"native ops not built: {checked_reason('swiglu')}"
)
ISAS = [None, "avx2", "scalar"]


def close(actual: mx.array, expected: np.ndarray, tolerance: float) -> None:
    """actual within tolerance of expected, relative to expected's largest magnitude."""
    error = np.abs(np.array(actual, dtype=np.float64) - expected).max()
    assert error <= tolerance * max(1.0, np.abs(expected).max()), error


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 2560), (1, 32, 1, 128), (2, 7, 1030), (3, 64)])
def test_rms_norm_matches_float64_and_mlx(shape) -> None:
    x = mx.random.normal(shape, key=mx.random.key(1)) * 4
    weight = mx.random.uniform(0.5, 2.0, (shape[-1],), key=mx.random.key(2))
    x64, w64 = np.array(x, dtype=np.float64), np.array(weight, dtype=np.float64)
    reference = w64 * x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    close(cpu_ops.rms_norm(x, weight, 1e-6), reference, 2e-6)
    close(cpu_ops.rms_norm(x, weight, 1e-6), np.array(mx.fast.rms_norm(x, weight, 1e-6)), 2e-6)


def float64_rope(x: mx.array, inv_freq: np.ndarray, offset: int, factor: float) -> np.ndarray:
    """The rotation in float64, with theta rounded to float32 as MLX and transformers do."""
    x64 = np.array(x, dtype=np.float64) * factor
    L, half = x64.shape[-2], x64.shape[-1] // 2
    positions = np.arange(offset, offset + L, dtype=np.float32)[:, None]
    theta = (positions * inv_freq.astype(np.float32)[None]).astype(np.float64)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = x64[..., :half], x64[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@needs_native
@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize("offset", [0, 1, 999, 40_000])
@pytest.mark.parametrize("L", [1, 9])
def test_rope_matches_float64_and_mlx(scaling, offset, L) -> None:
    rope = RoPE(128, 1_000_000.0, scaling)
    # [B, L, H, D] -> [B, H, L, D] as the model hands it over: strided when L > 1.
    x = mx.random.normal((2, L, 8, 128), key=mx.random.key(offset)).transpose(0, 2, 1, 3)
    actual = rope(x, offset=offset)
    reference = float64_rope(x, np.array(rope.inverse_frequencies()), offset, rope.attention_factor)
    close(actual, reference, 4e-6)
    mlx_path = x * rope.attention_factor if rope.attention_factor != 1.0 else x
    expected = mx.fast.rope(
        mlx_path,
        128,
        traditional=False,
        base=None if scaling else rope.base,
        scale=1.0,
        offset=offset,
        freqs=rope._freqs,
    )
    close(actual, np.array(expected), 4e-6)


@needs_native
def test_default_inverse_frequencies_are_mlxs_bit_for_bit() -> None:
    """Far into a context theta = position * inv_freq amplifies any ulp of inv_freq: the native
    op's must be exactly what mx.fast.rope uses, so cos of (1, 0) pairs matches MLX's."""
    half = 64
    unit = mx.concatenate([mx.ones((1, 1, 1, half)), mx.zeros((1, 1, 1, half))], -1)
    expected = mx.fast.rope(unit, 128, traditional=False, base=1e6, scale=1.0, offset=30_000)
    actual = cpu_ops.rope(unit, cpu_ops.default_inv_freq(128, 1e6), 30_000, 1.0)
    assert np.abs(np.array(actual) - np.array(expected)).max() <= 2.5e-7


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_matches_float64_and_mlx(isa, monkeypatch) -> None:
    if isa:
        monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    gate = mx.random.normal((1, 1, 9731), key=mx.random.key(3)) * 6
    edges = mx.array([[[-100.0, 100.0, 0.0, -87.5, 88.5, -1e-30, 30.0, -30.0, 1e-3]]])
    gate = mx.concatenate([gate, edges], -1)
    up = mx.random.normal(gate.shape, key=mx.random.key(4))
    g64, u64 = np.array(gate, dtype=np.float64), np.array(up, dtype=np.float64)
    reference = g64 / (1.0 + np.exp(-g64)) * u64
    actual = np.array(cpu_ops.swiglu(gate, up), dtype=np.float64)
    # Relative to each element (1e-6 is ~8 float32 roundings), with an absolute floor for
    # the tiny values far below zero.
    assert (np.abs(actual - reference) <= 1e-6 * np.abs(reference) + 1e-30).all()
    close(cpu_ops.swiglu(gate, up), np.array(nn.silu(gate) * up), 2e-6)


@needs_native
@pytest.mark.parametrize("scaling", [None, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize(("L", "offset"), [(1, 0), (1, 40_000), (9, 7)])
def test_fused_layer_ops_are_the_separate_ops_bit_for_bit(scaling, L, offset) -> None:
    """qk_norm_rope and add_rms_norm give exactly rms_norm, the transpose, rope and the add,
    on strided views (the kernel copies them) as on contiguous inputs."""
    rope = RoPE(64, 1_000_000.0, scaling)
    inv_freq = rope.inverse_frequencies()
    wq, wk = (mx.random.uniform(0.5, 2.0, (64,), key=mx.random.key(i)) for i in (6, 7))
    wide = mx.random.normal((2, L, 3 * 4 * 64), key=mx.random.key(8)) * 3
    q, k = wide[..., : 4 * 64], wide[..., 4 * 64 : 6 * 64]  # strided views
    fused = native.qk_norm_rope(q, k, wq, wk, inv_freq, 1e-6, offset, rope.attention_factor)
    for actual, x, w in zip(fused, (q, k), (wq, wk), strict=True):
        heads = native.rms_norm(mx.contiguous(x).reshape(2, L, -1, 64), w, 1e-6)
        separate = native.rope(heads.transpose(0, 2, 1, 3), inv_freq, offset, rope.attention_factor)
        assert actual.shape == separate.shape and mx.array_equal(actual, separate).item()
    x = mx.random.normal((2, 64, L), key=mx.random.key(9)).transpose(0, 2, 1)  # strided
    delta = mx.random.normal((2, L, 64), key=mx.random.key(10))
    h, normed = native.add_rms_norm(x, delta, wq, 1e-6)
    assert mx.array_equal(h, x + delta).item()
    assert mx.array_equal(normed, native.rms_norm(x + delta, wq, 1e-6)).item()


@needs_native
def test_bad_inputs_are_refused_with_a_message() -> None:
    x = mx.zeros((1, 4, 1, 64))
    with pytest.raises(ValueError, match="weight must be"):
        native.rms_norm(x, mx.ones((32,)), 1e-6)
    with pytest.raises(ValueError, match="must be float32"):
        native.rms_norm(x.astype(mx.bfloat16), mx.ones((64,)), 1e-6)
    with pytest.raises(ValueError, match="inv_freq"):
        native.rope(x, mx.ones((64,)), 0)
    with pytest.raises(ValueError, match="offset"):
        native.rope(x, mx.ones((32,)), -1)
    with pytest.raises(ValueError, match="one shape"):
        native.swiglu(x, mx.zeros((1, 4, 1, 32)))
    with pytest.raises(ValueError, match="one shape"):
        native.add_rms_norm(x, mx.zeros((1, 4, 1, 32)), mx.ones((64,)), 1e-6)
    w, inv_freq = mx.ones((64,)), mx.ones((32,))
    with pytest.raises(ValueError, match=r"q \[B, L, Hq \* D\]"):
        native.qk_norm_rope(mx.zeros((1, 1, 96)), mx.zeros((1, 1, 64)), w, w, inv_freq, 1e-6, 0)
    with pytest.raises(ValueError, match="inv_freq"):
        native.qk_norm_rope(mx.zeros((1, 1, 64)), mx.zeros((1, 1, 64)), w, w, w, 1e-6, 0)


def test_what_the_native_ops_do_not_take_keeps_mlxs_ops() -> None:
    """Half precision and per-row offsets give exactly MLX's results."""
    x = mx.random.normal((1, 4, 3, 64), key=mx.random.key(5)).astype(mx.bfloat16)
    weight = mx.ones((64,), dtype=mx.bfloat16)
    assert mx.array_equal(cpu_ops.rms_norm(x, weight, 1e-6), mx.fast.rms_norm(x, weight, 1e-6))
    assert mx.array_equal(cpu_ops.swiglu(x, x), nn.silu(x) * x)
    rope = RoPE(64, 10_000.0)
    assert mx.array_equal(
        rope(x, offset=3),
        mx.fast.rope(x, 64, traditional=False, base=10_000.0, scale=1.0, offset=3),
    )
    assert (
        cpu_ops.rope(x.astype(mx.float32), cpu_ops.default_inv_freq(64, 1e4), mx.array([2]), 1.0)
        is None
    )


@needs_native
def test_the_model_decodes_the_same_with_and_without_the_ops(monkeypatch) -> None:
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(REPO / "models" / "qwen3-tiny-chat")

    def decode() -> tuple[list[int], np.ndarray]:
        return greedy_decode(model, tokenizer, None, repeats=4)

    calls: Counter[str] = Counter()

    class Counting:
        def __getattr__(self, name: str):
            def call(*args, **kwargs):
                calls[name] += 1
                return getattr(native, name)(*args, **kwargs)

            return call

    monkeypatch.setattr(cpu_ops, "native_ops", lambda: Counting())
    with_ops = decode()
    layers = len(model.layers)
    # Per token: the first layer's input norm; each residual add with the norm after it (2 a
    # layer, the last one with the final norm); q's and k's norms and RoPEs, and SwiGLU, one
    # op each a layer.
    assert calls == {
        "rms_norm": 25,
        "add_rms_norm": 25 * 2 * layers,
        "qk_norm_rope": 25 * layers,
        "swiglu": 25 * layers,
    }
    # The fused ops are bit for bit the separate native ops they replace.
    monkeypatch.setattr(cpu_ops, "_fused_for", lambda *arrays: None)
    separate = decode()
    assert with_ops[0] == separate[0] and np.array_equal(with_ops[1], separate[1])
    monkeypatch.setattr(cpu_ops, "native_ops", lambda: None)
    without = decode()
    assert with_ops[0] == without[0]
    assert np.abs(with_ops[1] - without[1]).max() < 1e-4
    assert math.isfinite(float(with_ops[1].max()))
