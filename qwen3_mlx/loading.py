"""Find a model (local folder or Hugging Face repo), read its weights in any supported format,
and build the MLX model, tokenizer and generation config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen3_mlx.config import ModelArgs, read_config
from qwen3_mlx.cpu_quantized import use_cpu_kernels
from qwen3_mlx.errors import CheckpointError, ModelNotFoundError, QuantizationError
from qwen3_mlx.fp8 import dequantize_fp8_weights, fp8_block_size
from qwen3_mlx.fuse import fuse_projections
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.model import Model
from qwen3_mlx.quant import (
    QuantSpec,
    apply_checkpoint_quantization,
    cast_floating,
    quantize_model,
    read_quantization,
)
from qwen3_mlx.safetensors_check import read_header
from qwen3_mlx.tokenizer import Tokenizer, read_hf_tokenizer_in_background

# What a snapshot download fetches: weights, configs, tokenizer and template; never code.
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "merges.txt",
    "LICENSE*",
    "README.md",
]

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return not name.startswith((".", "/", "~")) and len(parts) == 2 and all(parts)


def resolve_model_path(path_or_repo: str | Path, *, progress: bool = False) -> Path:
    """A local model folder, or a Hugging Face repo id fetched (or found in the HF cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or not _is_repo_id(name):
        raise ModelNotFoundError(f"{name}: no such model folder (nor a Hugging Face repo id 'owner/name')")
    if path.parent.is_dir():
        # "models/typo" beside an existing ./models folder is a mistyped path, not a Hub repo.
        raise ModelNotFoundError(f"{name}: no such model folder (./{path.parent} exists but holds no {path.name})")
    return download_model(name, progress=progress)


def download_model(repo_id: str, *, progress: bool = True) -> Path:
    """Snapshot-download only the files a model needs; the HF cache answers offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # The cache first: works offline and avoids a network round trip for a model we have.
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    with hub_errors(repo_id, "download failed"):
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=MODEL_FILE_PATTERNS,
                tqdm_class=None if progress else _silent_progress_class(),
            )
        )


@contextmanager
def hub_errors(repo_id: str, failed: str) -> Iterator[None]:
    """Turn huggingface_hub's errors about repo_id into one-line ModelNotFoundErrors.

    `failed` names the action for the catch-all ("download failed", "cannot read the repo").
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id}: gated repo; accept its license and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such Hugging Face repo (or it is private)") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline?)"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise ModelNotFoundError(f"{repo_id}: {failed} ({type(error).__name__}: {error})") from None


def _silent_progress_class() -> type:
    """huggingface_hub's tqdm, always disabled (library code never prints).

    snapshot_download drives its bars through the whole tqdm API (total, refresh, set_description,
    thread locks), so a hand-written stand-in breaks downloads; a disabled real bar does not.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class SilentProgress(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentProgress


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights (pickle .bin files are never loaded)")
    return files


def read_weights(model_dir: Path) -> dict[str, mx.array]:
    """Every tensor of the checkpoint, lazily mapped (nothing is read until evaluated)."""
    weights: dict[str, mx.array] = {}
    for path in weight_files(model_dir):
        read_header(path)
        try:
            weights.update(mx.load(str(path)))
        except Exception as error:  # mlx raises RuntimeError/ValueError with a C++ message
            raise CheckpointError(f"{path}: cannot be read as safetensors ({error})") from None
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array], model_dir: Path) -> None:
    """Every parameter present with its exact shape, and nothing left over."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]} is missing{more}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{model_dir}: unexpected tensor {unexpected[0]}{more}")
    for name, param in expected.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointError(
                f"{model_dir}: tensor {name} has shape {tuple(weights[name].shape)}, "
                f"expected {tuple(param.shape)}"
            )


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
        if compute_dtype not in DTYPES:
            raise QuantizationError(f"unknown compute dtype {compute_dtype!r}: use auto, checkpoint, {', '.join(DTYPES)}")
        return DTYPES[compute_dtype]
    return compute_dtype


def load_model(
    model_dir: Path,
    *,
    rope_scaling: dict[str, Any] | None = None,
    quantize_on_load: int | QuantSpec | None = None,
    compute_dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
    fuse: bool = False,
) -> tuple[Model, dict[str, Any]]:
    """Build the model from a folder in any of the three formats; return it with its config dict.

    fuse=True joins q/k/v and gate/up into single matmuls (qwen3_mlx.fuse): same logits, but the
    module tree no longer matches the checkpoint keys, so a fused model must not be saved.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    source = str(model_dir / "config.json")
    args = ModelArgs.from_dict(config, source)
    if rope_scaling is not None:
        args = args.with_rope_scaling(rope_scaling)
    block = read_quantization(config, source)
    fp8_block = None if block is not None else fp8_block_size(config, source)
    model = Model(args)
    weights = model.sanitize(read_weights(model_dir))
    if fp8_block is not None:
        weights = dequantize_fp8_weights(weights, fp8_block)
    if block is not None:
        if quantize_on_load is not None:
            raise QuantizationError(f"{model_dir}: already quantized; quantize_on_load needs a full-precision model")
        apply_checkpoint_quantization(model, block, set(weights))
    check_weights(model, weights, model_dir)
    model.load_weights(list(weights.items()), strict=True)
    # Only the model may keep the loaded arrays: then evaluation frees each checkpoint tensor as
    # soon as its cast or quantized copy exists, so loading peaks near the final size, not at 2x.
    del weights
    if quantize_on_load is not None:
        spec = quantize_on_load if isinstance(quantize_on_load, QuantSpec) else QuantSpec(bits=int(quantize_on_load))
        quantize_model(model, spec)
    dtype = resolve_compute_dtype(compute_dtype)
    if dtype is not None:
        cast_floating(model, dtype)
    if fuse:
        fuse_projections(model)
    use_cpu_kernels(model)  # quantized layers on the CPU backend: threaded decode, GEMM prefill
    if not lazy:
        # A layer at a time, so each checkpoint tensor is freed as soon as its cast or quantized
        # copy exists: loading peaks near the final size, not at both sizes together. The rest
        # (embedding, output head, final norm) goes first, while the layers hold no memory yet:
        # the embedding's cast is the largest single tensor. Few, long evaluations (each releases
        # the GIL) let the tokenizer load on its thread meanwhile.
        outside = [v for k, v in tree_flatten(model.parameters()) if not k.startswith("model.layers.")]
        mx.eval(outside)
        for layer in model.model.layers:
            mx.eval(layer.parameters())
    model.eval()
    return model, config


def load(
    path_or_repo: str | Path,
    *,
    rope_scaling: dict[str, Any] | None = None,
    quantize_on_load: int | QuantSpec | None = None,
    compute_dtype: str | mx.Dtype | None = "auto",
    lazy: bool = False,
    # Off by default: on the CPU backend it measured 0.98-1.07x (noise); docs/benchmarks.md.
    fuse: bool = False,
) -> tuple[Model, Tokenizer, GenerationConfig]:
    """Load a Qwen3 model, its tokenizer and its generation config from a folder or repo id."""
    model_dir = resolve_model_path(path_or_repo)
    hf_tokenizer = read_hf_tokenizer_in_background(model_dir)  # overlaps the weight reads
    model, config = load_model(
        model_dir,
        rope_scaling=rope_scaling,
        quantize_on_load=quantize_on_load,
        compute_dtype=compute_dtype,
        lazy=lazy,
        fuse=fuse,
    )
    generation_config = GenerationConfig.from_model_dir(model_dir, config)
    tokenizer = Tokenizer(hf_tokenizer.result(), generation_config.eos_token_ids)
    return model, tokenizer, generation_config
