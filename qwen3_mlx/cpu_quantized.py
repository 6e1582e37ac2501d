"""Quantized matmuls on the CPU backend: split across threads for decode, dequantize + GEMM for prefill.

MLX's CPU `quantized_matmul` runs on one thread and treats every input row as its own
matrix-vector product, unpacking the whole weight again per row. Two changes, both exact or
within float32 rounding, and both only on the CPU backend (on a GPU these kernels are parallel
GEMMs already):

* Decode (up to NATIVE_ROWS rows, 4-bit, float32 x): the native kernel (qwen3_mlx/native_kernel.py)
  when it was built, ~10x MLX's kernel with float32 scales and ~70x with bf16 ones, which it reads
  in place; results within float32 rounding of MLX's. Otherwise, and for other bit widths, the
  output rows are split into blocks computed on separate CPU streams, which MLX runs on separate
  threads. Output rows are independent, so that result is bit for bit the same.
* Prefill (8+ rows, float32, OpenBLAS): dequantize the weight once per call and run one GEMM,
  ~35x faster for a 512-token chunk than row after row. Without OpenBLAS the bundled reference
  GEMM is no faster than the kernel; half precision keeps the kernel so "checkpoint" compute
  stays bit-identical to mlx-lm (tests rely on it).

The parameters (weight, scales, biases) are unchanged, so the module tree keeps the checkpoint keys.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from qwen3_mlx import native_kernel
from qwen3_mlx.blas import openblas_active

# Below this many rows the per-call dequantization costs more than the row-by-row kernel: on a
# 2-core x86 CPU a 0.6B forward of 8 rows took the same time both ways, 16 rows 3x less with GEMM.
MIN_ROWS = 8
# Decode threads: one per core, capped; the kernel is compute-bound (~0.5 G weights/s per core),
# far below memory bandwidth, so it scales with cores.
THREADS = min(os.cpu_count() or 1, 8)
# Rows of x up to which the native kernel runs (decode, small batches, speculative checks); more
# rows re-read the weights per block of 4 and the dequantize + GEMM path wins.
NATIVE_ROWS = 8
MIN_BLOCK = 64  # output rows per thread below which splitting is not worth a synchronisation

_streams: list[mx.Stream] = []


def _stream(index: int) -> mx.Stream | None:
    """Block 0 runs on the caller's stream; the others on extra CPU streams (one thread each)."""
    if index == 0:
        return None
    while len(_streams) < index:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[index - 1]


def prefill_gemm_helps(dtype: mx.Dtype) -> bool:
    """Whether many-row inputs of dtype take the dequantize + GEMM path on this backend."""
    return mx.default_device() == mx.cpu and dtype == mx.float32 and openblas_active() is not None


def _blocks(rows: int) -> list[tuple[int, int]]:
    count = max(1, min(THREADS, rows // MIN_BLOCK))
    edges = [rows * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def quantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for a quantized layer's W (its weight, scales and biases), the fastest way on the CPU."""
    weight, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    settings = {"group_size": layer.group_size, "bits": layer.bits, "mode": layer.mode}
    rows = x.size // x.shape[-1]
    if (
        rows <= NATIVE_ROWS
        and biases is not None
        and native_kernel.supports(x, layer.bits, layer.group_size, layer.mode, scales)
    ):
        return native_kernel.quantized_matvec(x, weight, scales, biases, layer.group_size, THREADS)
    gemm = rows >= MIN_ROWS and prefill_gemm_helps(x.dtype)
    blocks = _blocks(weight.shape[0])
    outputs = []
    for index, (start, stop) in enumerate(blocks):
        part = (weight, scales, biases)
        if len(blocks) > 1:  # row slices are views: no copy
            part = (
                weight[start:stop],
                scales[start:stop],
                None if biases is None else biases[start:stop],
            )
        if gemm:
            # Dequantizing is single-threaded, so it runs per block in parallel; the GEMM is
            # multi-threaded by OpenBLAS already and runs on the caller's stream.
            dense = mx.dequantize(*part, **settings, stream=_stream(index))
            outputs.append(x @ dense.astype(x.dtype).T)
        else:
            outputs.append(
                mx.quantized_matmul(x, *part, transpose=True, **settings, stream=_stream(index))
            )
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-1)


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear computed by `quantized_matmul` (threads for decode, GEMM for prefill)."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> CpuQuantizedLinear:
        """The same layer, sharing its arrays."""
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
        out = quantized_matmul(self, x)
        return out + self["bias"] if "bias" in self else out


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output projection (as_linear) uses `quantized_matmul`."""

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> CpuQuantizedEmbedding:
        """The same embedding, sharing its arrays."""
        new = cls(
            1, layer.group_size, group_size=layer.group_size, bits=layer.bits, mode=layer.mode
        )
        for name in ("weight", "scales", "biases"):
            if name in layer:
                setattr(new, name, layer[name])
        new.num_embeddings, new.dims = layer.num_embeddings, layer.dims
        return new

    def as_linear(self, x: mx.array) -> mx.array:
        """The logits for hidden states x (the embedding used as the output layer)."""
        return quantized_matmul(self, x)


def use_cpu_kernels(model: nn.Module) -> int:
    """On the CPU backend, give every plain quantized linear and embedding layer these paths;
    return how many layers were changed (0 on a GPU)."""
    if mx.default_device() != mx.cpu:
        return 0
    swapped = 0

    def swap(_: str, module: nn.Module) -> nn.Module:
        nonlocal swapped
        if type(module) is nn.QuantizedLinear:
            swapped += 1
            return CpuQuantizedLinear.from_quantized(module)
        if type(module) is nn.QuantizedEmbedding:
            swapped += 1
            return CpuQuantizedEmbedding.from_quantized(module)
        return module

    model.update_modules(
        tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    )
    return swapped
