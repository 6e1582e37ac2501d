"""The opt-in int8 prefill matmul (QWEN3_MLX_NATIVE_INT8_PREFILL=1, AVX-512 VNNI): exactly x rounded
to int8 per block of 32 times the 4-bit weights, to float32 rounding, on shapes that fill no tile;
off by default, ignored by the mat-vec and where the CPU or the chosen ISA has no VNNI; a model's
logits within the 4-bit tolerance."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_native_kernel import INT8_RELATIVE_TOLERANCE, NATIVE_SKIP, dequantized64, random_layer

import qwen3_mlx.cpu.native as native_kernel
from qwen3_mlx.cpu.native import quantized_matmul

# (M, K, N, group size, scale dtype): rows past a 6-row tile and past one 516-row block, widths
# past a 256 block, and heights that leave a panel's second 16 columns partly or wholly empty.
CASES = [
    (9, 1408, 50, 128, mx.float32),
    (37, 320, 13, 64, mx.bfloat16),
    (13, 96, 33, 32, mx.float16),
    (530, 256, 40, 64, mx.bfloat16),
]


def int8_prefill_or_skip(monkeypatch) -> None:
    """Turn the int8 prefill on, or skip where the CPU has no AVX-512 VNNI."""
    monkeypatch.setenv(native_kernel.INT8_PREFILL_ENV, "1")
    if not native_kernel.native().int8_supported():
        pytest.skip("the int8 prefill matmul needs AVX-512 VNNI")


def rounded_product(x: mx.array, layer, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """In float64: x rounded as the kernel rounds it (per block of 32, step max|x| / 127 in
    float32, x * (127 / max|x|) to the nearest even integer) times the weights without their
    biases, plus the biases times the exact sums of x; and a bound of float32 rounding."""
    x32 = np.array(x, dtype=np.float32).reshape(-1, x.shape[-1])
    blocks = x32.reshape(x32.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    step = amax / np.float32(127)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0))
    rounded = (np.rint(blocks * inverse.astype(np.float32)) * step).astype(np.float64)
    rounded = rounded.reshape(x32.shape)
    weight = dequantized64(layer, group_size)
    biases = np.repeat(np.array(layer[2].astype(mx.float32)), group_size, axis=1).astype(np.float64)
    x64 = x32.astype(np.float64)
    expected = rounded @ (weight - biases).T + x64 @ biases.T
    bound = 2e-6 * (np.abs(rounded) @ np.abs(weight - biases).T + np.abs(x64) @ np.abs(biases).T)
    return expected, bound + 1e-30


@NATIVE_SKIP
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-g{c[3]}")
def test_int8_prefill_is_x_rounded_per_block_of_32(monkeypatch, case):
    M, K, N, group_size, dtype = case
    int8_prefill_or_skip(monkeypatch)
    layer = random_layer(N, K, dtype, group_size, seed=M)
    x = mx.random.normal((M, K), key=mx.random.key(M)) * mx.linspace(0.01, 4, M)[:, None]
    x = mx.where(mx.arange(K) < 32, 0.0, x) if M == 37 else x  # an all-zero block: step 0
    expected, bound = rounded_product(x, layer, group_size)
    for threads in (1, 2):
        actual = np.array(quantized_matmul(x, *layer, group_size, threads)).astype(np.float64)
        assert np.all(np.abs(actual - expected) <= bound), np.max(np.abs(actual - expected) / bound)


def vnni_or_skip() -> None:
    """Skip where the CPU has no AVX-512 VNNI (x then stays float32)."""
    if not native_kernel.native().int8_supported():
        pytest.skip("the int8 kernels need AVX-512 VNNI")


@NATIVE_SKIP
@pytest.mark.parametrize("rows", [3, 20])
def test_int8_is_the_default_and_each_switch_rules_its_rows(monkeypatch, rows):
    """Unset, x is rounded to int8 for the mat-vec (8 rows or fewer) and the prefill matmul
    (more); QWEN3_MLX_NATIVE_INT8=0 keeps the mat-vec's x float32, QWEN3_MLX_NATIVE_INT8_PREFILL=0
    the matmul's, and each leaves the other's rows alone."""
    vnni_or_skip()
    layer = random_layer(64, 512)
    x = mx.random.normal((rows, 512), key=mx.random.key(rows))
    float_kernel = native_kernel.native().quantized_matmul(x, *layer, 64, 1, False)
    matvec = rows <= native_kernel.MATVEC_ROWS
    own, other = (
        (native_kernel.INT8_ENV, native_kernel.INT8_PREFILL_ENV)
        if matvec
        else (native_kernel.INT8_PREFILL_ENV, native_kernel.INT8_ENV)
    )
    for name in (own, other):
        monkeypatch.delenv(name, raising=False)
    assert not mx.array_equal(quantized_matmul(x, *layer, 64, 1), float_kernel).item()
    monkeypatch.setenv(other, "0")
    assert not mx.array_equal(quantized_matmul(x, *layer, 64, 1), float_kernel).item()
    monkeypatch.setenv(own, "0")
    assert mx.array_equal(quantized_matmul(x, *layer, 64, 1), float_kernel).item()
    reason = native_kernel.int8_decode_reason() if matvec else native_kernel.int8_prefill_reason()
    assert reason == f"{own}=0"


@NATIVE_SKIP
def test_int8_that_fails_its_self_test_keeps_float32(monkeypatch):
    """The int8 default is self-tested once, like every op: a failure keeps float32 x for the
    matmul and the mat-vec, and says why."""
    vnni_or_skip()
    monkeypatch.delenv(native_kernel.INT8_PREFILL_ENV, raising=False)
    real_self_test = native_kernel._int8_self_test
    monkeypatch.setattr(native_kernel, "_checked", {})
    monkeypatch.setattr(native_kernel, "_int8_self_test", lambda module: "it drifted")
    layer = random_layer(64, 512)
    x = mx.random.normal((20, 512))
    float_kernel = native_kernel.native().quantized_matmul(x, *layer, 64, 1, False)
    assert mx.array_equal(quantized_matmul(x, *layer, 64, 1), float_kernel).item()
    assert native_kernel.int8_prefill_reason() == native_kernel.int8_decode_reason() == "it drifted"
    assert real_self_test(native_kernel.native()) is None  # and the real one passes here


@NATIVE_SKIP
def test_int8_default_keeps_the_tiny_models_greedy_tokens(monkeypatch):
    """The shipped tiny model, 4-bit, prompts longer than 8 tokens: with int8 x in prefill and
    decode (the default) greedy tokens equal those of MLX's kernels throughout, and logits stay
    within the 4-bit tolerance (float32 x is held to 1e-4 of them in test_cpu_quantized.py)."""
    from test_cpu_quantized import tiny_greedy_native_and_off

    vnni_or_skip()
    monkeypatch.delenv(native_kernel.INT8_PREFILL_ENV, raising=False)
    monkeypatch.delenv(native_kernel.INT8_ENV, raising=False)
    assert (
        native_kernel.int8_prefill_reason() is None and native_kernel.int8_decode_reason() is None
    )
    with_int8, logits, without, expected = tiny_greedy_native_and_off(monkeypatch)
    assert with_int8 == without
    scale = np.abs(expected).max()
    assert 0 < np.abs(logits - expected).max() < INT8_RELATIVE_TOLERANCE * scale


@NATIVE_SKIP
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_int8_prefill_asked_without_vnni_runs_the_float_kernel(monkeypatch, isa):
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    monkeypatch.setenv(native_kernel.INT8_PREFILL_ENV, "1")
    layer = random_layer(40, 320, mx.bfloat16)
    x = mx.random.normal((21, 320))
    float_kernel = native_kernel.native().quantized_matmul(x, *layer, 64, 2, False)
    assert mx.array_equal(quantized_matmul(x, *layer, 64, 2), float_kernel).item()


@NATIVE_SKIP
@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the native kernel is for the CPU")
def test_int8_prefill_logits_within_the_4bit_tolerance(make_checkpoint, monkeypatch):
    """A 4-bit model's logits at every position of a 40-token prompt (one prefill chunk): the
    int8 prefill against the float32 one, within the tolerance bf16 compute has."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.loading import load_model

    int8_prefill_or_skip(monkeypatch)
    shapes = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}  # test_compute_dtype's
    model_dir = make_checkpoint(dtype="float32", tie_word_embeddings=False, **shapes)
    model, _ = load_model(model_dir, quantize_on_load=4)
    ids = mx.array(np.random.default_rng(8).integers(0, 512, (1, 40)))
    logits = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(native_kernel.INT8_PREFILL_ENV, switch)
        logits[switch] = np.array(model(ids, cache=make_cache(model)))[0]
    scale = float(np.abs(logits["0"]).max())
    diff = float(np.abs(logits["1"] - logits["0"]).max())
    agree = float((logits["1"].argmax(-1) == logits["0"].argmax(-1)).mean())
    print(f"\n[int8 prefill] vs float32: {diff:.3g} (scale {scale:.3g}), top-1 agree {agree:.2f}")
    assert 0 < diff < INT8_RELATIVE_TOLERANCE * scale
    assert agree >= 0.9


