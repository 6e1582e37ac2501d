"""Rotary position embeddings: plain RoPE and YaRN, on mx.fast.rope (the native op for float32 on
the CPU: qwen3_mlx/cpu/ops.py)."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx.cpu import ops as cpu_ops


def _yarn_correction_dim(rotations: float, dims: int, base: float, original: int) -> float:
    # The rotary dimension whose wavelength completes `rotations` turns over the original context.
    return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    # The YaRN paper's attention temperature: 0.1 ln(s) + 1, optionally weighted.
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_frequencies(dims: int, base: float, scaling: dict[str, Any]) -> tuple[mx.array, float]:
    """YaRN's per-dimension periods and attention factor, as in the YaRN paper and transformers."""
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings", 32_768))
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    low = _yarn_correction_dim(beta_fast, dims, base, original)
    high = _yarn_correction_dim(beta_slow, dims, base, original)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1 keeps the original frequency, 0 divides it by `factor`
    inv_freq_extra = 1.0 / (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    inv_freq = inv_freq_extra / factor * (1.0 - extrapolate) + inv_freq_extra * extrapolate
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    # mx.fast.rope takes periods (1 / inverse frequency).
    return 1.0 / inv_freq, float(attention_factor)


class RoPE(nn.Module):
    """Non-interleaved RoPE over the full head, optionally YaRN-scaled."""

    def __init__(self, dims: int, base: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.dims = dims
        self.base = base
        self._freqs = None
        self.attention_factor = 1.0
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "yarn":
            self._freqs, self.attention_factor = yarn_frequencies(dims, base, scaling)
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
        self._inv_freq: mx.array | None = None  # for the native op, made at first use

    def inverse_frequencies(self) -> mx.array:
        """1 / period per rotated pair (float32), as the native RoPE op takes them."""
        if self._inv_freq is None:
            # What mx.fast.rope's CPU path computes from base or from freqs, bit for bit.
            if self._freqs is None:
                self._inv_freq = cpu_ops.default_inv_freq(self.dims, self.base)
            else:
                self._inv_freq = mx.reciprocal(self._freqs)
            mx.eval(self._inv_freq)
        return self._inv_freq

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if x.dtype == mx.float32 and x.shape[-1] == self.dims:
            out = cpu_ops.rope(x, self.inverse_frequencies(), offset, self.attention_factor)
            if out is not None:
                return out
        if self.attention_factor != 1.0:
            # transformers scales cos and sin; scaling the input is the same rotation, scaled.
            x = x * self.attention_factor
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None if self._freqs is not None else self.base,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )
