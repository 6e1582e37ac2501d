"""Prefill on the CPU backend: quantized layers dequantize once and run one dense GEMM for inputs
of many rows.

MLX's CPU `quantized_matmul` treats every input row as a separate matrix-vector product, unpacking
the whole weight again per row, on one thread. For a 512-token chunk, dequantizing the weight once
and calling one GEMM is ~35x faster in float32 with OpenBLAS (multi-threaded, cache-blocked).
Decode (one row) keeps the quantized kernel, which reads 8x fewer bytes. On a GPU the quantized
kernels are real GEMMs, so nothing here applies there.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from qwen3_mlx.blas import openblas_active

# Below this many rows the per-call dequantization costs more than the row-by-row kernel: on a
# 2-core x86 CPU a 0.6B forward of 8 rows took the same time both ways, 16 rows 3x less with GEMM.
MIN_ROWS = 8


class PrefillGemmLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that switches to dequantize + GEMM for inputs of MIN_ROWS rows or more."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> PrefillGemmLinear:
        """The same layer (sharing its arrays) with the prefill path."""
        # A tiny stand-in built with the right settings; its (lazy, never evaluated) arrays are replaced.
        new = cls(
            layer.group_size,
            1,
            bias=False,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
        for name in ("weight", "scales", "biases", "bias"):
            if name in layer:
                setattr(new, name, layer[name])
        return new

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if rows < MIN_ROWS:
            return super().__call__(x)
        weight = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        out = x @ weight.astype(x.dtype).T
        if "bias" in self:
            out = out + self["bias"]
        return out


def prefill_gemm_helps(dtype: mx.Dtype) -> bool:
    """Whether to use the dequantize + GEMM path for activations of dtype on this backend."""
    # float32 GEMM is fast only with OpenBLAS; the bundled reference BLAS is no faster than
    # quantized_matmul. Half precision would gain ~20x too (MLX's own GEMM), but then results
    # would leave bit-parity with mlx-lm, which "checkpoint" compute keeps (tests rely on it).
    return mx.default_device() == mx.cpu and dtype == mx.float32 and openblas_active() is not None


def use_prefill_gemm(model: nn.Module) -> int:
    """Give every plain quantized linear layer the prefill path; return how many were changed."""
    swapped = 0

    def swap(_: str, module: nn.Module) -> nn.Module:
        nonlocal swapped
        if type(module) is not nn.QuantizedLinear or not prefill_gemm_helps(module.scales.dtype):
            return module
        swapped += 1
        return PrefillGemmLinear.from_quantized(module)

    model.update_modules(
        tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    )
    return swapped
