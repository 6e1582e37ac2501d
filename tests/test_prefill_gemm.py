"""The CPU prefill path (qwen3_mlx.prefill_gemm): dequantize + one GEMM for many rows gives the
quantized layer's results (to float32 rounding), one row keeps the quantized kernel bit for bit,
and the loader installs it only where it is faster (float32 activations with OpenBLAS, CPU)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import qwen3_mlx.prefill_gemm as prefill_gemm
from qwen3_mlx.loading import load_model
from qwen3_mlx.prefill_gemm import MIN_ROWS, PrefillGemmLinear, prefill_gemm_helps, use_prefill_gemm

SHAPES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}


def quantized_layer(bits: int = 4, group_size: int = 64) -> nn.QuantizedLinear:
    """A float32 quantized layer 256 -> 96 with random weights."""
    mx.random.seed(0)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=False), group_size, bits)
    return layer


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, 32), (3, 64)])
def test_many_rows_match_the_quantized_kernel(bits, group_size):
    layer = quantized_layer(bits, group_size)
    gemm = PrefillGemmLinear.from_quantized(layer)
    assert gemm.weight is layer.weight  # shares the arrays, no copy
    x = mx.random.normal((2, 3 * MIN_ROWS, 256))
    expected = np.array(layer(x))
    np.testing.assert_allclose(
        np.array(gemm(x)), expected, rtol=0, atol=2e-5 * np.abs(expected).max()
    )
    one = x[:1, :1]
    assert mx.array_equal(gemm(one), layer(one)).item()  # decode keeps quantized_matmul


def test_helps_only_for_float32_on_the_cpu_with_openblas(monkeypatch):
    monkeypatch.setattr(prefill_gemm, "openblas_active", lambda: "/usr/lib/libopenblas.so.0")
    on_cpu = mx.default_device() == mx.cpu
    assert prefill_gemm_helps(mx.float32) is on_cpu
    assert not prefill_gemm_helps(mx.bfloat16)  # keeps bit-parity with mlx-lm at checkpoint dtype
    monkeypatch.setattr(prefill_gemm, "openblas_active", lambda: None)
    assert not prefill_gemm_helps(mx.float32)  # the reference BLAS is no faster than the kernel


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the prefill path is for the CPU backend")
def test_loader_installs_it_where_it_helps(make_checkpoint, monkeypatch):
    model_dir = make_checkpoint(dtype="bfloat16", **SHAPES)
    monkeypatch.setattr(prefill_gemm, "openblas_active", lambda: None)
    plain, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32")
    assert type(plain.layers[0].mlp.down_proj) is nn.QuantizedLinear
    monkeypatch.setattr(prefill_gemm, "openblas_active", lambda: "/usr/lib/libopenblas.so.0")
    fast, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32", fuse=True)
    assert type(fast.layers[0].mlp.down_proj) is PrefillGemmLinear
    assert type(fast.layers[0].self_attn.qkv_proj) is PrefillGemmLinear  # fusion keeps the class
    half, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="bfloat16")
    assert type(half.layers[0].mlp.down_proj) is nn.QuantizedLinear
    assert use_prefill_gemm(fast) == 0  # nothing left to swap
    ids = mx.array(np.random.default_rng(5).integers(0, 512, (1, 40)))
    expected = np.array(plain(ids))
    actual = np.array(fast(ids))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert (actual.argmax(-1) == expected.argmax(-1)).all()
