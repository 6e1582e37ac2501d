"""The conversion plan: every output tensor with its dtype, shape and shard, decided before any work.

The plan comes from the one quantization rule. A Model is built from the config lazily (its random
initial weights are never evaluated, so even a 4B model costs no memory), qwen3_mlx.quant quantizes
it, and its parameter names and shapes are exactly what the output must hold: the same check the
loader makes, so a converted folder always loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen3_mlx import sizes
from qwen3_mlx.config import ModelArgs
from qwen3_mlx.dtypes import COMPUTE_DTYPES
from qwen3_mlx.errors import CheckpointError, QuantizationError
from qwen3_mlx.fp8 import fp8_block_size
from qwen3_mlx.loading import weight_files
from qwen3_mlx.model import Model
from qwen3_mlx.quant import QuantSpec, quantize_model, write_quantization
from qwen3_mlx.quantize.errors import ConversionError
from qwen3_mlx.quantize.tensor_io import (
    FP8_DTYPES,
    WRITE_DTYPES,
    OutputTensor,
    SourceTensor,
    source_tensors,
)

DTYPES = COMPUTE_DTYPES  # the one table of dtypes a model may be written in


@dataclass(frozen=True)
class Job:
    """One source weight and the output tensors made from it."""

    source: SourceTensor
    outputs: tuple[OutputTensor, ...]  # (weight,) cast and copied, or (weight, scales, biases)
    quantization: dict[str, int] | None  # {"group_size", "bits"} when quantized
    scale_inv: SourceTensor | None  # FP8 block multipliers of the source weight
    shard: int


@dataclass(frozen=True)
class Plan:
    """Everything the converter writes, known before it reads a single weight."""

    source_dir: Path
    config: dict[str, Any]  # the output config.json
    block: dict[str, Any]  # its quantization block
    spec: QuantSpec
    dtype_name: str
    jobs: tuple[Job, ...]
    shard_names: tuple[str, ...]
    fp8_block: tuple[int, int] | None
    parameters: int  # weights of the full-precision model

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype of scales, biases and unquantized tensors."""
        return DTYPES[self.dtype_name]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in the output."""
        return sum(out.nbytes for job in self.jobs for out in job.outputs)

    @property
    def source_bytes(self) -> int:
        """Bytes of tensor data read from the source."""
        return sum(
            job.source.nbytes + (job.scale_inv.nbytes if job.scale_inv else 0) for job in self.jobs
        )

    def shard_tensors(self, shard: int) -> list[OutputTensor]:
        """The output tensors of one shard, in writing order."""
        return [out for job in self.jobs if job.shard == shard for out in job.outputs]


def parse_size(text: str | int) -> int:
    """Bytes of a shard size like '5GB', '500MB' (decimal, as transformers) or '2GiB' (binary)."""
    try:
        size = sizes.parse_size(text)
    except ValueError:
        raise ConversionError(
            f"bad shard size {text!r}: use a size like 5GB, 500MB or 2GiB"
        ) from None
    if size <= 0:
        raise ConversionError(f"bad shard size {text!r}: it must be more than 0 bytes")
    return size


def refuse_quantized(config: dict[str, Any], source: str) -> None:
    """Refuse a source that is already quantized (anything but Qwen's FP8 blocks)."""
    block = config.get("quantization")
    if block is not None:
        bits = block.get("bits", "?") if isinstance(block, dict) else "?"
        raise QuantizationError(
            f"{source}: already quantized (MLX {bits}-bit); convert from the full-precision or FP8 original"
        )
    qconfig = config.get("quantization_config")
    if qconfig is not None and not (
        isinstance(qconfig, dict) and qconfig.get("quant_method") == "fp8"
    ):
        method = (
            qconfig.get("quant_method", "unknown method")
            if isinstance(qconfig, dict)
            else "unknown method"
        )
        raise QuantizationError(
            f"{source}: already quantized ({method}); convert from the full-precision or FP8 original"
        )


def target_tensors(
    args: ModelArgs, spec: QuantSpec, dtype: mx.Dtype
) -> tuple[dict[str, tuple[int, ...]], dict[str, OutputTensor], dict[str, Any]]:
    """Source parameter shapes, output tensors and the quantization block, from the config alone."""
    model = Model(args)  # lazy: the random initial weights are never evaluated
    source_shapes = {name: tuple(v.shape) for name, v in tree_flatten(model.parameters())}
    block = quantize_model(model, spec)
    outputs = {}
    for name, value in tree_flatten(model.parameters()):
        # Packed quantized weights are uint32; every floating tensor is written in `dtype`.
        kind = mx.uint32 if value.dtype == mx.uint32 else dtype
        outputs[name] = OutputTensor(name, WRITE_DTYPES[kind], tuple(value.shape))
    return source_shapes, outputs, block


def read_source(source_dir: Path, tied: bool) -> dict[str, SourceTensor]:
    """Every source tensor by name, in file order; a tied model's lm_head is dropped (as the loader does)."""
    tensors: dict[str, SourceTensor] = {}
    for path in weight_files(source_dir):
        for tensor in source_tensors(path):
            if tensor.name in tensors:
                raise CheckpointError(
                    f"{path}: tensor {tensor.name} is also in {tensors[tensor.name].path.name}"
                )
            if tied and tensor.name.startswith("lm_head."):
                continue
            tensors[tensor.name] = tensor
    return tensors


def _check_names(expected: dict[str, tuple[int, ...]], found: set[str], source_dir: Path) -> None:
    missing = sorted(set(expected) - found)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{source_dir}: tensor {missing[0]} is missing{more}")
    unexpected = sorted(found - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source_dir}: unexpected tensor {unexpected[0]}{more}")


def _scale_inv_for(
    tensor: SourceTensor, scales: dict[str, SourceTensor], fp8_block: tuple[int, int] | None
) -> SourceTensor | None:
    """The FP8 multipliers of a weight, checked against its shape; None for a plain weight."""
    scale_inv = scales.get(tensor.name)
    if tensor.dtype not in FP8_DTYPES:
        if scale_inv is not None:
            raise CheckpointError(
                f"{scale_inv.path}: {scale_inv.name} belongs to a {tensor.dtype} weight"
            )
        return None
    if fp8_block is None:
        raise CheckpointError(
            f"{tensor.path}: FP8 tensor {tensor.name}, but config.json has no fp8 quantization_config"
        )
    if scale_inv is None or len(tensor.shape) != 2:
        raise CheckpointError(
            f"{tensor.path}: FP8 tensor {tensor.name} has no {tensor.name}_scale_inv"
        )
    expected = tuple(
        math.ceil(size / block) for size, block in zip(tensor.shape, fp8_block, strict=True)
    )
    if scale_inv.shape != expected:
        raise CheckpointError(
            f"{scale_inv.path}: {scale_inv.name} has shape {scale_inv.shape}, expected {expected}"
        )
    return scale_inv


def _job_outputs(name: str, outputs: dict[str, OutputTensor]) -> tuple[OutputTensor, ...]:
    module = name.rsplit(".", 1)[0]
    if f"{module}.scales" in outputs:
        return (outputs[name], outputs[f"{module}.scales"], outputs[f"{module}.biases"])
    return (outputs[name],)


def _assign_shards(jobs: list[Job], max_shard_size: int) -> tuple[list[Job], int]:
    """Fill shards in job order; a job bigger than the limit gets a shard of its own (as mlx-lm)."""
    shard, size, placed = 0, 0, []
    for job in jobs:
        job_size = sum(out.nbytes for out in job.outputs)
        if size and size + job_size > max_shard_size:
            shard, size = shard + 1, 0
        placed.append(Job(job.source, job.outputs, job.quantization, job.scale_inv, shard))
        size += job_size
    return placed, shard + 1


def shard_names(count: int) -> tuple[str, ...]:
    """mlx-lm's (and transformers') shard file names."""
    if count == 1:
        return ("model.safetensors",)
    return tuple(f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1))


