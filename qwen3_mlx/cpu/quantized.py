"""Quantized matmuls on the CPU backend: native kernels for 4-bit float32, else MLX's, split or GEMM.

MLX's CPU `quantized_matmul` runs on one thread and treats every input row as its own
matrix-vector product, unpacking the whole weight again per row. The changes, all exact or
within float32 rounding, and all only on the CPU backend (on a GPU these kernels are parallel
GEMMs already):

* 4-bit layers with float32 x, any number of rows: the native kernels (qwen3_mlx/cpu/native.py)
  when they were built. Up to 8 rows (decode, speculative verify) a mat-vec, ~10x MLX's kernel with float32 scales
  and ~70x with bf16 ones, which it reads in place; more rows (prefill) a tiled matmul that
  dequantizes the weights one small tile at a time, right before use, never the whole matrix
  (about 50x MLX's reference-BLAS route and 2-3x the OpenBLAS one on 2 cores). Results within
  float32 rounding of MLX's.
* Otherwise, and for other bit widths, decode splits the output rows into blocks computed on
  separate CPU streams, which MLX runs on separate threads (output rows are independent, so that
  result is bit for bit the same); prefill (8+ rows, float32, OpenBLAS loaded) dequantizes the
  weight once per call and runs one GEMM. Without OpenBLAS the bundled reference GEMM is no
  faster than the kernel; half precision keeps the kernel so "checkpoint" compute stays
  bit-identical to mlx-lm (tests rely on it).

The parameters (weight, scales, biases) are unchanged, so the module tree keeps the checkpoint keys.
Under float32 compute the layers the native kernel serves keep the checkpoint's bf16/f16 scales
and biases (`scales_read_in_place`; 0.25 GB less for a 4-bit 4B): the kernel reads them in place,
and every other path (the embedding lookup, no extension) casts them to float32 per call, which
is exact, so results are bit for bit those of scales cast at load.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from qwen3_mlx.cpu import native as native_kernel
from qwen3_mlx.cpu.blas import openblas_active

# Below this many rows the per-call dequantization costs more than the row-by-row kernel: on a
# 2-core x86 CPU a 0.6B forward of 8 rows took the same time both ways, 16 rows 3x less with GEMM.
MIN_ROWS = 8
# Decode threads: one per core, capped. One core of the native kernel reads about 25 GB/s of 4-bit
# weights (a Zen 5), about half of what the memory gives two cores; a verify pass's extra rows are
# bound by FMAs, which scale with cores.
THREADS = min(os.cpu_count() or 1, 8)
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


def _reads_in_place(layer: nn.Module, dtype: mx.Dtype | None) -> bool:
    """Whether the native kernel computes this layer's decode under compute dtype, reading its
    scales and biases as they are (so they need no float32 copy)."""
    return (
        dtype == mx.float32
        and "biases" in layer
        and native_kernel.supports_layer(
            layer.bits, layer.group_size, layer.mode, layer["scales"].dtype
        )
    )


def scales_read_in_place(model: nn.Module) -> set[str]:
    """Parameter names (`...q_proj.scales`, `...biases`) to leave in the checkpoint's dtype when
    casting to the compute dtype: those of the CPU layers whose decode the native kernel computes."""
    names = set()
    for path, module in model.named_modules():
        if isinstance(module, (CpuQuantizedLinear, CpuQuantizedEmbedding)) and _reads_in_place(
            module, module.compute_dtype
        ):
            names |= {f"{path}.scales", f"{path}.biases"}
    return names


def _compute_scales(layer: nn.Module, scales: mx.array, biases: mx.array | None) -> tuple:
    """Scales and biases in the layer's compute dtype (a per-call cast of those kept in place)."""
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is None or scales.dtype == dtype:
        return scales, biases
    return scales.astype(dtype), None if biases is None else biases.astype(dtype)


def quantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for a quantized layer's W (its weight, scales and biases), the fastest way on the CPU."""
    weight, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    settings = {"group_size": layer.group_size, "bits": layer.bits, "mode": layer.mode}
    rows = x.size // x.shape[-1]
    if biases is not None and native_kernel.supports(
        x, layer.bits, layer.group_size, layer.mode, scales
    ):
        return native_kernel.quantized_matmul(x, weight, scales, biases, layer.group_size, THREADS)
    scales, biases = _compute_scales(layer, scales, biases)
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


