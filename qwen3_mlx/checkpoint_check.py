"""A checkpoint held against its config, written once for `load` and `info`: sizes from the
safetensors headers before anything is built, then every tensor's name, shape and dtype kind, and
(at load) every value finite."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.dtypes import SAFETENSORS_FLOATING, SAFETENSORS_FP8, dtype_name
from qwen3_mlx.errors import CheckpointError, ConfigError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class TensorInfo(NamedTuple):
    """What the checks compare: a tensor's shape, its dtype's name, and whether that is floating."""

    shape: tuple[int, ...]
    dtype: str
    floating: bool


def check_sizes(args: ModelArgs, entries: dict[str, dict[str, Any]], source: str) -> None:
    """Refuse a config whose sizes disagree with the weights' headers, before any model is built."""
    indices = {int(match.group(1)) for name in entries if (match := _LAYER.match(name))}
    layers = max(indices) + 1 if indices else 0
    if args.num_hidden_layers != layers:
        raise ConfigError(
            f"{source}: num_hidden_layers is {args.num_hidden_layers:,}, "
            f"but the weights hold {layers} layers"
        )
    # Output rows (axis 0) are the same whether a weight is plain, FP8 or packed 4-bit.
    rules = [
        ("model.embed_tokens.weight", args.vocab_size, "vocab_size"),
        ("model.norm.weight", args.hidden_size, "hidden_size"),
        ("model.layers.0.mlp.gate_proj.weight", args.intermediate_size, "intermediate_size"),
        ("model.layers.0.self_attn.q_norm.weight", args.head_dim, "head_dim"),
        (
            "model.layers.0.self_attn.q_proj.weight",
            args.num_attention_heads * args.head_dim,
            "num_attention_heads x head_dim",
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            args.num_key_value_heads * args.head_dim,
            "num_key_value_heads x head_dim",
        ),
    ]
    for name, expected, what in rules:
        shape = entries.get(name, {}).get("shape")
        if shape and int(shape[0]) != expected:
            raise ConfigError(
                f"{source}: {what} is {expected:,}, but {name} has {int(shape[0]):,} rows"
            )


def model_tensors(model: nn.Module) -> dict[str, TensorInfo]:
    """The tensors a (lazily built) model expects: names, shapes, dtype kinds."""
    return {
        name: TensorInfo(tuple(value.shape), dtype_name(value.dtype), _floating(value.dtype))
        for name, value in tree_flatten(model.parameters())
    }


def array_tensors(weights: dict[str, mx.array]) -> dict[str, TensorInfo]:
    """The same facts of loaded (lazy) arrays."""
    return {
        name: TensorInfo(tuple(value.shape), dtype_name(value.dtype), _floating(value.dtype))
        for name, value in weights.items()
    }


def header_tensors(entries: dict[str, dict[str, Any]]) -> dict[str, TensorInfo]:
    """The same facts from safetensors headers, as they will be once loaded (FP8 dequantized)."""
    found = {}
    for name, entry in entries.items():
        if name.endswith("_scale_inv"):
            continue  # FP8 multipliers: folded into their weight on load
        dtype = entry["dtype"]
        floating = dtype in SAFETENSORS_FLOATING or (
            dtype in SAFETENSORS_FP8 and name + "_scale_inv" in entries
        )
        found[name] = TensorInfo(tuple(int(size) for size in entry["shape"]), dtype, floating)
    return found


def _floating(dtype: mx.Dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating)


def _first(names: list[str]) -> str:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{names[0]}{more}"


def check_tensors(
    expected: dict[str, TensorInfo], found: dict[str, TensorInfo], where: str | Path
) -> None:
    """Every expected tensor present with its exact shape and kind of dtype, and nothing left over."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{where}: tensor {_first(missing)} is missing")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {_first(unexpected)}")
    for name, want in expected.items():
        have = found[name]
        if have.shape != want.shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {have.shape}, expected {want.shape}"
            )
        if have.floating != want.floating:
            kind = "floating point" if want.floating else f"packed {want.dtype}"
            raise CheckpointError(
                f"{where}: tensor {name} is stored as {have.dtype}, expected {kind}"
            )


def evaluate_finite(named: list[tuple[str, mx.array]], where: str | Path) -> None:
    """Evaluate the arrays, and refuse any floating one holding NaN or infinity, by name.

    One reduction per tensor, evaluated with the tensor itself: it reads the values once more
    while they are fresh, instead of letting garbage logits show the fault much later.
    """
    checked = [(name, value) for name, value in named if _floating(value.dtype)]
    flags = [mx.isfinite(value).all() for _, value in checked]
    mx.eval([value for _, value in named], flags)
    if flags and not mx.stack(flags).all().item():
        bad = next(name for (name, _), flag in zip(checked, flags, strict=True) if not flag.item())
        raise CheckpointError(f"{where}: tensor {bad} holds NaN or infinite values")
