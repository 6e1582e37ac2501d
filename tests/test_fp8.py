"""Qwen's FP8 checkpoints (Qwen3-4B-Thinking-2507-FP8 format): F8_E4M3 Linear weights with one
bf16 multiplier per 128x128 block. Built here from a bf16 checkpoint, then loaded.

Error bound: E4M3 keeps 3 mantissa bits, so rounding w / s to the nearest E4M3 value is off by at
most 2^-4 relative for normal values (|w / s| >= 2^-6) and by at most 2^-10 absolute (half the
subnormal step 2^-9) below that, where s = amax(block) / 448 is the block's scale. The loader
dequantizes to bf16, one more rounding of at most 2^-9 relative. Per weight:
|w_fp8 - w| <= 2^-4 |w| + 2^-10 s + 2^-9 |w_fp8|. That bound is checked element by element.

The logits must equal those of the same weights dequantized independently (exactly), and stay
near the original bf16 model's. For those: a round-to-nearest error is spread evenly within half an
ulp, so one weight's relative RMS error is at most 2^-4 / sqrt(3) ~ 3.6%; independent errors add
in quadrature, and each sublayer applies two quantized matmuls in series (q/k/v then o, gate/up
then down), so its output is off by about sqrt(2) x 3.6% ~ 5% RMS. The residual stream adds
sublayer outputs to the exact embedding, so the logits' relative L2 error should stay under that;
asserted below the per-weight worst case 2^-4 = 6.25% (measured 4.1%).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import write_config
from mlx.utils import tree_flatten

import qwen3_mlx.cpu.dense as dense
from qwen3_mlx.errors import CheckpointError
from qwen3_mlx.loading import load_model

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

BLOCK = 128
E4M3_MAX = 448.0
FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [BLOCK, BLOCK],
}
# hidden 192 and intermediate 320 are not multiples of 128: edge blocks are partial (64 wide).
FP8_SHAPES = {
    "hidden_size": 192,
    "intermediate_size": 320,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}
LINEAR_SUFFIXES = tuple(
    f"{name}.weight"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
)
IDS = mx.array(np.random.default_rng(11).integers(0, 512, (1, 24)))


def fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weight and bf16 weight_scale_inv [ceil(out/128), ceil(in/128)], one scale per block."""
    out_features, in_features = weight.shape
    rows, cols = math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK)
    scale_inv = torch.empty(rows, cols, dtype=torch.bfloat16)
    quantized = torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn)
    w = weight.float()
    for i in range(rows):
        for j in range(cols):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            # Round the scale to bf16 first and divide by the stored value, so the stored pair
            # reproduces the weight and nothing exceeds E4M3's range.
            scale = (block.abs().max() / E4M3_MAX).to(torch.bfloat16)
            scale_inv[i, j] = scale
            values = (block / scale.float()).clamp(-E4M3_MAX, E4M3_MAX)
            quantized[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = values.to(
                torch.float8_e4m3fn
            )
    return quantized, scale_inv


def dequantize_reference(quantized: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W = W_fp8 * scale_inv[i // 128, j // 128], rounded to bf16 (independent of the loader)."""
    scales = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    out_features, in_features = quantized.shape
    return (quantized.float() * scales[:out_features, :in_features]).to(torch.bfloat16)


def convert_to_fp8(source: Path, target: Path) -> dict[str, torch.Tensor]:
    """Write target as an FP8 checkpoint of source; return the independently dequantized weights."""
    target.mkdir()
    weights = safetensors_torch.load_file(str(source / "model.safetensors"))
    stored, dequantized = {}, {}
    for name, value in weights.items():
        if name.endswith(LINEAR_SUFFIXES):
            quantized, scale_inv = fp8_blocks(value)
            stored[name], stored[f"{name}_scale_inv"] = quantized, scale_inv
            dequantized[name] = dequantize_reference(quantized, scale_inv)
        else:  # embeddings and norms stay bf16
            stored[name] = dequantized[name] = value
    safetensors_torch.save_file(
        stored, str(target / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((source / "config.json").read_text())
    write_config(target, {**config, "quantization_config": FP8_QUANTIZATION})
    return dequantized


@pytest.fixture
def fp8_pair(make_checkpoint, tmp_path):
    """(bf16 source folder, FP8 folder, independently dequantized weights)."""
    source = make_checkpoint("bf16", **FP8_SHAPES)
    dequantized = convert_to_fp8(source, tmp_path / "fp8")
    return source, tmp_path / "fp8", dequantized


def logits(model) -> np.ndarray:
    """Logits of a fixed prompt, as float32."""
    return np.array(model(IDS).astype(mx.float32))


def test_fp8_checkpoint_format(fp8_pair):
    _, fp8_dir, _ = fp8_pair
    header = safetensors_torch.load_file(str(fp8_dir / "model.safetensors"))
    assert header["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert header["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)  # 192x320
    assert header["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (1, 2)  # 128x192
    assert header["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert header["model.norm.weight"].dtype == torch.bfloat16


def test_fp8_weights_dequantize_exactly_and_within_the_fp8_bound(fp8_pair):
    source, fp8_dir, dequantized = fp8_pair
    model, _ = load_model(fp8_dir, compute_dtype="checkpoint")
    original = safetensors_torch.load_file(str(source / "model.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    for name in original:
        loaded = np.array(params[name].astype(mx.float32))
        np.testing.assert_array_equal(loaded, dequantized[name].float().numpy(), err_msg=name)
        if not name.endswith(LINEAR_SUFFIXES):
            continue
        w = original[name].float().numpy()
        # The largest block scale (bf16-rounded up to 2^-8) bounds every block's absolute term.
        scales = np.abs(w).max() / E4M3_MAX * (1 + 2**-8)
        bound = 2**-4 * np.abs(w) + 2**-10 * scales + 2**-9 * np.abs(loaded)
        assert np.all(np.abs(loaded - w) <= bound * (1 + 1e-6)), name


@pytest.mark.parametrize("compute_dtype", ["float32", "checkpoint"])
def test_fp8_logits(fp8_pair, tmp_path, compute_dtype):
    source, fp8_dir, dequantized = fp8_pair
    reference_dir = tmp_path / "dequantized"
    reference_dir.mkdir()
    safetensors_torch.save_file(dequantized, str(reference_dir / "model.safetensors"))
    write_config(reference_dir, json.loads((source / "config.json").read_text()))
    fp8_model, _ = load_model(fp8_dir, compute_dtype=compute_dtype)
    same_weights, _ = load_model(reference_dir, compute_dtype=compute_dtype)
    bf16_model, _ = load_model(source, compute_dtype=compute_dtype)
    fp8_logits = logits(fp8_model)
    np.testing.assert_array_equal(fp8_logits, logits(same_weights))
    bf16_logits = logits(bf16_model)
    relative = np.linalg.norm(fp8_logits - bf16_logits) / np.linalg.norm(bf16_logits)
    print(
        f"\n[fp8] {compute_dtype}: logits relative error vs bf16 {relative:.3g}, "
        f"max abs {np.abs(fp8_logits - bf16_logits).max():.3g} (logit scale {np.abs(bf16_logits).max():.3g})"
    )
    assert relative < 2**-4


def test_fp8_checkpoint_is_bf16_in_memory_under_float32_compute(fp8_pair):
    """Float32 compute (the CPU's default) keeps the dequantized matrices bf16 where the native bf16
    matmul reads them (qwen3_mlx.cpu.dense), never a float32 copy; elsewhere they are widened."""
    _, fp8_dir, _ = fp8_pair
    model, _ = load_model(fp8_dir, compute_dtype="float32")
    kept = mx.default_device() == mx.cpu and dense.native_dense() is not None
    matrices = {v.dtype for _, v in tree_flatten(model.parameters()) if v.ndim == 2}
    assert matrices == {mx.bfloat16 if kept else mx.float32}
    assert model.layers[0].input_layernorm.weight.dtype == mx.float32


def test_fp8_checkpoint_quantized_on_load_to_4_bits(fp8_pair, tmp_path):
    """quantize_on_load=4 on FP8 = 4-bit quantization of the dequantized bf16 weights."""
    source, fp8_dir, dequantized = fp8_pair
    reference_dir = tmp_path / "dequantized"
    reference_dir.mkdir()
    safetensors_torch.save_file(dequantized, str(reference_dir / "model.safetensors"))
    write_config(reference_dir, json.loads((source / "config.json").read_text()))
    model, _ = load_model(fp8_dir, quantize_on_load=4)
    reference, _ = load_model(reference_dir, quantize_on_load=4)
    assert model.model.layers[0].mlp.down_proj.bits == 4
    np.testing.assert_array_equal(logits(model), logits(reference))


def test_fp8_float32_scales(fp8_pair):
    """DeepSeek-style float32 weight_scale_inv loads like the bf16 scales Qwen ships."""
    _, fp8_dir, _ = fp8_pair
    bf16_scales, _ = load_model(fp8_dir)
    path = fp8_dir / "model.safetensors"
    weights = safetensors_torch.load_file(str(path))
    for name in [name for name in weights if name.endswith("_scale_inv")]:
        weights[name] = weights[name].float()
    safetensors_torch.save_file(weights, str(path), metadata={"format": "pt"})
    float32_scales, _ = load_model(fp8_dir)
    np.testing.assert_array_equal(logits(float32_scales), logits(bf16_scales))


def test_fp8_scale_with_the_wrong_shape(fp8_pair):
    _, fp8_dir, _ = fp8_pair
    path = fp8_dir / "model.safetensors"
    weights = safetensors_torch.load_file(str(path))
    weights["model.layers.1.mlp.up_proj.weight_scale_inv"] = torch.ones(1, 1, dtype=torch.bfloat16)
    safetensors_torch.save_file(weights, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_model(fp8_dir)
    message = str(error.value)
    assert "\n" not in message
    assert "model.layers.1.mlp.up_proj.weight_scale_inv" in message and "(3, 2)" in message
