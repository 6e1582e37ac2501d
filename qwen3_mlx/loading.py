"""Find a model (local folder or Hugging Face repo), read its weights in any supported format,
and build the MLX model, tokenizer and generation config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen3_mlx.checkpoint_check import (
    array_tensors,
    check_sizes,
    check_tensors,
    evaluate_finite,
    model_tensors,
)
from qwen3_mlx.config import ModelArgs, read_config
from qwen3_mlx.cpu.dense import use_dense_kernels, weights_read_in_place
from qwen3_mlx.cpu.quantized import scales_read_in_place, use_cpu_kernels
from qwen3_mlx.dtypes import COMPUTE_DTYPES
from qwen3_mlx.errors import CheckpointError, QuantizationError
from qwen3_mlx.fp8 import dequantize_fp8_weights, fp8_block_size
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.hub import (  # noqa: F401 (re-exported: the loader's public names)
    MODEL_FILE_PATTERNS,
    download_model,
    hub_errors,
    local_folder,
)
from qwen3_mlx.model import Model
from qwen3_mlx.quant import (
    QuantSpec,
    apply_checkpoint_quantization,
    cast_floating,
    quantize_model,
    read_quantization,
)
from qwen3_mlx.safetensors_check import tensor_headers, weight_files
from qwen3_mlx.tokenizer import Tokenizer, read_hf_tokenizer_in_background


def resolve_model_path(path_or_repo: str | Path, *, progress: bool = False) -> Path:
    """A local model folder, or a Hugging Face repo id fetched (or found in the HF cache)."""
    folder = local_folder(path_or_repo)
    return folder if folder is not None else download_model(str(path_or_repo), progress=progress)


def _mlx_path(path: Path) -> str:
    """The path as MLX's C++ loader takes it: UTF-8 only (other bytes make it throw bad_cast)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise CheckpointError(
            f"{shown}: the path is not valid UTF-8, which MLX cannot open; rename the folder"
        ) from None
    return str(path)


def read_weights(model_dir: Path, files: list[Path] | None = None) -> dict[str, mx.array]:
    """Every tensor of the checkpoint, lazily mapped (nothing is read until evaluated)."""
    weights: dict[str, mx.array] = {}
    for path in files or weight_files(Path(model_dir)):
        try:
            weights.update(mx.load(_mlx_path(path)))
        except CheckpointError:
            raise
        except Exception as error:  # mlx raises RuntimeError/ValueError with a C++ message
            raise CheckpointError(f"{path}: cannot be read as safetensors ({error})") from None
    return weights


