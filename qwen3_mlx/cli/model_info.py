"""What `qwen3-mlx info` reports about a model, read from its files without loading the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOATING = {"F64", "F32", "BF16", "F16"}
DTYPE_NAME_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
YARN_DEFAULT_FACTOR = 4.0


def count_parameters(args: Any) -> int:
    """Logical parameters of the architecture (a lazily built model: nothing is allocated)."""
    from mlx.utils import tree_flatten

    from qwen3_mlx.model import Model

    return sum(value.size for _, value in tree_flatten(Model(args).parameters()))


def tensor_headers(model_dir: Path) -> dict[str, dict[str, Any]]:
    """Every tensor's safetensors header entry (dtype, shape, data_offsets) across the shards."""
    from qwen3_mlx.loading import weight_files
    from qwen3_mlx.safetensors_check import read_header

    entries: dict[str, dict[str, Any]] = {}
    for path in weight_files(model_dir):
        entries.update({k: v for k, v in read_header(path).items() if k != "__metadata__"})
    return entries


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def weight_bytes(entries: dict[str, dict[str, Any]], compute_dtype: str | None) -> tuple[int, int]:
    """(bytes on disk, bytes in memory once loaded) of the weights.

    On load, floating tensors (weights, norms, quantization scales) are cast to the compute dtype,
    FP8 weights are dequantized (their scale_inv tensors dropped) and packed integers stay as they are.
    """
    disk = memory = 0
    for name, entry in entries.items():
        start, stop = entry["data_offsets"]
        disk += int(stop) - int(start)
        dtype, numel = entry["dtype"], _numel(entry["shape"])
        if name.endswith("_scale_inv"):
            continue
        if dtype in FLOATING or (dtype.startswith("F8") and name + "_scale_inv" in entries):
            target = DTYPE_NAME_BYTES.get(
                compute_dtype or "", 2 if dtype.startswith("F8") else DTYPE_BYTES[dtype]
            )
            memory += numel * target
        else:
            memory += int(stop) - int(start)
    return disk, memory


def compute_dtype_name(compute_dtype: str) -> str | None:
    """The dtype name 'auto' means on this machine (None: the checkpoint's own)."""
    from qwen3_mlx.loading import resolve_compute_dtype

    dtype = resolve_compute_dtype(compute_dtype)
    return None if dtype is None else str(dtype).rsplit(".", 1)[-1]


def quantization_summary(config: dict[str, Any], source: str) -> dict[str, Any] | None:
    """Bits, group size and per-module overrides of an MLX checkpoint, or the FP8 block; None if neither."""
    from qwen3_mlx.fp8 import fp8_block_size
    from qwen3_mlx.quant import read_quantization

    block = read_quantization(config, source)
    if block is not None:
        overrides = {k: v for k, v in block.items() if isinstance(v, dict)}
        return {
            "method": "mlx-affine",
            "bits": block["bits"],
            "group_size": block["group_size"],
            "overrides": len(overrides),
        }
    fp8 = fp8_block_size(config, source)
    if fp8 is not None:
        return {"method": "fp8", "block": list(fp8)}
    return None


def describe_model(
    path_or_repo: str, *, compute_dtype: str = "auto", rope_factor: float = YARN_DEFAULT_FACTOR
) -> dict[str, Any]:
    """Architecture, size, quantization, memory, context, thinking switches and sampling defaults."""
    from qwen3_mlx.cli.model_files import model_files

    with model_files(path_or_repo) as (model_dir, entries):
        facts = _describe_folder(model_dir, entries, compute_dtype, rope_factor)
    # A folder fetched for the occasion is gone by now: only a lasting one is worth naming.
    return {
        "model": str(path_or_repo),
        "path": str(model_dir) if entries is None else None,
        **facts,
    }


def _describe_folder(
    model_dir: Path, entries: dict[str, Any] | None, compute_dtype: str, rope_factor: float
) -> dict[str, Any]:
    from qwen3_mlx.config import ModelArgs, read_config, yarn_scaling
    from qwen3_mlx.generation_config import NON_THINKING_DEFAULTS, GenerationConfig
    from qwen3_mlx.tokenizer import load_tokenizer

    config = read_config(model_dir)
    source = str(model_dir / "config.json")
    args = ModelArgs.from_dict(config, source)
    dtype_name = compute_dtype_name(compute_dtype)
    disk, memory = weight_bytes(entries or tensor_headers(model_dir), dtype_name)
    generation = GenerationConfig.from_model_dir(model_dir, config)
    tokenizer = load_tokenizer(model_dir, generation.eos_token_ids)
    hybrid = tokenizer.has_thinking_switch
    yarn: int | None = None
    if not args.rope_scaling:
        yarn = args.with_rope_scaling(yarn_scaling(rope_factor)).context_length
        yarn = yarn if yarn > args.context_length else None
    return {
        "architecture": (config.get("architectures") or ["Qwen3ForCausalLM"])[0],
        "layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "attention_heads": f"{args.num_attention_heads} query / {args.num_key_value_heads} key-value",
        "vocab_size": args.vocab_size,
        "parameters": count_parameters(args),
        "tied_embeddings": args.tie_word_embeddings,
        "checkpoint_dtype": config.get("torch_dtype") or config.get("dtype"),
        "quantization": quantization_summary(config, source),
        "weights_bytes_on_disk": disk,
        "weights_bytes_in_memory": memory,
        "compute_dtype": dtype_name or "checkpoint",
        "context_length": args.context_length,
        "context_length_yarn": yarn,
        "yarn_factor": rope_factor if yarn else None,
        "thinking": {
            "hard_switch": hybrid,
            "soft_switch": hybrid,
            "prompt_opens_think": tokenizer.opens_think_in_prompt,
        },
        "generation_defaults": {
            "thinking": {
                "temperature": generation.temperature,
                "top_p": generation.top_p,
                "top_k": generation.top_k,
                "min_p": generation.min_p,
            },
            "non_thinking": dict(NON_THINKING_DEFAULTS) if hybrid else None,
            "eos_token_ids": list(generation.eos_token_ids),
        },
    }