def _native_together(x: mx.array, layers: tuple[nn.Module, ...]) -> bool:
    """Whether one native call can compute every layer for x: all CPU 4-bit layers without a
    bias, with one group size, that the native kernel takes."""
    return all(
        type(layer) is CpuQuantizedLinear
        and "bias" not in layer
        and "biases" in layer
        and layer.group_size == layers[0].group_size
        and native_kernel.supports(x, layer.bits, layer.group_size, layer.mode, layer["scales"])
        for layer in layers
    )


def project(x: mx.array, *layers: nn.Module) -> list[mx.array]:
    """layer(x) for each layer; a layer's q/k/v (or gate/up) in one native call where every layer
    takes the native kernel: x is laid out once and the pool wakes once (bit for bit the results
    of separate calls)."""
    if len(layers) < 2 or not _native_together(x, layers):
        return [layer(x) for layer in layers]
    parts = [(layer["weight"], layer["scales"], layer["biases"]) for layer in layers]
    return native_kernel.quantized_matmuls(x, parts, layers[0].group_size, THREADS)


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear computed by `quantized_matmul` (threads for decode, GEMM for prefill)."""

    # The model's compute dtype (None: the checkpoint's): scales kept in another dtype for the
    # native kernel are cast to it for every other path.
    compute_dtype: mx.Dtype | None = None

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


def _rows_self_test(module) -> str | None:
    """None if embedding_rows gives mx.dequantize's rows bit for bit, else what failed."""
    table = mx.sin(mx.arange(40 * 128, dtype=mx.float32) * 0.3).reshape(40, 128)
    for dtype in (mx.bfloat16, mx.float32):
        w, scales, biases = mx.quantize(table.astype(dtype), group_size=64, bits=4)
        ids = mx.array([[3, 39, 0]], dtype=mx.uint32)
        expected = mx.dequantize(
            w[ids], scales[ids].astype(mx.float32), biases[ids].astype(mx.float32), 64, 4
        )
        actual = module.embedding_rows(ids, w, scales, biases, 64)
        if not mx.array_equal(actual, expected).item():
            return "its embedding_rows self-test differed from mx.dequantize"
    return None


def _native_rows(layer: nn.Module):
    """The extension for the native lookup of a 4-bit table computed in float32 on the CPU, else
    None."""
    if (
        layer.compute_dtype is None  # the checkpoint's dtype: MLX's lookup, as mlx-lm's
        or layer.compute_dtype != mx.float32
        or layer.bits != native_kernel.BITS
        or layer.mode != "affine"
        or layer.group_size not in native_kernel.GROUP_SIZES
        or "biases" not in layer
        or mx.default_device() != mx.cpu
    ):
        return None
    return native_kernel.checked("embedding_rows", _rows_self_test)


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output projection (as_linear) uses `quantized_matmul`."""

    compute_dtype: mx.Dtype | None = None  # as CpuQuantizedLinear's

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

    def __call__(self, x: mx.array) -> mx.array:
        biases = self.get("biases")
        module = _native_rows(self)
        if module is not None:
            # One node where MLX's gather and dequantize of a row make 57 (bit for bit).
            return module.embedding_rows(x, self["weight"], self["scales"], biases, self.group_size)
        scales, biases = _compute_scales(
            self, self["scales"][x], None if biases is None else biases[x]
        )
        return mx.dequantize(
            self["weight"][x],
            scales=scales,
            biases=biases,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        """The logits for hidden states x (the embedding used as the output layer)."""
        return quantized_matmul(self, x)


def use_cpu_kernels(model: nn.Module, compute_dtype: mx.Dtype | None = None) -> int:
    """On the CPU backend, give every plain quantized linear and embedding layer these paths;
    return how many layers were changed (0 on a GPU). compute_dtype: what the model computes in
    (see `scales_read_in_place`)."""
    if mx.default_device() != mx.cpu:
        return 0
    swapped = 0

    def swap(_: str, module: nn.Module) -> nn.Module:
        nonlocal swapped
        if type(module) is nn.QuantizedLinear:
            new = CpuQuantizedLinear.from_quantized(module)
        elif type(module) is nn.QuantizedEmbedding:
            new = CpuQuantizedEmbedding.from_quantized(module)
        else:
            return module
        swapped += 1
        new.compute_dtype = compute_dtype
        return new

    model.update_modules(
        tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module)
    )
    return swapped
