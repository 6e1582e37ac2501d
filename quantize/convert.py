"""Convert a Qwen3 checkpoint into an MLX quantized folder, tensor by tensor, in bounded memory.

Each weight is read in row chunks of about CHUNK_BYTES, (FP8: dequantized block by block), cast to
the output dtype and quantized with mx.quantize, the call nn.QuantizedLinear.from_linear makes in
mlx-lm; affine groups run along each row, so chunking rows gives bit-identical results to
quantizing the whole tensor. mlx_lm.convert also casts to the dtype before quantizing, so with the
same dtype the two converters write identical tensors.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_mlx import __version__
from qwen3_mlx.config import read_config
from qwen3_mlx.errors import CheckpointError
from qwen3_mlx.fp8 import dequantize_fp8
from qwen3_mlx.loading import resolve_model_path
from qwen3_mlx.quant import QuantSpec
from qwen3_mlx.quantize.folder import (
    check_free_space,
    check_output,
    write_config,
    write_index,
    write_model_card,
)
from qwen3_mlx.quantize.plan import Job, Plan, make_plan, parse_size
from qwen3_mlx.quantize.side_files import copy_side_files, select_side_files
from qwen3_mlx.quantize.staging import check_destination, staging_folder
from qwen3_mlx.quantize.tensor_io import ShardWriter, SourceReader

CHUNK_BYTES = 32 * 2**20  # source bytes per step: bounds memory whatever the tensor size

# A float is NaN or infinite exactly when its exponent bits are all ones. Testing the bits as
# integers costs a fifth of mx.isfinite on the CPU backend.
_EXPONENT_BITS = {
    mx.bfloat16: (mx.uint16, 0x7F80),
    mx.float16: (mx.uint16, 0x7C00),
    mx.float32: (mx.uint32, 0x7F800000),
}


@dataclass(frozen=True)
class ConversionProgress:
    """Where a conversion is: the tensor being written and the counts so far."""

    tensor: str
    tensors_done: int
    tensors_total: int
    bytes_done: int  # source bytes converted
    bytes_total: int


ProgressCallback = Callable[[ConversionProgress], None]


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote."""

    source: Path
    output: Path
    spec: QuantSpec
    dtype: str
    block: dict[str, Any]
    tensors: int  # tensors written
    shards: int
    source_bytes: int
    output_bytes: int
    parameters: int
    seconds: float

    @property
    def bits_per_weight(self) -> float:
        """Output bits per model weight, scales, biases and unquantized norms included."""
        return 8 * self.output_bytes / self.parameters


def quantize_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    spec: QuantSpec | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: ProgressCallback | None = None,
    download_progress: bool = False,
) -> ConversionResult:
    """Write an MLX quantized model folder at output from a bf16/fp16/fp32 or FP8 Qwen3 checkpoint."""
    started = time.perf_counter()
    spec = spec or QuantSpec()
    shard_limit = parse_size(max_shard_size)
    # abspath, not Path.absolute(): "out/.." must name the folder itself, not one called "..".
    output = Path(os.path.abspath(Path(output).expanduser()))
    source_dir = resolve_model_path(source, progress=download_progress)
    check_destination(output, source_dir, force)
    plan = make_plan(source_dir, read_config(source_dir), spec, dtype, shard_limit)
    side_files = select_side_files(source_dir)  # a broken tokenizer file fails before any work
    check_free_space(output.parent, plan.total_size)
    with staging_folder(output, force) as staging:
        write_weights(plan, staging, progress)
        write_config(plan, staging)
        copy_side_files(side_files, staging)
        write_model_card(plan, staging, output.name, str(source), __version__)
        check_output(plan, staging)
    return ConversionResult(
        source=source_dir,
        output=output,
        spec=spec,
        dtype=dtype,
        block=plan.block,
        tensors=sum(len(job.outputs) for job in plan.jobs),
        shards=len(plan.shard_names),
        source_bytes=plan.source_bytes,
        output_bytes=plan.total_size,
        parameters=plan.parameters,
        seconds=time.perf_counter() - started,
    )


