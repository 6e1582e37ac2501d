"""The bf16-weight kernels (qwen3_mlx.cpu.dense): within float32 rounding of a float64 reference
and of MLX's matmul over the widened weights, for 1-8 rows (the mat-vec), more (the matmul), odd
shapes and every instruction set this CPU runs; a row bit for bit the same in a batch of up to 8
as alone; a bf16 (or FP8) checkpoint under float32 compute kept bf16 in memory, never widened to a
float32 copy; the tiny bf16 model's greedy tokens the same with the kernels on and off."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import qwen3_mlx.cpu.dense as dense
from qwen3_mlx.loading import load_model
from qwen3_mlx.model_facts import dense_weights_read_in_place, weight_bytes
from qwen3_mlx.safetensors_check import tensor_headers, weight_files

ON_CPU = mx.default_device() == mx.cpu
NATIVE = dense.native_dense() if ON_CPU else None
NATIVE_SKIP = pytest.mark.skipif(NATIVE is None, reason="the native bf16 matmul is not in use")
ISAS = ["avx512", "avx2", "scalar"]


def random_case(rows: int, K: int, N: int, seed: int) -> tuple[mx.array, mx.array]:
    """Random float32 x [rows, K] and a bf16 weight [N, K]."""
    key = mx.random.key(seed)
    x = mx.random.normal((rows, K), key=key)
    weight = mx.random.normal((N, K), key=mx.random.split(key)[0]).astype(mx.bfloat16)
    return x, weight


def check(x: mx.array, weight: mx.array) -> None:
    """Ours against float64 (to float32 rounding) and against MLX's matmul."""
    ours = NATIVE.dense_matmul(x, weight, 2)
    assert ours.shape == (*x.shape[:-1], weight.shape[0]) and ours.dtype == mx.float32
    x64 = np.array(x).astype(np.float64).reshape(-1, x.shape[-1])
    w64 = np.array(weight.astype(mx.float32)).astype(np.float64)
    exact = x64 @ w64.T
    # float32 sums of K products: |error| <= K eps sum|x w| (a loose form of the usual bound).
    bound = x.shape[-1] * 2**-24 * (np.abs(x64) @ np.abs(w64).T)
    actual = np.array(ours).reshape(exact.shape)
    assert np.all(np.abs(actual - exact) <= bound)
    mlx = np.array(x @ weight.astype(mx.float32).T).reshape(exact.shape)
    np.testing.assert_allclose(actual, mlx, rtol=0, atol=2 * float(bound.max()))


@NATIVE_SKIP
@pytest.mark.parametrize("isa", ISAS)
def test_kernels_on_every_isa(monkeypatch, isa):
    """Mat-vec (1-8 rows) and matmul (9+, across a 512-row block and a 256-column one), widths that
    fit the vector steps and widths that do not (a narrower ISA then takes over)."""
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", isa)
    cases = [(1, 1024, 77), (3, 96, 37), (8, 320, 64), (9, 300, 50), (11, 77, 20), (37, 544, 33)]
    cases.append((515, 64, 35))
    for seed, (rows, K, N) in enumerate(cases):
        check(*random_case(rows, K, N, seed))


@NATIVE_SKIP
def test_strided_3d_x_and_several_weights():
    x, weight = random_case(6, 128, 40, 1)
    check(x.reshape(2, 3, 128), weight)
    check(mx.random.normal((128, 12)).T, weight)  # a transposed (non-contiguous) x
    check(mx.random.normal((128, 3)).T, weight)  # the same for the mat-vec's few rows
    other = random_case(1, 128, 24, 2)[1]
    parts = NATIVE.dense_matmuls(x, [weight, other], 2)
    np.testing.assert_array_equal(np.array(parts[0]), np.array(NATIVE.dense_matmul(x, weight, 2)))
    np.testing.assert_array_equal(np.array(parts[1]), np.array(NATIVE.dense_matmul(x, other, 2)))


@NATIVE_SKIP
def test_a_row_is_the_same_alone_and_in_a_batch_of_up_to_8():
    """A speculative verify (up to 8 rows) gives each row what a one-row decode step gives."""
    x, weight = random_case(8, 256, 100, 3)
    batch = np.array(NATIVE.dense_matmul(x, weight, 2))
    for row in range(8):
        alone = np.array(NATIVE.dense_matmul(x[row : row + 1], weight, 2))[0]
        np.testing.assert_array_equal(alone, batch[row])