def default_compute_dtype() -> mx.Dtype | None:
    """float32 on the CPU backend (its quantized matmul is ~10x faster there); the checkpoint's dtype on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def resolve_compute_dtype(compute_dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """Turn 'auto' / 'checkpoint' / a dtype name into a dtype (None keeps the checkpoint's)."""
    if compute_dtype is None or compute_dtype == "checkpoint":
        return None
    if compute_dtype == "auto":
        return default_compute_dtype()
    if isinstance(compute_dtype, str):
        if compute_dtype not in COMPUTE_DTYPES:
            raise QuantizationError(
                f"unknown compute dtype {compute_dtype!r}: "
                f"use auto, checkpoint, {', '.join(COMPUTE_DTYPES)}"
            )
        return COMPUTE_DTYPES[compute_dtype]
    return compute_dtype


def load_model(
    model_dir: Path,
    *,
    rope_scaling: dict[str, Any] | None = None,
    quantize_on_load: int | QuantSpec | None = None,
    compute_dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
) -> tuple[Model, dict[str, Any]]:
    """Build the model from a folder in any of the three formats; return it with its config dict.

    lazy=False evaluates every weight now and refuses one holding NaN or infinity; lazy=True
    leaves both to the first forward pass.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    source = str(model_dir / "config.json")
    args = ModelArgs.from_dict(config, source)
    if rope_scaling is not None:
        args = args.with_rope_scaling(rope_scaling)
    model = _model_with_weights(model_dir, config, args, quantize_on_load is not None)
    if quantize_on_load is not None:
        spec = (
            quantize_on_load
            if isinstance(quantize_on_load, QuantSpec)
            else QuantSpec(bits=int(quantize_on_load))
        )
        quantize_model(model, spec)
    dtype = resolve_compute_dtype(compute_dtype)
    # Quantized layers on the CPU backend: native or threaded decode, GEMM prefill. Before the
    # cast: the native kernel reads the checkpoint's scales in place, so those keep their dtype.
    use_cpu_kernels(model, dtype)
    # Dense bf16 weights under float32 compute: the native kernel reads them as they are, so they
    # are never widened to a float32 copy (qwen3_mlx/cpu/dense.py).
    use_dense_kernels(model, dtype)
    if dtype is not None:
        keep = scales_read_in_place(model) | weights_read_in_place(model)
        cast_floating(model, dtype, keep=keep)
    if not lazy:
        _evaluate(model, model_dir)
    model.eval()
    return model, config


def _model_with_weights(
    model_dir: Path, config: dict[str, Any], args: ModelArgs, quantize_on_load: bool
) -> Model:
    """The model built for the checkpoint's format, its (lazy) weights checked and loaded."""
    source = str(model_dir / "config.json")
    block = read_quantization(config, source)
    fp8_block = None if block is not None else fp8_block_size(config, source)
    if block is not None and quantize_on_load:
        raise QuantizationError(
            f"{model_dir}: already quantized; quantize_on_load needs a full-precision model"
        )
    files = weight_files(model_dir)
    # Sizes first, from the headers alone: a config claiming 10,000,000 layers stops here, before
    # building a model that would take all memory.
    check_sizes(args, tensor_headers(files), source)
    model = Model(args)
    weights = model.sanitize(read_weights(model_dir, files))
    if fp8_block is not None:
        weights = dequantize_fp8_weights(weights, fp8_block)
    if block is not None:
        apply_checkpoint_quantization(model, block, set(weights))
    check_tensors(model_tensors(model), array_tensors(weights), model_dir)
    model.load_weights(list(weights.items()), strict=True)
    # Only the model may keep the loaded arrays: then evaluation frees each checkpoint tensor as
    # soon as its cast or quantized copy exists, so loading peaks near the final size, not at 2x.
    return model


def _evaluate(model: Model, model_dir: Path) -> None:
    """Evaluate the weights a layer at a time, refusing non-finite values by tensor name.

    A layer at a time, so each checkpoint tensor is freed as soon as its cast or quantized copy
    exists: loading peaks near the final size, not at both sizes together. The rest (embedding,
    output head, final norm) goes first, while the layers hold no memory yet: the embedding's cast
    is the largest single tensor. Few, long evaluations (each releases the GIL) let the tokenizer
    load on its thread meanwhile.
    """
    params = tree_flatten(model.parameters())
    evaluate_finite([(k, v) for k, v in params if not k.startswith("model.layers.")], model_dir)
    for index, layer in enumerate(model.model.layers):
        named = [(f"model.layers.{index}.{k}", v) for k, v in tree_flatten(layer.parameters())]
        evaluate_finite(named, model_dir)


def load(
    path_or_repo: str | Path,
    *,
    rope_scaling: dict[str, Any] | None = None,
    quantize_on_load: int | QuantSpec | None = None,
    compute_dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
) -> tuple[Model, Tokenizer, GenerationConfig]:
    """Load a Qwen3 model, its tokenizer and its generation config from a folder or repo id.

    Under mlx.launch, rank 0 loads through parallel.distributed.load_for_group instead.
    """
    model_dir = resolve_model_path(path_or_repo)
    # transformers reads config.json too, on the tokenizer's thread, and grinds for minutes over
    # a 10,000,000-layer one: the config is checked before that thread starts.
    ModelArgs.from_dict(read_config(model_dir), str(model_dir / "config.json"))
    hf_tokenizer = read_hf_tokenizer_in_background(model_dir)  # overlaps the weight reads
    model, config = load_model(
        model_dir,
        rope_scaling=rope_scaling,
        quantize_on_load=quantize_on_load,
        compute_dtype=compute_dtype,
        lazy=lazy,
    )
    generation_config = GenerationConfig.from_model_dir(model_dir, config)
    return model, Tokenizer(hf_tokenizer.result()), generation_config