class _Tracker:
    """Counts tensors and bytes and reports them to the progress callback."""

    def __init__(self, plan: Plan, callback: ProgressCallback | None):
        self.callback = callback
        self.tensors_total = len(plan.jobs)
        self.bytes_total = plan.source_bytes
        self.tensors_done = 0
        self.bytes_done = 0

    def advance(self, tensor: str, nbytes: int, finished: bool) -> None:
        self.bytes_done += nbytes
        self.tensors_done += finished
        if self.callback is not None:
            self.callback(
                ConversionProgress(
                    tensor, self.tensors_done, self.tensors_total, self.bytes_done, self.bytes_total
                )
            )


def write_weights(plan: Plan, folder: Path, progress: ProgressCallback | None = None) -> None:
    """Write every shard, one at a time, then the index."""
    reader = SourceReader()
    tracker = _Tracker(plan, progress)
    try:
        for shard, jobs in groupby(plan.jobs, key=lambda job: job.shard):
            writer = ShardWriter(folder / plan.shard_names[shard], plan.shard_tensors(shard))
            try:
                for job in jobs:
                    convert_job(job, plan, reader, writer, tracker)
            finally:
                writer.close()
            mx.clear_cache()
    finally:
        reader.close()
    write_index(plan, folder)


def chunk_rows(job: Job, fp8_block: tuple[int, int] | None) -> int:
    """Rows per step: about CHUNK_BYTES, whole FP8 blocks."""
    rows = max(1, CHUNK_BYTES // max(job.source.row_bytes, 1))
    if job.scale_inv is not None and fp8_block is not None:
        rows = max(fp8_block[0], rows // fp8_block[0] * fp8_block[0])
    return rows


def convert_job(
    job: Job, plan: Plan, reader: SourceReader, writer: ShardWriter, tracker: _Tracker
) -> None:
    """Convert one source weight chunk by chunk and write its output tensors."""
    total = job.source.rows
    step = chunk_rows(job, plan.fp8_block)
    for start in range(0, total, step):
        stop = min(start + step, total)
        outputs = convert_rows(job, plan, reader, start, stop)
        for tensor, values in zip(job.outputs, outputs, strict=True):
            writer.write_rows(
                tensor.name, start, values.reshape((stop - start,) + tensor.shape[1:])
            )
        del outputs
        nbytes = (stop - start) * job.source.row_bytes
        if job.scale_inv is not None and stop == total:
            nbytes += job.scale_inv.nbytes
        tracker.advance(job.source.name, nbytes, finished=stop == total)


def convert_rows(
    job: Job, plan: Plan, reader: SourceReader, start: int, stop: int
) -> list[mx.array]:
    """The evaluated output rows [start, stop) of a job: (values,) or (packed, scales, biases)."""
    values = reader.rows(job.source, start, stop)
    if job.scale_inv is not None and plan.fp8_block is not None:
        block_rows = plan.fp8_block[0]
        scale_inv = reader.rows(job.scale_inv, start // block_rows, math.ceil(stop / block_rows))
        values = dequantize_fp8(values, scale_inv, plan.fp8_block, job.source.name, plan.dtype)
    values = values.astype(plan.dtype)
    if job.quantization is not None:
        outputs = list(
            mx.quantize(
                values, group_size=job.quantization["group_size"], bits=job.quantization["bits"]
            )
        )
    else:
        outputs = [values]
    kind, mask = _EXPONENT_BITS[values.dtype]
    bad = ((values.view(kind) & mx.array(mask, dtype=kind)) == mask).any()
    mx.eval(bad, *outputs)
    if bad.item():
        raise CheckpointError(
            f"{job.source.path}: tensor {job.source.name} holds NaN or infinite values"
        )
    return outputs
