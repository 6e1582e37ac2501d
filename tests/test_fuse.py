"""Load-time fusion of q/k/v and gate/up (qwen3_mlx.fuse): the same logits (bit for bit with MLX's
kernels) from fewer matmuls; layers whose parts cannot be joined stay apart; the checkpoint format
is untouched."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen3_mlx.blas import openblas_active
from qwen3_mlx.cache import make_cache
from qwen3_mlx.fuse import concatenate_linears, fuse_projections, is_fused
from qwen3_mlx.loading import load, load_model, read_weights
from qwen3_mlx.quant import QuantSpec

# Wider than the default tiny config so 4-bit groups of 64 fit every projection (in = 128 or 256).
SHAPES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}


def assert_same_logits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit for bit with MLX's own kernels and the reference BLAS. OpenBLAS (when preloaded) picks its
    GEMM blocking by matrix width, so a wider fused GEMM may round differently in the last bits."""
    if openblas_active() is None:
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def logits_by_path(model, ids: mx.array) -> np.ndarray:
    """Logits of a full forward, then of a chunked + token-by-token cached run, concatenated."""
    full = model(ids)
    cache = make_cache(model)
    pieces = [model(ids[:, :9], cache=cache)]
    pieces += [model(ids[:, i : i + 1], cache=cache) for i in range(9, ids.shape[1])]
    both = mx.concatenate([full, mx.concatenate(pieces, axis=1)]).astype(
        mx.float32
    )  # exact for bf16
    return np.array(both)


@pytest.mark.parametrize(
    ("dtype", "quantize", "compute"),
    [
        ("float32", None, "float32"),
        ("bfloat16", 4, "float32"),
        ("bfloat16", 4, "checkpoint"),
        ("bfloat16", QuantSpec(8, 32), "float32"),
    ],
    ids=["float32", "4bit-float32", "4bit-bf16", "8bit-g32-float32"],
)
def test_fused_logits_equal_unfused_exactly(make_checkpoint, dtype, quantize, compute):
    model_dir = make_checkpoint(dtype=dtype, tie_word_embeddings=False, **SHAPES)
    plain, _ = load_model(model_dir, quantize_on_load=quantize, compute_dtype=compute)
    fused, _ = load_model(model_dir, quantize_on_load=quantize, compute_dtype=compute, fuse=True)
    attention, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert "qkv_proj" in attention and "q_proj" not in attention
    assert "gate_up_proj" in mlp and "gate_proj" not in mlp
    expected_kind = nn.Linear if quantize is None else nn.QuantizedLinear
    assert isinstance(attention.qkv_proj, expected_kind)
    ids = mx.array(np.random.default_rng(3).integers(0, 512, (1, 20)))
    assert_same_logits(logits_by_path(fused, ids), logits_by_path(plain, ids))


def test_layers_with_different_bits_stay_apart(make_checkpoint):
    """mixed_4_6 gives v_proj 6 bits in the first and last eighth of layers (both of 2 here), so q/k/v
    cannot share one packed matrix there; gate/up (both 4-bit) still fuse."""
    model_dir = make_checkpoint(dtype="bfloat16", **SHAPES)
    spec = QuantSpec(bits=4, group_size=64, recipe="mixed_4_6")
    plain, _ = load_model(model_dir, quantize_on_load=spec, compute_dtype="float32")
    fused, _ = load_model(model_dir, quantize_on_load=spec, compute_dtype="float32")
    assert plain.layers[0].self_attn.v_proj.bits == 6
    assert fuse_projections(fused) == 2  # gate/up in each of the 2 layers
    assert "q_proj" in fused.layers[0].self_attn and "qkv_proj" not in fused.layers[0].self_attn
    assert "gate_up_proj" in fused.layers[1].mlp
    ids = mx.array(np.random.default_rng(4).integers(0, 512, (1, 12)))
    assert_same_logits(np.array(fused(ids)), np.array(plain(ids)))


def test_concatenate_refuses_mismatched_layers():
    dense = nn.Linear(64, 32, bias=False)
    with_bias = nn.Linear(64, 32, bias=True)
    q4 = nn.QuantizedLinear(64, 32, bias=False, group_size=64, bits=4)
    q8 = nn.QuantizedLinear(64, 32, bias=False, group_size=64, bits=8)
    q4_g32 = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
    wider = nn.Linear(128, 32, bias=False)
    half = nn.Linear(64, 32, bias=False)
    half.weight = half.weight.astype(mx.bfloat16)
    for parts in (
        [dense, q4],
        [dense, with_bias],
        [q4, q8],
        [q4, q4_g32],
        [dense, wider],
        [dense, half],
    ):
        assert concatenate_linears(parts) is None
    joined = concatenate_linears(
        [q4, nn.QuantizedLinear(64, 16, bias=False, group_size=64, bits=4)]
    )
    assert joined.weight.shape == (48, 8) and joined.scales.shape == (48, 1)
    x = mx.random.normal((3, 64))
    assert mx.array_equal(joined(x)[:, :32], q4(x)).item()


def test_fusing_twice_changes_nothing(make_checkpoint):
    model, _ = load_model(make_checkpoint(**SHAPES), fuse=True)
    assert is_fused(model)
    assert fuse_projections(model) == 0


def test_fusion_is_asked_for_and_the_default_keeps_checkpoint_keys(make_checkpoint):
    """Fusion is opt-in (it measured no gain on the CPU backend); unfused, the module tree equals the
    checkpoint, so a loaded model can be quantized and saved in the unchanged format."""
    model_dir = make_checkpoint(tokenizer="qwen3-4b", **SHAPES)
    model, _, _ = load(model_dir, fuse=True)
    assert is_fused(model)
    default, _, _ = load(model_dir)
    plain, _ = load_model(model_dir)
    assert not is_fused(default) and not is_fused(plain)
    checkpoint_keys = set(read_weights(model_dir))
    assert {name for name, _ in tree_flatten(plain.parameters())} == checkpoint_keys
    fused_keys = {name for name, _ in tree_flatten(model.parameters())}
    assert "model.layers.0.self_attn.qkv_proj.weight" in fused_keys
    assert "model.layers.0.self_attn.q_proj.weight" not in fused_keys
