"""Quantized matmuls on the CPU backend (qwen3_mlx.cpu.quantized): decode split over threads gives
the kernel's results bit for bit, the native 4-bit kernels (mat-vec and prefill matmul) and the
dequantize + GEMM prefill path give them to float32 rounding, and the loader installs the layers on the CPU backend only, keeping
the checkpoint keys. Model-level parity holds with the native kernel on and off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import qwen3_mlx.cpu.native as native_kernel
import qwen3_mlx.cpu.quantized as cpu_quantized
from qwen3_mlx.cache import make_cache
from qwen3_mlx.cpu.quantized import (
    MIN_ROWS,
    CpuQuantizedEmbedding,
    CpuQuantizedLinear,
    prefill_gemm_helps,
    use_cpu_kernels,
)
from qwen3_mlx.loading import load_model, read_weights
from qwen3_mlx.quant import QuantSpec

SHAPES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
ON_CPU = mx.default_device() == mx.cpu
OPENBLAS = "/usr/lib/libopenblas.so.0"  # a stand-in name: only whether one is active matters


pytestmark = pytest.mark.usefixtures("float32_x")  # float32 parity; int8 tests set theirs

NATIVE = native_kernel.native() is not None


def native_off(monkeypatch) -> None:
    """Make the layers use MLX's kernel as if the extension had not been built."""
    monkeypatch.setattr(native_kernel, "_loaded", (None, "turned off by the test"))
    # A fresh record of checked ops, so that an op first checked while the extension is off is
    # not remembered as unavailable once the test has put it back.
    monkeypatch.setattr(native_kernel, "_checked", {})


def quantized_layer(bits: int = 4, group_size: int = 64) -> nn.QuantizedLinear:
    """A float32 quantized layer 256 -> 300 with random weights (300 rows: uneven thread blocks)."""
    mx.random.seed(0)
    return nn.QuantizedLinear.from_linear(nn.Linear(256, 300, bias=False), group_size, bits)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (8, 32), (3, 64)])
def test_threaded_decode_is_bit_identical(monkeypatch, threads, bits, group_size):
    native_off(monkeypatch)
    monkeypatch.setattr(cpu_quantized, "THREADS", threads)
    layer = quantized_layer(bits, group_size)
    fast = CpuQuantizedLinear.from_quantized(layer)
    assert fast.weight is layer.weight  # shares the arrays, no copy
    assert len(cpu_quantized._blocks(300)) == min(threads, 300 // cpu_quantized.MIN_BLOCK)
    for shape in [
        (1, 1, 256),
        (1, MIN_ROWS - 1, 256),
    ]:  # one token; a few rows (below the GEMM path)
        x = mx.random.normal(shape)
        assert mx.array_equal(fast(x), layer(x)).item()


@pytest.mark.skipif(not NATIVE, reason=f"native kernel: {native_kernel.fallback_reason()}")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_decode_and_prefill_match_the_kernel(monkeypatch, threads):
    """The mat-vec (up to 8 rows) and the prefill matmul (more) within float32 rounding of MLX's."""
    monkeypatch.setattr(cpu_quantized, "THREADS", threads)
    layer = quantized_layer()
    fast = CpuQuantizedLinear.from_quantized(layer)
    for rows in [*range(1, 10), 13, 40]:
        x = mx.random.normal((1, rows, 256))
        expected = np.array(layer(x))
        np.testing.assert_allclose(
            np.array(fast(x)), expected, rtol=0, atol=1e-5 * np.abs(expected).max()
        )
    x = mx.random.normal((1, 2, 256))  # other bit widths and half-precision x keep MLX's kernel
    assert mx.array_equal(fast(x.astype(mx.bfloat16)), layer(x.astype(mx.bfloat16))).item()
    eight = CpuQuantizedLinear.from_quantized(quantized_layer(8, 32))
    assert mx.array_equal(eight(x), quantized_layer(8, 32)(x)).item()


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_gemm_matches_the_kernel(monkeypatch, threads):
    monkeypatch.setattr(cpu_quantized, "THREADS", threads)
    monkeypatch.setattr(cpu_quantized, "openblas_active", lambda: OPENBLAS)
    layer = quantized_layer()
    x = mx.random.normal((2, 3 * MIN_ROWS, 256))
    expected = np.array(layer(x))
    actual = np.array(CpuQuantizedLinear.from_quantized(layer)(x))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_gemm_only_for_float32_on_the_cpu_with_openblas(monkeypatch):
    monkeypatch.setattr(cpu_quantized, "openblas_active", lambda: OPENBLAS)
    assert prefill_gemm_helps(mx.float32) is ON_CPU
    assert not prefill_gemm_helps(mx.bfloat16)  # keeps bit-parity with mlx-lm at checkpoint dtype
    monkeypatch.setattr(cpu_quantized, "openblas_active", lambda: None)
    assert not prefill_gemm_helps(mx.float32)  # the reference BLAS is no faster than the kernel


@pytest.mark.skipif(not ON_CPU, reason="these layers are for the CPU backend")
@pytest.mark.parametrize(
    ("gemm", "native"),
    [(False, False), (True, False), (True, True)],
    ids=["kernel", "gemm", "gemm-native"],
)
def test_loaded_model_gives_the_same_logits(make_checkpoint, monkeypatch, gemm, native):
    if not native:
        native_off(monkeypatch)
    elif not NATIVE:
        pytest.skip(f"native kernel: {native_kernel.fallback_reason()}")
    model_dir = make_checkpoint(
        dtype="bfloat16", **SHAPES
    )  # tied: the embedding is the output layer
    monkeypatch.setattr(cpu_quantized, "openblas_active", lambda: OPENBLAS if gemm else None)
    monkeypatch.setattr(cpu_quantized, "THREADS", 2)
    fast, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32")
    assert type(fast.layers[0].mlp.down_proj) is CpuQuantizedLinear
    assert type(fast.layers[0].self_attn.q_proj) is CpuQuantizedLinear
    assert type(fast.model.embed_tokens) is CpuQuantizedEmbedding
    assert use_cpu_kernels(fast) == 0  # nothing left to swap
    plain, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32")
    plain.update_modules(_plain_modules(plain))
    ids = mx.array(np.random.default_rng(5).integers(0, 512, (1, 24)))
    cache, plain_cache = make_cache(fast), make_cache(plain)
    actual = [
        fast(ids, cache=cache),
        fast(ids[:, :1], cache=cache),
    ]  # prefill, then one decode step
    expected = [plain(ids, cache=plain_cache), plain(ids[:, :1], cache=plain_cache)]
    actual, expected = (np.array(mx.concatenate(pair, axis=1)) for pair in (actual, expected))
    if gemm or native:  # float32 rounding of another summation order
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    else:
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.skipif(not (ON_CPU and NATIVE), reason=f"native: {native_kernel.fallback_reason()}")
def test_tiny_model_greedy_tokens_with_and_without_the_native_prefill(monkeypatch):
    """The shipped tiny model, 4-bit: a prompt of more than 8 tokens takes the native prefill
    matmul; greedy tokens equal those with the extension off (MLX's kernels throughout)."""
    with_native, logits, without, expected = tiny_greedy_native_and_off(monkeypatch)
    assert with_native == without
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def tiny_greedy_native_and_off(monkeypatch) -> tuple[list[int], np.ndarray, list[int], np.ndarray]:
    """Greedy tokens and logits of the shipped tiny model, 4-bit, with the native kernels (its
    prompt checked to take the prefill matmul) and then with the extension off."""
    from pathlib import Path

    from greedy import greedy_decode

    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(
        Path(__file__).resolve().parents[1] / "models" / "qwen3-tiny-chat", quantize_on_load=4
    )
    rows = []
    matmul = native_kernel.quantized_matmuls
    monkeypatch.setattr(
        native_kernel,
        "quantized_matmuls",
        lambda x, *rest: rows.append(x.size // x.shape[-1]) or matmul(x, *rest),
    )
    with_native, logits = greedy_decode(model, tokenizer, None, repeats=3, steps=12)
    assert max(rows) > 8  # the prompt went through the prefill matmul
    native_off(monkeypatch)
    without, expected = greedy_decode(model, tokenizer, None, repeats=3, steps=12)
    return with_native, logits, without, expected


def _plain_modules(model: nn.Module) -> list:
    """The model's leaf modules with the CPU layers turned back into MLX's own classes."""
    from mlx.utils import tree_map_with_path

    def plain(_: str, module: nn.Module) -> nn.Module:
        if type(module) is CpuQuantizedLinear:
            layer = nn.QuantizedLinear(
                64, 1, bias=False, group_size=module.group_size, bits=module.bits
            )
            layer.update(_float32_scales(module))
            return layer
        if type(module) is CpuQuantizedEmbedding:
            layer = nn.QuantizedEmbedding(1, 64, group_size=module.group_size, bits=module.bits)
            layer.update(_float32_scales(module))
            layer.num_embeddings, layer.dims = module.num_embeddings, module.dims
            return layer
        return module

    return tree_map_with_path(plain, model.leaf_modules(), is_leaf=nn.Module.is_module)


def _float32_scales(module: nn.Module) -> dict:
    """The layer's parameters with scales and biases kept in place cast to float32 (exact)."""
    return {
        name: value.astype(mx.float32) if name in ("scales", "biases") else value
        for name, value in module.parameters().items()
    }


@pytest.mark.skipif(not (ON_CPU and NATIVE), reason=f"native: {native_kernel.fallback_reason()}")
@pytest.mark.parametrize("gemm", [False, True], ids=["kernel", "gemm"])
def test_scales_read_in_place_give_the_logits_of_float32_scales(make_checkpoint, monkeypatch, gemm):
    """Float32 compute keeps the 4-bit layers' bf16 scales for the native kernel; the prefill
    paths, the embedding lookup and the other bit widths cast them per call: bit for bit the
    logits of scales cast at load. 6-bit layers (mixed_4_6) are cast at load."""
    monkeypatch.setattr(cpu_quantized, "openblas_active", lambda: OPENBLAS if gemm else None)
    model_dir = make_checkpoint(dtype="bfloat16", **SHAPES)  # tied: the embedding is the head
    spec = QuantSpec(bits=4, recipe="mixed_4_6")
    kept, _ = load_model(model_dir, quantize_on_load=spec, compute_dtype="float32")
    assert kept.layers[0].self_attn.q_proj.scales.dtype == mx.bfloat16
    assert kept.layers[0].mlp.down_proj.scales.dtype == mx.float32  # 6-bit: MLX's kernel
    assert kept.model.embed_tokens.scales.dtype == mx.float32  # 6-bit in mixed_4_6
    kept_4bit, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32")
    assert kept_4bit.model.embed_tokens.biases.dtype == mx.bfloat16
    for model in (kept, kept_4bit):
        cast, _ = load_model(model_dir, quantize_on_load=spec if model is kept else 4)
        for _, module in cast.named_modules():
            if isinstance(module, (CpuQuantizedLinear, CpuQuantizedEmbedding)):
                module.update(_float32_scales(module))
        ids = mx.array(np.random.default_rng(6).integers(0, 512, (1, 20)))
        cache, cast_cache = make_cache(model), make_cache(cast)
        actual = [model(ids, cache=cache), model(ids[:, :1], cache=cache)]
        expected = [cast(ids, cache=cast_cache), cast(ids[:, :1], cache=cast_cache)]
        for mine, theirs in zip(actual, expected, strict=True):
            assert mine.dtype == mx.float32
            assert mx.array_equal(mine, theirs).item()


def test_checkpoint_keys_are_kept(make_checkpoint):
    model_dir = make_checkpoint(dtype="bfloat16", **SHAPES)
    model, _ = load_model(model_dir, quantize_on_load=4)
    names = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(model.parameters())}
    dense_names = {name.rsplit(".", 1)[0] for name in read_weights(model_dir)}
    assert names == dense_names
    if ON_CPU:
        assert type(model.layers[1].self_attn.o_proj) is CpuQuantizedLinear


@pytest.mark.skipif(not NATIVE, reason="native kernel not built")
@pytest.mark.parametrize("scales_dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_the_native_embedding_lookup_is_mlxs_dequantize_bit_for_bit(
    monkeypatch, scales_dtype, group_size
):
    """One node per lookup (a decode step's first), whatever the ids' shape, dtype and strides."""
    table = mx.random.normal((300, 256), key=mx.random.key(3)).astype(scales_dtype)
    embedding = CpuQuantizedEmbedding.from_quantized(
        nn.QuantizedEmbedding.from_embedding(_embedding(table), group_size=group_size, bits=4)
    )
    embedding.compute_dtype = mx.float32
    ids = [
        mx.array([[7]], dtype=mx.uint32),
        mx.array([[0, 299, 5, 5]]),  # int32: cast first
        mx.array([[1, 2], [3, 4]], dtype=mx.uint32).T,  # a strided view
    ]
    native_rows = [embedding(i) for i in ids]
    assert "Qwen3EmbeddingRows" in _primitives(native_rows[0])
    with monkeypatch.context() as patch:
        patch.setattr(cpu_quantized, "_native_rows", lambda layer: None)
        for index, rows in zip(ids, native_rows, strict=True):
            assert mx.array_equal(rows, embedding(index)).item()
    past = native_kernel.native().embedding_rows(
        mx.array([300], dtype=mx.uint32), *(embedding[k] for k in ("weight", "scales", "biases")),
        group_size,
    )  # fmt: skip
    assert not mx.any(past).item()  # no row there: zeros, never memory past the table


def _embedding(table: mx.array) -> nn.Embedding:
    layer = nn.Embedding(*table.shape)
    layer.weight = table
    return layer


def _primitives(output: mx.array) -> str:
    import io

    dot = io.StringIO()
    mx.export_to_dot(dot, output)
    return dot.getvalue()
