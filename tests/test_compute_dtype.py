"""The compute-dtype policy: 'auto' picks float32 on the CPU backend (the checkpoint's dtype on a
GPU), every floating tensor follows the chosen dtype (norms, embeddings, dense weights, 4-bit
scales and biases, save the bf16 matrices and the 4-bit scales the native kernels read in place
under float32; packed weights stay), activations and the KV cache follow the weights, and parity with transformers holds in
both float32 and bfloat16 (looser). Run with -s to see the measured differences."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import qwen3_mlx.cpu.dense as dense
import qwen3_mlx.cpu.native as native_kernel
from qwen3_mlx.cache import make_cache
from qwen3_mlx.loading import load_model, resolve_compute_dtype

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
FP32_TOLERANCE = 1e-4  # max abs logit difference to transformers fp32 (logits of scale ~50)
# bfloat16 keeps 8 significant bits: measured 0.0077 of the largest logit (dense weights).
BF16_RELATIVE_TOLERANCE = 0.02
# MLX's CPU quantized_matmul accumulates bfloat16 inputs in bfloat16 (float32 inputs in float32), so
# the 4-bit bf16 path drifts further: measured 0.031 of the largest logit with inputs 128-256 wide.
BF16_QUANTIZED_RELATIVE_TOLERANCE = 0.06
ON_CPU = mx.default_device() == mx.cpu


def test_auto_is_float32_on_the_cpu_and_checkpoint_dtype_on_a_gpu():
    previous = mx.default_device()
    try:
        mx.set_default_device(mx.cpu)
        assert resolve_compute_dtype("auto") == mx.float32
        if mx.is_available(mx.gpu):
            mx.set_default_device(mx.gpu)
            assert resolve_compute_dtype("auto") is None
    finally:
        mx.set_default_device(previous)
    assert resolve_compute_dtype("checkpoint") is None
    assert resolve_compute_dtype("bfloat16") == mx.bfloat16


def floating_dtypes(model) -> set:
    """The dtypes of every floating parameter."""
    return {
        v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    }


@pytest.mark.parametrize(
    ("compute", "expected"),
    [
        ("auto", mx.float32),
        ("float32", mx.float32),
        ("bfloat16", mx.bfloat16),
        ("checkpoint", mx.bfloat16),
    ],
)
@pytest.mark.parametrize("bits", [None, 4], ids=["bf16", "4bit"])
def test_weights_activations_and_cache_follow_the_compute_dtype(
    make_checkpoint, compute, expected, bits
):
    if compute == "auto" and mx.default_device() != mx.cpu:
        expected = mx.bfloat16  # the checkpoint's dtype on a GPU
    model, _ = load_model(
        make_checkpoint(dtype="bfloat16", **SHAPES), quantize_on_load=bits, compute_dtype=compute
    )
    # Float32 compute keeps the checkpoint's 4-bit scales where the native kernel reads them in
    # place (qwen3_mlx.cpu.quantized.scales_read_in_place); every other path casts them per call.
    in_place = (
        bits is not None
        and expected == mx.float32
        and ON_CPU
        and native_kernel.native() is not None
    )
    # And the dense (bf16) matrices, where the native bf16 matmul reads them in place
    # (qwen3_mlx.cpu.dense.weights_read_in_place): no float32 copy of any matrix.
    dense_in_place = (
        bits is None and expected == mx.float32 and ON_CPU and dense.native_dense() is not None
    )
    scale_dtype = mx.bfloat16 if in_place or dense_in_place else expected
    assert floating_dtypes(model) == {expected, scale_dtype}
    embed, q_proj = model.model.embed_tokens, model.layers[0].self_attn.q_proj
    if bits is not None:
        # Packed weights stay uint32; scales and biases (embedding included) follow the dtype.
        assert embed.weight.dtype == q_proj.weight.dtype == mx.uint32
        assert embed.scales.dtype == embed.biases.dtype == q_proj.scales.dtype == scale_dtype
        assert embed(mx.array([[1, 2]])).dtype == expected
    else:
        assert embed.weight.dtype == q_proj.weight.dtype == scale_dtype
        assert embed(mx.array([[1, 2]])).dtype == expected
    assert model.layers[0].input_layernorm.weight.dtype == expected
    cache = make_cache(model)
    logits = model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    assert logits.dtype == expected
    assert cache[0].keys.dtype == cache[0].values.dtype == expected


def hf_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    """transformers' fp32 logits on the same checkpoint."""
    model = transformers.Qwen3ForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model.eval()(torch.tensor(ids)).logits.numpy()[0]


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    """Prefill in two chunks, then token by token through the cache: every path a chat takes."""
    cache = make_cache(model)
    pieces = [
        model(mx.array(ids[:, :10]), cache=cache),
        model(mx.array(ids[:, 10:20]), cache=cache),
    ]
    pieces += [model(mx.array(ids[:, i : i + 1]), cache=cache) for i in range(20, ids.shape[1])]
    return np.array(mx.concatenate(pieces, axis=1).astype(mx.float32))[0]


def test_parity_with_transformers_in_float32_and_bfloat16(make_checkpoint):
    model_dir = make_checkpoint(dtype="float32", tie_word_embeddings=False, **SHAPES)
    ids = np.random.default_rng(7).integers(0, 512, (1, 28))
    expected = hf_logits(model_dir, ids)
    scale = float(np.abs(expected).max())
    auto, _ = load_model(model_dir)  # the default policy
    float32_diff = float(np.abs(our_logits(auto, ids) - expected).max())
    bf16, _ = load_model(model_dir, compute_dtype="bfloat16")
    bf16_logits = our_logits(bf16, ids)
    bf16_diff = float(np.abs(bf16_logits - expected).max())
    print(
        f"\n[compute dtype] vs transformers fp32: auto {float32_diff:.3g}, bf16 {bf16_diff:.3g} (scale {scale:.3g})"
    )
    if mx.default_device() == mx.cpu:
        assert float32_diff < FP32_TOLERANCE
    assert bf16_diff < BF16_RELATIVE_TOLERANCE * scale
    assert (bf16_logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_4bit_parity_between_float32_and_bfloat16_compute(make_checkpoint):
    """transformers cannot run MLX 4-bit weights; the float32 path (exact for the quantized weights)
    is the reference, and bfloat16 compute must stay close to it."""
    model_dir = make_checkpoint(dtype="float32", tie_word_embeddings=False, **SHAPES)
    ids = np.random.default_rng(8).integers(0, 512, (1, 28))
    float32, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32")
    bf16, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="bfloat16")
    expected = our_logits(float32, ids)
    actual = our_logits(bf16, ids)
    scale = float(np.abs(expected).max())
    diff = float(np.abs(actual - expected).max())
    agree = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    print(
        f"\n[compute dtype] 4-bit bf16 vs float32 compute: {diff:.3g} (scale {scale:.3g}), top-1 agree {agree:.2f}"
    )
    assert diff < BF16_QUANTIZED_RELATIVE_TOLERANCE * scale
    assert agree >= 0.9
