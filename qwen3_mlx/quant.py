"""The one quantization rule: which modules get how many bits, and the config.json block.

Both the loader and the `quantize` converter call this module, so a converted model always loads
and mlx-lm reads the same block (`"quantization": {"group_size", "bits", <per-module overrides>}`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx.errors import QuantizationError

ALLOWED_BITS = (2, 3, 4, 5, 6, 8)
ALLOWED_GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed_4_6")

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class QuantSpec:
    """Affine group quantization settings: bits per weight and weights per group."""

    bits: int = 4
    group_size: int = 64
    recipe: str = "uniform"

    def __post_init__(self) -> None:
        if self.bits not in ALLOWED_BITS:
            raise QuantizationError(
                f"unsupported bits {self.bits}: choose one of {', '.join(map(str, ALLOWED_BITS))}"
            )
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise QuantizationError(
                f"unsupported group size {self.group_size}: choose one of "
                f"{', '.join(map(str, ALLOWED_GROUP_SIZES))}"
            )
        if self.recipe not in RECIPES:
            raise QuantizationError(
                f"unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}"
            )


def _more_bits(path: str, num_layers: int, tied: bool) -> bool:
    """mixed_4_6: v_proj and down_proj in the first and last eighth of layers, and the output embedding."""
    if path == "lm_head" or (tied and path == "model.embed_tokens"):
        return True
    if not path.endswith(("self_attn.v_proj", "mlp.down_proj")):
        return False
    match = _LAYER_INDEX.search(path + ".")
    if match is None:
        return False
    index, eighth = int(match.group(1)), max(num_layers // 8, 1)
    return index < eighth or index >= num_layers - eighth


def module_quantization(
    path: str, module: nn.Module, spec: QuantSpec, num_layers: int, tied: bool
) -> dict[str, int] | None:
    """Bits and group size for one module, or None when it stays in full precision.

    Linear and Embedding layers are quantized when their input width divides into groups; norms
    never are (they have no to_quantized).
    """
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        return None
    if module.weight.shape[-1] % spec.group_size:
        return None
    bits = spec.bits
    if spec.recipe == "mixed_4_6":
        bits = 6 if _more_bits(path, num_layers, tied) else 4
    return {"group_size": spec.group_size, "bits": bits}


def quantize_model(model: nn.Module, spec: QuantSpec) -> dict[str, Any]:
    """Quantize a full-precision model in place; return its config.json quantization block."""
    num_layers = len(model.layers)
    tied = bool(model.args.tie_word_embeddings)
    base_bits = 4 if spec.recipe == "mixed_4_6" else spec.bits
    block: dict[str, Any] = {"group_size": spec.group_size, "bits": base_bits}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, int]:
        params = module_quantization(path, module, spec, num_layers, tied)
        if params is None:
            return False
        if params["bits"] != base_bits:
            block[path] = dict(params)  # mlx-lm reads per-module overrides from the same block
        return params

    nn.quantize(model, class_predicate=predicate)
    return block


def read_quantization(config: dict[str, Any], source: str = "config.json") -> dict[str, Any] | None:
    """The MLX quantization block of a config, validated; None for a full-precision model."""
    block = config.get("quantization")
    if block is None:
        return None
    if not isinstance(block, dict) or "bits" not in block or "group_size" not in block:
        raise QuantizationError(f"{source}: 'quantization' must hold 'group_size' and 'bits'")
    mode = block.get("mode", "affine")
    if mode != "affine":
        raise QuantizationError(
            f"{source}: quantization mode {mode!r} is not supported (affine only)"
        )
    for params in [block] + [v for v in block.values() if isinstance(v, dict)]:
        if (
            params.get("bits") not in ALLOWED_BITS
            or params.get("group_size") not in ALLOWED_GROUP_SIZES
        ):
            raise QuantizationError(
                f"{source}: unsupported quantization bits={params.get('bits')} "
                f"group_size={params.get('group_size')}"
            )
    return block


def write_quantization(config: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """A copy of config with the block under both keys mlx-community checkpoints carry."""
    out = {key: value for key, value in config.items() if key != "quantization_config"}
    out["quantization"] = dict(block)
    out["quantization_config"] = dict(block)
    return out


def apply_checkpoint_quantization(
    model: nn.Module, block: dict[str, Any], weight_names: set[str]
) -> None:
    """Turn the modules a quantized checkpoint stores packed into quantized modules, before loading."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, int]:
        if isinstance(block.get(path), dict):
            return {"group_size": block[path]["group_size"], "bits": block[path]["bits"]}
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        if f"{path}.scales" not in weight_names:
            return False
        return {"group_size": block["group_size"], "bits": block["bits"]}

    nn.quantize(model, class_predicate=predicate)


def cast_floating(model: nn.Module, dtype: mx.Dtype, keep: set[str] = frozenset()) -> None:
    """Cast every floating-point parameter (weights, norms, scales, biases) to dtype; packed ints
    stay, and so do the parameters named in keep (`model.layers.0.mlp.up_proj.scales`)."""
    from mlx.utils import tree_map_with_path

    def cast(path: str, value: Any) -> Any:
        if (
            isinstance(value, mx.array)
            and mx.issubdtype(value.dtype, mx.floating)
            and path not in keep
        ):
            return value.astype(dtype)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))
