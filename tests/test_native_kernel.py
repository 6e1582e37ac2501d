"""The native 4-bit matmul (qwen3_mlx.cpu.native): within float32 rounding of a float64
reference and of mx.quantized_matmul, for 1-8 rows of x (the mat-vec), more (the prefill matmul,
odd shapes, every ISA), the Qwen3-4B projections and the
151,936-row head, scales in float32, bfloat16 and float16, group sizes 32/64/128, strided and 3-D
x, and each instruction set forced once; the opt-in int8 variant within the rounding of x and the
4-bit logit tolerance; the fallback when it is missing or built for another mlx."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import qwen3_mlx.cpu.native as native_kernel
from qwen3_mlx.cpu.native import quantized_matmul

pytestmark = pytest.mark.usefixtures("float32_x")  # float32 parity; int8 tests set theirs

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
    ours = quantized_matmul(x, *layer, group_size, threads)
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
    check(mx.random.normal((2, 24, 1024))[:, ::2, ::2], layer, 64)  # 24 strided rows: the matmul


@NATIVE_SKIP
def test_float32_x_goes_in_without_a_contiguous_node():
    """The kernel copies a strided float32 x itself, so a decode step's graph holds no
    Contiguous node per projection (each node costs more to build and run than its copy)."""
    import io

    layer = random_layer(64, 512)
    for x in (mx.random.normal((1, 512)), mx.random.normal((3, 1024))[:, ::2]):
        dot = io.StringIO()
        mx.export_to_dot(dot, quantized_matmul(x, *layer, 64, 2))
        assert "Contiguous" not in dot.getvalue() and "QuantizedMatvecs" in dot.getvalue()


@NATIVE_SKIP
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_each_instruction_set(monkeypatch, isa):
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        for group_size in (32, 64, 128):
            layer = random_layer(150, 1536, dtype, group_size)
            check(mx.random.normal((5, 1536)), layer, group_size, threads=1)


@NATIVE_SKIP
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_prefill_matmul_odd_shapes_each_instruction_set(monkeypatch, isa):
    """More than 8 rows take the tiled matmul: row counts, widths and heights that fill no tile
    evenly (12 x 32 for AVX-512, 6 x 16 for AVX2, 4 x 16 portable), widths past one 256 block."""
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    cases = [
        (9, 96, 33, 32, mx.float32),
        (13, 320, 70, 64, mx.bfloat16),
        (29, 640, 17, 128, mx.float16),
    ]
    for seed, (M, K, N, group_size, dtype) in enumerate(cases):
        layer = random_layer(N, K, dtype, group_size, seed=seed)
        check(mx.random.normal((M, K), key=mx.random.key(seed)), layer, group_size)


@NATIVE_SKIP
@pytest.mark.parametrize(("width", "rows"), [(2560, 1024), (9728, 2560)], ids=str)
def test_prefill_matmul_qwen3_4b_shapes(width, rows):
    """A 520-row prefill chunk (more than one block of 512 rows) at 4B shapes."""
    layer = random_layer(rows, width, mx.bfloat16)
    check(mx.random.normal((1, 520, width)), layer, 64, np.arange(0, rows, 61))


@NATIVE_SKIP
def test_prefill_matmul_tied_head():
    layer = random_layer(HEAD_ROWS, 256, mx.bfloat16)  # every panel of the head, a short K
    check(mx.random.normal((11, 256)), layer, 64, np.arange(0, HEAD_ROWS, 89))


@NATIVE_SKIP
def test_threads_give_the_same_result():
    layer = random_layer(1000, 1024)
    for x in (mx.random.normal((2, 1024)), mx.random.normal((20, 1024))):  # mat-vec, matmul
        one = quantized_matmul(x, *layer, 64, 1)
        for threads in (2, 3, 8):
            assert mx.array_equal(quantized_matmul(x, *layer, 64, threads), one).item()


@NATIVE_SKIP
def test_bad_shapes_raise():
    words, scales, biases = random_layer(8, 256)
    with pytest.raises(ValueError):
        quantized_matmul(mx.zeros((1, 128)), words, scales, biases, 64, 1)
    with pytest.raises(ValueError):
        quantized_matmul(mx.zeros((1, 256)), words, scales, biases.astype(mx.float16), 64, 1)


@NATIVE_SKIP
@pytest.mark.parametrize("M", [1, 3])
def test_several_matrices_in_one_call_equal_separate_calls(M):
    """quantized_matmuls (a layer's q/k/v or gate/up at once) is bit for bit quantized_matmul per
    matrix, whatever each matrix's scale dtype and row count."""
    layers = [
        random_layer(2048, 1024, mx.bfloat16, seed=1),
        random_layer(1000, 1024, mx.float32, seed=2),
        random_layer(24, 1024, mx.float16, seed=3),
    ]
    x = mx.random.normal((M, 1, 1024), key=mx.random.key(4))
    together = native_kernel.quantized_matmuls(x, layers, 64, 2)
    for out, layer in zip(together, layers, strict=True):
        expected = quantized_matmul(x, *layer, 64, 2)
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert mx.array_equal(out, expected).item()
    module = native_kernel.native()
    with pytest.raises(ValueError, match="one or more matrices"):
        module.quantized_matmuls(x, [layers[0][0]], [], [], 64, 1)
    with pytest.raises(ValueError, match="scales and biases"):
        module.quantized_matmuls(x, [layers[0][0]], [layers[0][1]], [layers[1][2]], 64, 1)


@NATIVE_SKIP
def test_project_joins_native_layers_and_keeps_every_other(monkeypatch):
    """cpu_quantized.project gives each layer's own output: one native call for CPU 4-bit layers
    (a decode step or a prefill), the layers one by one where one is of another kind."""
    import mlx.nn as nn

    from qwen3_mlx.cpu import quantized as cpu_quantized

    def layer(rows: int, seed: int) -> nn.Module:
        linear = nn.Linear(512, rows, bias=False)
        linear.weight = mx.random.normal((rows, 512), key=mx.random.key(seed)) * 0.05
        return cpu_quantized.CpuQuantizedLinear.from_quantized(
            nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
        )

    layers = [layer(256, 1), layer(128, 2), layer(128, 3)]
    calls = []
    joined = native_kernel.quantized_matmuls
    monkeypatch.setattr(
        native_kernel, "quantized_matmuls", lambda *a: calls.append(1) or joined(*a)
    )
    x = mx.random.normal((1, 1, 512), key=mx.random.key(5))
    for out, one in zip(cpu_quantized.project(x, *layers), layers, strict=True):
        assert mx.array_equal(out, one(x)).item()
    assert calls == [1]
    prefill = mx.random.normal((1, 16, 512), key=mx.random.key(6))
    dense = nn.Linear(512, 64, bias=False)
    for inputs, group in ((prefill, layers), (x, [layers[0], dense])):
        for out, one in zip(cpu_quantized.project(inputs, *group), group, strict=True):
            assert mx.array_equal(out, one(inputs)).item()
    assert calls == [1, 1]


# The 4-bit logit tolerance bfloat16 compute is held to (BF16_QUANTIZED_RELATIVE_TOLERANCE in
# tests/test_compute_dtype.py); measured here 0.034 of the largest logit, bf16 compute 0.031.
INT8_RELATIVE_TOLERANCE = 0.06


def int8_or_skip(monkeypatch) -> None:
    """Turn the int8 variant on, or skip where the CPU has no AVX-512 VNNI."""
    monkeypatch.setenv(native_kernel.INT8_ENV, "1")
    if not native_kernel.native().int8_supported():
        pytest.skip("the int8 variant needs AVX-512 VNNI")


@NATIVE_SKIP
def test_load_self_test_runs_the_float_kernel_whatever_int8_says(monkeypatch):
    int8_or_skip(monkeypatch)
    assert native_kernel._self_test(native_kernel.native()) is None
    layer, x = random_layer(64, 512), mx.random.normal((1, 512))
    float_kernel = native_kernel.native().quantized_matmul(x, *layer, 64, 1)
    assert not mx.array_equal(quantized_matmul(x, *layer, 64, 1), float_kernel).item()


@NATIVE_SKIP
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int8_variant_within_the_rounding_of_x(monkeypatch, dtype, group_size):
    """QWEN3_MLX_NATIVE_INT8=1: x rounded to int8 per block of 32 (step max|x|/127) is its only
    error: within half a step per element of the float64 result, plus float32 rounding."""
    int8_or_skip(monkeypatch)
    layer = random_layer(150, 1536, dtype, group_size, seed=group_size)
    for rows in (1, 3, 5):
        x = mx.random.normal((rows, 1536), key=mx.random.key(rows))
        actual = np.array(quantized_matmul(x, *layer, group_size, 2)).astype(np.float64)
        x64 = np.array(x).astype(np.float64)
        weight = dequantized64(layer, group_size)
        biases = np.repeat(np.array(layer[2].astype(mx.float32)), group_size, axis=1)
        half_step = np.repeat(np.abs(x64).reshape(rows, -1, 32).max(-1) / 127 / 2, 32, axis=1)
        bound = half_step @ np.abs(weight - biases).T * 1.01
        bound += 2e-6 * (np.abs(x64) @ np.abs(weight).T)
        assert np.all(np.abs(actual - x64 @ weight.T) <= bound)


@NATIVE_SKIP
@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the native kernel is for the CPU")
def test_int8_variant_logits_within_the_4bit_tolerance(make_checkpoint, monkeypatch):
    """A 4-bit model decoding token by token: the int8 variant against the float kernel, within
    the tolerance bfloat16 compute has against float32 (tests/test_compute_dtype.py)."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.loading import load_model

    int8_or_skip(monkeypatch)
    shapes = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # test_compute_dtype's
    model_dir = make_checkpoint(dtype="float32", tie_word_embeddings=False, **shapes)
    model, _ = load_model(model_dir, quantize_on_load=4)
    ids = np.random.default_rng(8).integers(0, 512, 24)
    logits = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(native_kernel.INT8_ENV, switch)
        cache = make_cache(model)
        steps = [model(mx.array([[int(token)]]), cache=cache) for token in ids]
        logits[switch] = np.array(mx.concatenate(steps, axis=1))[0]
    scale = float(np.abs(logits["0"]).max())
    diff = float(np.abs(logits["1"] - logits["0"]).max())
    agree = float((logits["1"].argmax(-1) == logits["0"].argmax(-1)).mean())
    print(f"\n[int8 x] vs float kernel: {diff:.3g} (scale {scale:.3g}), top-1 agree {agree:.2f}")
    assert 0 < diff < INT8_RELATIVE_TOLERANCE * scale
    assert agree >= 0.9


@NATIVE_SKIP
@pytest.mark.parametrize("kernel", ["avx512", "avx512-int8", "avx2"])
def test_each_row_of_x_is_bit_for_bit_its_one_row_result(monkeypatch, kernel):
    """Every tile the mat-vec uses (AVX-512: 8 rows of w for one row of x, 4 for more; AVX2: 4;
    both in blocks of 1-3 rows of x, and one row of w at a time for the matrix's last rows) gives
    each row of x exactly what a one-row call gives it, for every scale dtype and group size: a
    speculative verify pass relies on it."""
    isa, _, int8 = kernel.partition("-")
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    if int8:
        int8_or_skip(monkeypatch)
    else:
        monkeypatch.delenv(native_kernel.INT8_ENV, raising=False)
    x = mx.random.normal((8, 640), key=mx.random.key(4))
    for dtype in (mx.float32, mx.bfloat16, mx.float16):
        for group_size in (32, 64, 128):
            # 333 rows: chunks end mid-tile; 6 rows: less than one AVX-512 tile, 4 + 2 for AVX2
            for rows_of_w in (333, 6):
                layer = random_layer(rows_of_w, 640, dtype, group_size, seed=3)
                together = np.array(quantized_matmul(x, *layer, group_size, 2))
                alone = [
                    np.array(quantized_matmul(x[i : i + 1], *layer, group_size, 2))
                    for i in range(8)
                ]
                assert np.array_equal(np.concatenate(alone), together)
                for rows in range(2, 8):
                    part = quantized_matmul(x[:rows], *layer, group_size, 1)
                    assert np.array_equal(np.array(part), together[:rows])


def test_fallback_reasons(monkeypatch):
    monkeypatch.delenv(native_kernel.ENV, raising=False)
    monkeypatch.setattr(native_kernel, "module_name", lambda: "_native_mlx_0_0_1")
    module, reason = native_kernel._load()
    # another mlx's module is never imported (or, where none was built, that is the reason)
    assert module is None and ("built for another mlx" in reason or "not built" in reason)
    monkeypatch.setenv(native_kernel.ENV, "0")
    assert native_kernel._load() == (None, f"{native_kernel.ENV}=0")


def test_cli_warns_of_the_fallback_only_under_debug(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from qwen3_mlx.cli.app import app

    monkeypatch.setattr(native_kernel, "_loaded", (None, "it was not built"))
    monkeypatch.setattr(native_kernel, "_checked", {})  # nothing checked now stays unavailable
    runner = CliRunner()
    quiet = runner.invoke(app, ["info", str(tmp_path / "missing")])
    loud = runner.invoke(app, ["--debug", "info", str(tmp_path / "missing")])
    warning = "Warning: native 4-bit kernel not used: it was not built"
    assert warning not in quiet.stderr
    assert loud.stderr.splitlines()[0] == warning