@NATIVE_SKIP
def test_info_says_how_x_is_rounded(monkeypatch):
    """`info`'s CPU kernels row for a 4-bit checkpoint in float32 names the precision of x in
    prefill and decode; other checkpoints and compute dtypes have no such row."""
    from qwen3_mlx.model_facts import _cpu_kernels

    vnni_or_skip()
    four_bit = {"method": "mlx-affine", "bits": 4, "group_size": 64, "overrides": 0}
    monkeypatch.delenv(native_kernel.INT8_PREFILL_ENV, raising=False)
    monkeypatch.delenv(native_kernel.INT8_ENV, raising=False)
    text = _cpu_kernels(four_bit, "float32")
    assert (
        text == "native, avx512: prefill x rounded to int8 (VNNI), decode x rounded to int8 (VNNI)"
    )
    monkeypatch.setenv(native_kernel.INT8_PREFILL_ENV, "0")
    monkeypatch.setenv(native_kernel.INT8_ENV, "0")
    assert _cpu_kernels(four_bit, "float32") == (
        "native, avx512: prefill x in float32 (QWEN3_MLX_NATIVE_INT8_PREFILL=0), "
        "decode x in float32 (QWEN3_MLX_NATIVE_INT8=0)"
    )
    assert _cpu_kernels(four_bit, None) is None and _cpu_kernels(None, "float32") is None