@NATIVE_SKIP
def test_refuses_what_it_cannot_take():
    x, weight = random_case(2, 64, 8, 4)
    with pytest.raises(ValueError, match="bfloat16"):
        NATIVE.dense_matmul(x, weight.astype(mx.float32))
    with pytest.raises(ValueError, match="last axis"):
        NATIVE.dense_matmul(x[:, :32], weight)
    with pytest.raises(ValueError, match="float32"):
        NATIVE.dense_matmul(x.astype(mx.bfloat16), weight)


def matrices(model) -> dict[str, mx.array]:
    """Every 2-D parameter (the projections and the embedding)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if v.ndim == 2}


@NATIVE_SKIP
def test_a_bf16_checkpoint_stays_bf16_in_memory(make_checkpoint):
    """Float32 compute (the CPU default) widens the norms only: every matrix stays bf16, so the
    loaded model takes the checkpoint's bytes, not twice them."""
    model_dir = make_checkpoint(hidden_size=128, intermediate_size=256, head_dim=32)
    model, _ = load_model(model_dir)
    weights = matrices(model)
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    norms = [v for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    assert {v.dtype for v in norms} == {mx.float32}
    on_disk = (model_dir / "model.safetensors").stat().st_size
    in_memory = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert sum(v.nbytes for v in weights.values()) <= on_disk
    # `info` says the same (qwen3_mlx.model_facts).
    entries = tensor_headers(weight_files(model_dir))
    kept = dense_weights_read_in_place(entries, "float32")
    assert weight_bytes(entries, "float32", kept)[1] == in_memory
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.dtype == mx.float32
    # The same logits as the float32 copy the loader used to make, to float32 rounding.
    widened, _ = load_model(model_dir)
    widened.update(tree_map(lambda v: v.astype(mx.float32), widened.parameters()))  # MLX's matmul
    expected = np.array(widened(mx.array([[1, 2, 3]])))
    np.testing.assert_allclose(np.array(logits), expected, rtol=0, atol=1e-4)


def test_tiny_bf16_model_greedy_tokens_with_and_without_the_kernels(monkeypatch):
    """The shipped tiny model (bf16): the prompt (more than 8 tokens) takes the matmul and each step
    the mat-vec; with the kernels off every layer runs MLX's matmul over the widened weights."""
    if NATIVE is None:
        pytest.skip("the native bf16 matmul is not in use")
    from greedy import greedy_decode

    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(Path(__file__).resolve().parents[1] / "models" / "qwen3-tiny-chat")
    assert model.layers[0].mlp.down_proj.weight.dtype == mx.bfloat16
    rows = []

    class Counting:  # the extension, counting the rows of x each call takes
        def __getattr__(self, name):
            def call(x, *rest):
                rows.append(x.size // x.shape[-1])
                return getattr(NATIVE, name)(x, *rest)

            return call

    monkeypatch.setattr(dense, "native_dense", lambda: Counting())
    with_kernels, logits = greedy_decode(model, tokenizer, None, repeats=3, steps=12)
    assert max(rows) > 8 and min(rows) == 1
    monkeypatch.setattr(dense, "native_dense", lambda: None)
    without, expected = greedy_decode(model, tokenizer, None, repeats=3, steps=12)
    assert with_kernels == without
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.skipif(
    NATIVE is None or not NATIVE.dense_bf16_supported(), reason="no AVX512-BF16 here"
)
def test_the_opt_in_bf16_dot_rounds_only_x():
    """bf16=True (QWEN3_MLX_NATIVE_DENSE_BF16=1): within float32 rounding of the product with x
    rounded to bf16, so within about 2^-9 of sum |x w| of the exact one; more rows the exact matmul."""
    for rows, K, N in [(1, 1024, 77), (8, 320, 64)]:
        x, weight = random_case(rows, K, N, 5)
        ours = np.array(NATIVE.dense_matmul(x, weight, 2, True)).astype(np.float64)
        w64 = np.array(weight.astype(mx.float32)).astype(np.float64)
        rounded = np.array(x.astype(mx.bfloat16).astype(mx.float32)).astype(np.float64) @ w64.T
        size = np.abs(np.array(x)).astype(np.float64) @ np.abs(w64).T
        assert np.all(np.abs(ours - rounded) <= K * 2**-24 * size)
        exact = np.array(x).astype(np.float64) @ w64.T
        drift = float((np.abs(ours - exact) / size).max())
        print(f"\n[dense bf16 dot] {rows} row(s), K={K}: drift {drift:.2g} of sum |x w|")
        assert 0 < drift <= 2**-8
    x, weight = random_case(9, 64, 16, 6)  # the matmul stays exact
    exact = np.array(NATIVE.dense_matmul(x, weight, 2))
    np.testing.assert_array_equal(np.array(NATIVE.dense_matmul(x, weight, 2, True)), exact)
