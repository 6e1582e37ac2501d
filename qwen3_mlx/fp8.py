"""Qwen's FP8 checkpoints: F8_E4M3 weights with one bf16/f32 multiplier per 128x128 block."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from qwen3_mlx.errors import CheckpointError, QuantizationError


def fp8_block_size(config: dict[str, Any], source: str = "config.json") -> tuple[int, int] | None:
    """The [rows, cols] block of an FP8 quantization_config, None when the model is not FP8."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or "quant_method" not in qconfig:
        return None
    method = qconfig["quant_method"]
    if method != "fp8":
        raise QuantizationError(f"{source}: quant_method {method!r} is not supported (fp8 only)")
    if qconfig.get("fmt", "e4m3") != "e4m3":
        raise QuantizationError(
            f"{source}: FP8 format {qconfig['fmt']!r} is not supported (e4m3 only)"
        )
    block = qconfig.get("weight_block_size") or [128, 128]
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise QuantizationError(
            f"{source}: quantization_config.weight_block_size must be [rows, cols] "
            f"(two positive integers), got {block!r}"
        )
    return int(block[0]), int(block[1])


def dequantize_fp8(
    weight: mx.array, scale_inv: mx.array, block: tuple[int, int], name: str, dtype: mx.Dtype
) -> mx.array:
    """W[i, j] = W_fp8[i, j] * scale_inv[i // rows, j // cols] ("scale_inv" is a multiplier)."""
    out_features, in_features = weight.shape
    rows, cols = block
    expected = (-(-out_features // rows), -(-in_features // cols))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"{name}_scale_inv: shape {tuple(scale_inv.shape)}, expected {expected} for a "
            f"{out_features}x{in_features} FP8 weight in {rows}x{cols} blocks"
        )
    values = mx.from_fp8(weight, dtype=mx.float32)
    # [R, C] -> [R*rows, C*cols], cropped to the weight: blocks at the edge may be partial.
    scales = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), rows, axis=0), cols, axis=1)
    scales = scales[:out_features, :in_features]
    return (values * scales).astype(dtype)


def dequantize_fp8_weights(
    weights: dict[str, mx.array], block: tuple[int, int], dtype: mx.Dtype = mx.bfloat16
) -> dict[str, mx.array]:
    """Replace every FP8 weight and its scale_inv with the dequantized weight (lazily)."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale_name = name + "_scale_inv"
        if scale_name in weights:
            if value.dtype != mx.uint8:
                raise CheckpointError(
                    f"{name}: FP8 weight stored as {value.dtype}, expected F8_E4M3"
                )
            out[name] = dequantize_fp8(value, weights[scale_name], block, name, dtype)
        elif value.dtype == mx.uint8:
            raise CheckpointError(f"{name}: FP8 weight has no {scale_name}")
        else:
            out[name] = value
    return out
