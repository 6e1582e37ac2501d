"""Load one rank's share of a checkpoint: only its slices are read from the safetensors files.

The model is built with lazy (never evaluated) parameters, quantized to the checkpoint's layout
and split by the shard plan; then every tensor is read straight from the file, a slice at a time:
output rows are one contiguous byte range, input columns a strided view of a memory map. Each
slice is cast to the compute dtype as soon as it is read, so a rank's peak memory is its share of
the model plus one tensor, about 1/N of the model. bf16 matrices the native kernel reads in place
(float32 compute on the CPU) are not cast: they stay bf16, as in a single process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from qwen3_mlx.checkpoint_check import array_tensors, check_sizes, check_tensors, model_tensors
from qwen3_mlx.config import ModelArgs, read_config
from qwen3_mlx.cpu.dense import keeps_bf16, use_dense_kernels
from qwen3_mlx.cpu.quantized import use_cpu_kernels
from qwen3_mlx.errors import CheckpointError, QuantizationError
from qwen3_mlx.fp8 import fp8_block_size
from qwen3_mlx.model import Model
from qwen3_mlx.parallel.sharding import Slice, VocabShard, part_bounds, shard_model
from qwen3_mlx.quant import apply_checkpoint_quantization, read_quantization
from qwen3_mlx.safetensors_check import read_header, weight_files

# safetensors dtype -> (numpy dtype of the raw bytes, the MLX dtype they hold)
_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the bits, view them in MLX
    "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32),
    "U8": (np.uint8, mx.uint8),
}


def read_slice(path: Path, data_start: int, info: dict[str, Any], piece: Slice | None, name: str):
    """One tensor of a safetensors file, or only the piece of it this rank keeps."""
    if info["dtype"] not in _DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} is {info['dtype']}, which a sharded load cannot read "
            "(convert FP8 checkpoints with `qwen3-mlx quantize` first)"
        )
    raw_dtype, mlx_dtype = _DTYPES[info["dtype"]]
    shape = [int(size) for size in info["shape"]]
    start, _ = info["data_offsets"]
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return mx.zeros(shape, dtype=mlx_dtype)
    whole = np.memmap(path, dtype=raw_dtype, mode="r", offset=data_start + start, shape=(count,))
    whole = whole.reshape(shape)
    if piece is not None and not (len(shape) < 2 and piece.axis == 1):
        first, last = part_bounds(shape[piece.axis], piece, name)
        whole = whole[first:last] if piece.axis == 0 else whole[:, first:last]
    # The copy is the only read: a row range touches its own pages, a column slice every row once.
    array = mx.array(np.ascontiguousarray(whole))
    del whole
    return array.view(mlx_dtype) if array.dtype != mlx_dtype else array


def read_rank_weights(
    files: list[Path],
    plan: dict[str, Slice],
    dtype: mx.Dtype | None,
    keep: set[str],
    in_place: set[str] = frozenset(),
) -> dict[str, mx.array]:
    """The tensors named in keep, each sliced by its module's plan entry and cast to dtype now
    (except those named in in_place, which the native kernel reads as they are stored)."""
    weights: dict[str, mx.array] = {}
    for path in files:
        header = read_header(path)
        with path.open("rb") as handle:
            data_start = 8 + int.from_bytes(handle.read(8), "little")
        for name, info in header.items():
            if name == "__metadata__" or name not in keep:
                continue
            piece = plan.get(name.rsplit(".", 1)[0])
            array = read_slice(path, data_start, info, piece, name)
            if (
                dtype is not None
                and name not in in_place
                and mx.issubdtype(array.dtype, mx.floating)
            ):
                array = array.astype(dtype)
            mx.eval(array)  # frees the raw copy before the next tensor is read
            weights[name] = array
    return weights


def dense_in_place(
    model: Model, headers: dict[str, Any], compute_dtype: mx.Dtype | None
) -> set[str]:
    """Names of the bf16 weights this rank keeps bf16 (plain linear layers, embeddings and
    unquantized vocabulary shards) because the native kernel reads them in place under
    compute_dtype: a float32 rank then holds half the bytes, as a single process does."""
    if not keeps_bf16(compute_dtype):
        return set()
    names = set()
    for path, module in model.named_modules():
        dense = type(module) in (nn.Linear, nn.Embedding) or (
            isinstance(module, VocabShard) and "scales" not in module
        )
        info = headers.get(f"{path}.weight")
        if dense and info is not None and info["dtype"] == "BF16":
            names.add(f"{path}.weight")
    return names


def load_rank_model(
    model_dir: Path,
    group: Any,
    *,
    rope_scaling: dict[str, Any] | None = None,
    compute_dtype: mx.Dtype | None = None,
    split_vocabulary: bool = True,
) -> tuple[Model, dict[str, Any]]:
    """This rank's share of the model in model_dir, split over group; return it with its config."""
    source = str(Path(model_dir) / "config.json")
    config = read_config(Path(model_dir))
    args = ModelArgs.from_dict(config, source)
    args = args if rope_scaling is None else args.with_rope_scaling(rope_scaling)
    block = read_quantization(config, source)
    if block is None and fp8_block_size(config, source) is not None:
        raise QuantizationError(
            f"{source}: FP8 checkpoints cannot be sharded; convert it with `qwen3-mlx quantize`"
        )
    files = weight_files(Path(model_dir))
    headers: dict[str, dict[str, Any]] = {}
    for path in files:
        headers.update({k: v for k, v in read_header(path).items() if k != "__metadata__"})
    check_sizes(args, headers, source)
    model = Model(args)  # lazy random parameters: never evaluated, replaced below
    names = set(model.sanitize(dict.fromkeys(headers)))  # type: ignore[arg-type]
    if block is not None:
        apply_checkpoint_quantization(model, block, names)
    plan = shard_model(model, group, split_vocabulary)
    in_place = dense_in_place(model, headers, compute_dtype)
    weights = read_rank_weights(files, plan, compute_dtype, names, in_place)
    check_tensors(model_tensors(model), array_tensors(weights), Path(model_dir))
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if compute_dtype is not None:
        from qwen3_mlx.quant import cast_floating

        cast_floating(model, compute_dtype, keep=in_place)  # the norms, built whole
    use_dense_kernels(model, compute_dtype)
    for path, module in model.named_modules():
        if isinstance(module, VocabShard) and f"{path}.weight" in in_place:
            module.compute_dtype = compute_dtype
    use_cpu_kernels(model)
    mx.eval(model.parameters())
    model.eval()
    return model, config