def make_plan(
    source_dir: Path, config: dict[str, Any], spec: QuantSpec, dtype_name: str, max_shard_size: int
) -> Plan:
    """Check the source against its config and decide every output tensor; refuse what cannot convert."""
    source = str(source_dir / "config.json")
    refuse_quantized(config, source)
    args = ModelArgs.from_dict(config, source)
    fp8_block = fp8_block_size(config, source)
    if dtype_name not in DTYPES:
        raise QuantizationError(f"unknown dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}")
    source_shapes, outputs, block = target_tensors(args, spec, DTYPES[dtype_name])
    tensors = read_source(source_dir, args.tie_word_embeddings)
    suffix = "_scale_inv"
    scales = {
        name[: -len(suffix)]: t for name, t in tensors.items() if name.endswith(".weight" + suffix)
    }
    weights = {name: t for name, t in tensors.items() if not name.endswith(".weight" + suffix)}
    _check_names(source_shapes, set(weights), source_dir)
    orphans = sorted(set(scales) - set(weights))
    if orphans:
        raise CheckpointError(f"{scales[orphans[0]].path}: {orphans[0]}{suffix} has no weight")
    jobs = []
    for name, tensor in weights.items():
        if tensor.shape != source_shapes[name]:
            raise CheckpointError(
                f"{tensor.path}: tensor {name} has shape {tensor.shape}, expected {source_shapes[name]}"
            )
        job_outputs = _job_outputs(name, outputs)
        module = name.rsplit(".", 1)[0]
        params = block.get(module, block) if len(job_outputs) == 3 else None
        quantization = (
            {"group_size": params["group_size"], "bits": params["bits"]} if params else None
        )
        jobs.append(
            Job(tensor, job_outputs, quantization, _scale_inv_for(tensor, scales, fp8_block), 0)
        )
    placed, count = _assign_shards(jobs, max_shard_size)
    out_config = write_quantization(config, block)
    out_config["torch_dtype"] = dtype_name
    if "dtype" in out_config:  # transformers >= 5 writes `dtype` instead of torch_dtype
        out_config["dtype"] = dtype_name
    return Plan(
        source_dir=source_dir,
        config=out_config,
        block=block,
        spec=spec,
        dtype_name=dtype_name,
        jobs=tuple(placed),
        shard_names=shard_names(count),
        fp8_block=fp8_block,
        parameters=sum(math.prod(shape) for shape in source_shapes.values()),
    )
