"""Dense (bf16) linear layers on the CPU: the native kernel reads bf16 weights in place.

A bf16 checkpoint under float32 compute (the CPU default) used to be cast to float32 at load: twice
the memory, and every decode step read twice the bytes through MLX's reference BLAS (about 2 tok/s
at 0.6B). Now, where the extension's `dense_matmul` passed its self-test, the weights of every
plain Linear and Embedding stay bf16 (`weights_read_in_place`; FP8 checkpoints arrive here as bf16,
qwen3_mlx/fp8.py) and the kernel widens them to float32 next to the FMAs: widening bf16 is exact and
products and sums are float32, so results are within float32 rounding of MLX's matmul over the
widened weights. Activations stay float32. Up to 8 rows of x a mat-vec bound by reading the weights,
more rows (prefill) a tiled matmul that widens one small tile at a time; neither needs a BLAS.
Embedding lookups widen the looked-up rows (exact). QWEN3_MLX_NATIVE_DENSE_BF16=1 (off by default;
AVX512-BF16 only) rounds x to bf16 for the mat-vec's `vdpbf16ps` dot products, as llama.cpp's BF16
path does: fewer instructions per weight, and a drift of about 2^-9 of sum |x w|. Everything else (a GPU, other compute dtypes,
float32 or float16 checkpoints, no extension) keeps MLX's layers and the load-time cast.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from qwen3_mlx.cpu import native as native_kernel
from qwen3_mlx.cpu import quantized
from qwen3_mlx.cpu.quantized import THREADS

BF16_ENV = "QWEN3_MLX_NATIVE_DENSE_BF16"

try:  # imported with this module, never during a load: load() imports transformers on a thread
    # meanwhile, and two threads importing at once can deadlock (tests/test_loading.py)
    importlib.import_module(f"qwen3_mlx.{native_kernel.module_name()}")
except ImportError:  # not built here: native_kernel.fallback_reason() says why when asked
    pass


def _self_test(module: ModuleType) -> str | None:
    """None if small products, by 1 row (mat-vec) and by 13 (the matmul), match MLX's matmul over
    the widened weight to float32 rounding, else what failed."""
    weight = (mx.arange(48 * 96, dtype=mx.float32).reshape(48, 96) % 13 - 6).astype(mx.bfloat16)
    for rows in (1, 13):
        x = mx.linspace(-1, 1, 96 * rows).reshape(rows, 96)
        expected = x @ weight.astype(mx.float32).T
        if not mx.allclose(
            module.dense_matmul(x, weight, 1), expected, rtol=1e-5, atol=1e-4
        ).item():
            return f"its dense_matmul self-test of {rows} row(s) differed from MLX's matmul"
    return None


def native_dense() -> ModuleType | None:
    """The extension when its bf16 matmul is present and passed its self-test, else None."""
    if mx.default_device() != mx.cpu:
        return None
    return native_kernel.checked("dense_matmul", _self_test)


def bf16_requested() -> bool:
    """Whether QWEN3_MLX_NATIVE_DENSE_BF16=1 asks for the bf16-dot mat-vec (read per call)."""
    return os.environ.get(BF16_ENV) == "1"


def keeps_bf16(compute_dtype: mx.Dtype | None) -> bool:
    """Whether 2-D bf16 weights stay bf16 under compute_dtype (the native kernel widens them per
    use), so that a loader need not cast them."""
    return compute_dtype is not None and compute_dtype == mx.float32 and native_dense() is not None


def _reads_in_place(weight: mx.array, compute_dtype: mx.Dtype | None) -> bool:
    """Whether the native kernel computes a layer with this weight under compute_dtype."""
    return weight.dtype == mx.bfloat16 and weight.ndim == 2 and keeps_bf16(compute_dtype)


def _matmul(x: mx.array, weight: mx.array) -> mx.array | None:
    """x @ weight.T by the native kernel, or None where it does not apply (MLX's then)."""
    module = native_dense() if x.dtype == mx.float32 and weight.dtype == mx.bfloat16 else None
    return None if module is None else module.dense_matmul(x, weight, THREADS, bf16_requested())


def matmul(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T: the native kernel for float32 x and a bf16 weight read in place, else MLX's."""
    out = _matmul(x, weight)
    return x @ weight.T if out is None else out


def project(x: mx.array, *layers: nn.Module) -> list[mx.array]:
    """layer(x) for each layer: a layer's q/k/v (or gate/up) in one native call where every layer
    is a bf16 CpuDenseLinear without a bias (x laid out once, the pool woken once; bit for bit the
    results of separate calls), else as qwen3_mlx.cpu.quantized.project does."""
    module = native_dense() if x.dtype == mx.float32 and len(layers) > 1 else None
    if module is None or not all(
        type(layer) is CpuDenseLinear
        and "bias" not in layer
        and layer["weight"].dtype == mx.bfloat16
        for layer in layers
    ):
        return quantized.project(x, *layers)
    weights = [layer["weight"] for layer in layers]
    return module.dense_matmuls(x, weights, THREADS, bf16_requested())


class CpuDenseLinear(nn.Linear):
    """nn.Linear whose bf16 weight the native kernel reads in place for float32 x."""

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> CpuDenseLinear:
        """The same layer, sharing its arrays."""
        new = cls(1, 1, bias=False)  # a stand-in; its arrays are replaced
        for name in ("weight", "bias"):
            if name in layer:
                setattr(new, name, layer[name])
        return new

    def __call__(self, x: mx.array) -> mx.array:
        out = _matmul(x, self["weight"])
        if out is None:
            return super().__call__(x)
        return out + self["bias"] if "bias" in self else out


class CpuDenseEmbedding(nn.Embedding):
    """nn.Embedding with a bf16 table: lookups widened to the compute dtype, and the tied output
    projection (as_linear) by the native kernel."""

    compute_dtype: mx.Dtype | None = None

    @classmethod
    def from_embedding(cls, layer: nn.Embedding) -> CpuDenseEmbedding:
        """The same embedding, sharing its table."""
        new = cls(1, 1)
        new.weight = layer["weight"]
        return new

    def __call__(self, x: mx.array) -> mx.array:
        rows = self["weight"][x]
        return rows if self.compute_dtype is None else rows.astype(self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        """The logits for hidden states x (the embedding used as the output layer)."""
        out = _matmul(x, self["weight"])
        return super().as_linear(x) if out is None else out


def use_dense_kernels(model: nn.Module, compute_dtype: mx.Dtype | None) -> int:
    """Give every plain Linear and Embedding with a bf16 weight the native kernel, when the model
    computes in float32 on the CPU and the kernel passed its self-test; return how many changed."""
    swapped = 0

    def swap(_: str, module: nn.Module) -> nn.Module:
        nonlocal swapped
        if type(module) not in (nn.Linear, nn.Embedding) or not _reads_in_place(
            module["weight"], compute_dtype
        ):
            return module
        swapped += 1
        if type(module) is nn.Linear:
            return CpuDenseLinear.from_linear(module)
        new = CpuDenseEmbedding.from_embedding(module)
        new.compute_dtype = compute_dtype
        return new

    model.update_modules(
        tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    )
    return swapped


def weights_read_in_place(model: nn.Module) -> set[str]:
    """Parameter names (`...q_proj.weight`) to leave bf16 when casting to the compute dtype: those
    of the layers `use_dense_kernels` gave the native kernel."""
    return {
        f"{path}.weight"
        for path, module in model.named_modules()
        if isinstance(module, (CpuDenseLinear, CpuDenseEmbedding))
        and module["weight"].dtype == mx.bfloat16
    }
