"""RMSNorm, RoPE and SwiGLU for float32 on the CPU: one native op each when built, else MLX's.

On MLX's CPU backend `mx.fast.rms_norm` and `mx.fast.rope` have no kernel and run as chains of
6-15 ops, and `nn.silu`'s exp is scalar: for one token of a 4B model that is ~30 ms of a ~180 ms
decode step spent on a few hundred kilobytes (docs/benchmarks.md). The extension
(qwen3_mlx/native/decode_ops.cpp) does each in one pass, within a few float32 roundings of MLX's
ops. Everything else (a GPU, half precision, an array of per-row offsets, no extension) keeps
MLX's ops, which stay the reference.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx.cpu import native as native_kernel


def _self_test(module: ModuleType) -> str | None:
    """None if each op matches MLX's on a small input, else what failed."""
    x = mx.linspace(-3, 3, 2 * 3 * 64).reshape(2, 3, 1, 64)
    weight = mx.linspace(0.5, 1.5, 64)
    checks = {
        "rms_norm": (module.rms_norm(x, weight, 1e-6), mx.fast.rms_norm(x, weight, 1e-6)),
        "rope": (
            module.rope(x, default_inv_freq(64, 10_000.0), 5),
            mx.fast.rope(x, 64, traditional=False, base=10_000.0, scale=1.0, offset=5),
        ),
        "swiglu": (module.swiglu(x, x[::-1]), nn.silu(x) * x[::-1]),
    }
    for name, (actual, expected) in checks.items():
        if not mx.allclose(actual, expected, rtol=1e-5, atol=1e-6).item():
            return f"its {name} self-test differed from MLX's"
    return None


def _fused_self_test(module: ModuleType) -> str | None:
    """None if the fused ops give exactly what the separate ones do, else what failed."""
    x = mx.linspace(-3, 3, 2 * 3 * 64).reshape(2, 3, 64)
    delta, weight = x[::-1] * 0.5, mx.linspace(0.5, 1.5, 32)
    inv_freq = default_inv_freq(32, 10_000.0)
    h, normed = module.add_rms_norm(x, delta, mx.linspace(0.5, 1.5, 64), 1e-6)
    q, k = module.qk_norm_rope(x, delta, weight, weight[::-1], inv_freq, 1e-6, 5, 1.0)
    heads = (x.reshape(2, 3, 2, 32), delta.reshape(2, 3, 2, 32))
    checks = {
        "add_rms_norm": (normed, module.rms_norm(x + delta, mx.linspace(0.5, 1.5, 64), 1e-6)),
        "qk_norm_rope": (
            mx.concatenate([q, k]),
            mx.concatenate(
                [
                    module.rope(module.rms_norm(head, w, 1e-6).transpose(0, 2, 1, 3), inv_freq, 5)
                    for head, w in zip(heads, (weight, weight[::-1]), strict=True)
                ]
            ),
        ),
    }
    if not mx.array_equal(h, x + delta).item():
        return "its add_rms_norm self-test gave another sum"
    for name, (actual, expected) in checks.items():
        if not mx.array_equal(actual, expected).item():
            return f"its {name} self-test differed from the separate ops"
    return None


def native_ops() -> ModuleType | None:
    """The extension when its decode ops are present and passed their self-test, else None."""
    return native_kernel.checked("swiglu", _self_test)


def _native_for(*arrays: mx.array) -> ModuleType | None:
    """The extension if every array is float32 and MLX computes on the CPU, else None."""
    # A plain loop: this runs several times per layer of every decode step.
    for a in arrays:
        if a.dtype != mx.float32:
            return None
    return native_ops() if mx.default_device() == mx.cpu else None


def fused_ops() -> ModuleType | None:
    """The extension when its decode ops and the fused ones (add_rms_norm, qk_norm_rope) passed
    their self-tests, else None."""
    if native_ops() is None:
        return None
    return native_kernel.checked("qk_norm_rope", _fused_self_test)


def _fused_for(*arrays: mx.array) -> ModuleType | None:
    """As _native_for, for the fused decoder-layer ops (add_rms_norm, qk_norm_rope)."""
    module = _native_for(*arrays)
    if module is None or fused_ops() is None:
        return None
    return module


def default_inv_freq(dims: int, base: float) -> mx.array:
    """RoPE's inverse frequencies, computed as mx.fast.rope's CPU path does (bit for bit)."""
    half = dims // 2
    return mx.exp(mx.arange(half, dtype=mx.float32) * (-math.log(base) / half))


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """weight * x / sqrt(mean(x^2) + eps) over the last axis."""
    module = _native_for(x, weight)
    if module is None:
        return mx.fast.rms_norm(x, weight, eps)
    return module.rms_norm(x, weight, eps)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, Qwen3's MLP activation."""
    module = _native_for(gate, up)
    if module is None or gate.shape != up.shape:
        return nn.silu(gate) * up
    return module.swiglu(gate, up)


def rope(x: mx.array, inv_freq: mx.array, offset: int, factor: float) -> mx.array | None:
    """Non-interleaved RoPE of factor * x over its whole last axis at positions offset.., or None
    where the native op does not apply (the caller then uses mx.fast.rope)."""
    module = _native_for(x)
    if module is None or not isinstance(offset, int) or x.ndim < 2:
        return None
    return module.rope(x, inv_freq, offset, factor)


def add_rms_norm(x: mx.array, delta: mx.array, norm: nn.RMSNorm) -> tuple[mx.array, mx.array]:
    """(h, norm(h)) for h = x + delta: a residual add and the next norm, one native op when
    built (bit for bit the two ops)."""
    module = _fused_for(x, delta, norm["weight"])
    if module is None or x.shape != delta.shape:
        h = x + delta
        return h, norm(h)
    h, normed = module.add_rms_norm(x, delta, norm["weight"], norm.eps)
    return h, normed


def qk_norm_rope(
    q: mx.array,
    k: mx.array,
    norms: tuple[nn.RMSNorm, nn.RMSNorm],
    inv_freq: mx.array,
    offset: Any,
    factor: float,
) -> tuple[mx.array, mx.array] | None:
    """q [B, L, Hq * D] and k [B, L, Hk * D] to RoPE(RMSNorm(head)) per head as [B, H, L, D], in
    one native op (bit for bit the separate ops), or None where it does not apply."""
    q_norm, k_norm = norms
    module = _fused_for(q, k, q_norm["weight"], k_norm["weight"])
    if module is None or not isinstance(offset, int) or q_norm.eps != k_norm.eps or q.ndim != 3:
        return None
    q, k = module.qk_norm_rope(
        q, k, q_norm["weight"], k_norm["weight"], inv_freq, q_norm.eps, offset, factor
    )
    return q, k


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter), computed by `rms_norm`."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self["weight"], self.eps)
