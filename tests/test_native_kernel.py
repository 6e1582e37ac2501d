"""The native 4-bit mat-vec (qwen3_mlx.native_kernel): within float32 rounding of a float64
reference and of mx.quantized_matmul, for 1-8 rows of x, the Qwen3-4B projections and the
151,936-row head, scales in float32, bfloat16 and float16, group sizes 32/64/128, strided and 3-D
x, and each instruction set forced once; the fallback when it is missing or built for another mlx."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qwen3_mlx.native_kernel as native_kernel
from qwen3_mlx.native_kernel import quantized_matvec

NATIVE_SKIP = pytest.mark.skipif(
    native_kernel.native() is None,
    reason=f"native kernel not in use: {native_kernel.fallback_reason()}",
)


HIDDEN, HEAD_ROWS = 2560, 151_936
# Qwen3-4B: q, k/v, o, gate/up, down (K -> N)
PROJECTIONS = [(2560, 4096), (2560, 1024), (4096, 2560), (2560, 9728), (9728, 2560)]


def random_layer(
    rows: int, width: int, dtype: mx.Dtype = mx.float32, group_size: int = 64, seed: int = 0
) -> tuple[mx.array, mx.array, mx.array]:
    """Packed 4-bit words with every nibble random, and random scales and biases in dtype."""
    key = mx.random.key(seed)
    words = mx.random.randint(0, 2**31, (rows, width // 8), key=key).astype(mx.uint32)
    words = words ^ (words << 1)  # the top bit random too
    groups = (rows, width // group_size)
    scales = (mx.random.uniform(0.001, 0.02, groups, key=mx.random.split(key)[0])).astype(dtype)
    biases = (mx.random.normal(groups, key=mx.random.split(key)[1]) * 0.05).astype(dtype)
    mx.eval(words, scales, biases)
    return words, scales, biases


def dequantized64(layer, group_size: int, rows: np.ndarray | None = None) -> np.ndarray:
    """The float64 weight matrix (only `rows` of it when given)."""
    words, scales, biases = (
        np.array(a.astype(mx.float32) if a.dtype != mx.uint32 else a) for a in layer
    )
    if rows is not None:
        words, scales, biases = words[rows], scales[rows], biases[rows]
    nibbles = (words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    q = nibbles.reshape(words.shape[0], -1).astype(np.float64)
    expand = np.repeat(np.arange(scales.shape[1]), group_size)
    return q * scales.astype(np.float64)[:, expand] + biases.astype(np.float64)[:, expand]


def check(x: mx.array, layer, group_size: int, rows: np.ndarray | None = None, threads: int = 2):
    """Ours against float64 (to float32 rounding) and against mx.quantized_matmul."""
    ours = quantized_matvec(x, *layer, group_size, threads)
    assert ours.shape == (*x.shape[:-1], layer[0].shape[0])
    assert ours.dtype == (mx.zeros(1, x.dtype) + mx.zeros(1, layer[1].dtype)).dtype  # as MLX's
    x64 = np.array(x.astype(mx.float32)).astype(np.float64).reshape(-1, x.shape[-1])
    weight = dequantized64(layer, group_size, rows)
    expected = x64 @ weight.T
    # float32 rounding of a sum of K products: relative to the sum of their magnitudes
    bound = 2e-6 * (np.abs(x64) @ np.abs(weight).T) + 1e-30
    actual = np.array(ours.astype(mx.float32)).reshape(expected.shape[0], -1)
    if rows is not None:
        actual = actual[:, rows]
    assert np.all(np.abs(actual - expected) <= bound), np.max(np.abs(actual - expected) / bound)
    if (
        layer[1].dtype == mx.float32 and x.dtype == mx.float32
    ):  # MLX's own accumulates in float32 too
        theirs = mx.quantized_matmul(x, *layer, transpose=True, group_size=group_size, bits=4)
        theirs = np.array(theirs).reshape(expected.shape[0], -1)
        theirs = theirs if rows is None else theirs[:, rows]
        assert np.all(np.abs(actual - theirs) <= 2 * bound)


@NATIVE_SKIP
@pytest.mark.parametrize("M", range(1, 9))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
def test_rows_and_scale_dtypes(M, dtype):
    layer = random_layer(200, 1024, dtype, seed=M)
    check(mx.random.normal((M, 1024), key=mx.random.key(M)), layer, 64)


@NATIVE_SKIP
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("width", [128, 384, 2560], ids=lambda w: f"K{w}")
def test_group_sizes_and_widths(group_size, width):
    # 384 is no multiple of the AVX-512 step (128 weights): the AVX2 kernel takes it
    layer = random_layer(77, width, mx.bfloat16, group_size)
    check(mx.random.normal((3, width)), layer, group_size)


@NATIVE_SKIP
@pytest.mark.parametrize(("width", "rows"), PROJECTIONS, ids=lambda v: str(v))
def test_qwen3_4b_projections(width, rows):
    layer = random_layer(rows, width, mx.bfloat16)
    sample = np.arange(0, rows, 7)
    check(mx.random.normal((1, width)), layer, 64, sample)
    check(mx.random.normal((4, width)), layer, 64, sample)


@NATIVE_SKIP
def test_tied_head_of_151936_rows():
    layer = random_layer(HEAD_ROWS, HIDDEN, mx.float32)
    check(mx.random.normal((1, HIDDEN)), layer, 64, np.arange(0, HEAD_ROWS, 97))


@NATIVE_SKIP
def test_strided_and_3d_x():
    layer = random_layer(96, 512)
    wide = mx.random.normal((2, 6, 1024))
    check(wide[:, ::2, ::2], layer, 64)  # non-contiguous rows and columns
    check(mx.random.normal((4, 512)).T.T[:, None, :], layer, 64)  # [4, 1, 512]
    check(mx.random.normal((2, 3, 512)).astype(mx.bfloat16), layer, 64)  # bf16 x


@NATIVE_SKIP
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_each_instruction_set(monkeypatch, isa):
    monkeypatch.setenv("QWEN3_MLX_QMV_ISA", isa)
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        for group_size in (32, 64, 128):
            layer = random_layer(150, 1536, dtype, group_size)
            check(mx.random.normal((5, 1536)), layer, group_size, threads=1)


@NATIVE_SKIP
def test_threads_give_the_same_result():
    layer = random_layer(1000, 1024)
    x = mx.random.normal((2, 1024))
    one = quantized_matvec(x, *layer, 64, 1)
    for threads in (2, 3, 8):
        assert mx.array_equal(quantized_matvec(x, *layer, 64, threads), one).item()


@NATIVE_SKIP
def test_bad_shapes_raise():
    words, scales, biases = random_layer(8, 256)
    with pytest.raises(ValueError):
        quantized_matvec(mx.zeros((1, 128)), words, scales, biases, 64, 1)
    with pytest.raises(ValueError):
        quantized_matvec(mx.zeros((1, 256)), words, scales, biases.astype(mx.float16), 64, 1)


def test_fallback_reasons(monkeypatch):
    monkeypatch.delenv(native_kernel.ENV, raising=False)
    monkeypatch.setattr(native_kernel, "module_name", lambda: "_qmv_mlx_0_0_1")
    module, reason = native_kernel._load()
    # another mlx's module is never imported (or, where none was built, that is the reason)
    assert module is None and ("built for another mlx" in reason or "not built" in reason)
    monkeypatch.setenv(native_kernel.ENV, "0")
    assert native_kernel._load() == (None, f"{native_kernel.ENV}=0")


def test_cli_warns_of_the_fallback_only_under_debug(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from qwen3_mlx.cli.app import app

    monkeypatch.setattr(native_kernel, "_loaded", (None, "it was not built"))
    runner = CliRunner()
    quiet = runner.invoke(app, ["info", str(tmp_path / "missing")])
    loud = runner.invoke(app, ["--debug", "info", str(tmp_path / "missing")])
    warning = "Warning: native 4-bit kernel not used: it was not built"
    assert warning not in quiet.stderr
    assert loud.stderr.splitlines()[0] == warning
