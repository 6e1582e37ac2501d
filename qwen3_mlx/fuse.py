"""Load-time fusion of projections that read the same input: q/k/v into one matmul, gate/up into
another.

Each decoder layer then runs 4 matmuls instead of 7. Output rows are independent in a matmul, so
stacking the weights' rows (for 4-bit: the packed words, scales and biases together) gives exactly
the outputs the separate layers gave, side by side. Only the in-memory module tree changes: the
checkpoint format, the quantize converter and mlx-lm compatibility stay as they are. A fused model
must not be saved with `save_weights` (its keys would be qkv_proj / gate_up_proj).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx.cpu_quantized import CpuQuantizedLinear

# Exact classes only: a subclass (LoRA, say) may compute something else than its weights say.
JOINABLE = (nn.Linear, nn.QuantizedLinear, CpuQuantizedLinear)
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def _same(values: Sequence[object]) -> bool:
    return all(value == values[0] for value in values)


def concatenate_linears(layers: Sequence[nn.Module]) -> nn.Module | None:
    """One layer whose output is the layers' outputs side by side, or None if they cannot be joined.

    Joins layers of one class (nn.Linear, nn.QuantizedLinear or CpuQuantizedLinear) without bias
    that agree on input width, dtypes and (quantized) bits, group size and mode.
    """
    kind = type(layers[0])
    if kind not in JOINABLE or any(type(layer) is not kind for layer in layers):
        return None
    if any("bias" in layer for layer in layers):
        return None
    names = ["weight"] if kind is nn.Linear else ["weight", "scales", "biases"]
    for name in names:
        arrays = [layer.get(name) for layer in layers]
        if any(array is None for array in arrays):
            return None
        if not _same([a.dtype for a in arrays]) or not _same([a.shape[1:] for a in arrays]):
            return None
    if kind is nn.Linear:
        fused = nn.Linear(1, 1, bias=False)
        fused.weight = mx.concatenate([layer.weight for layer in layers], axis=0)
        return fused
    settings = [(layer.group_size, layer.bits, layer.mode) for layer in layers]
    if not _same(settings):
        return None
    group_size, bits, mode = settings[0]
    # A tiny stand-in built with the right settings; its (lazy, never evaluated) weights are replaced.
    fused = kind(group_size, 1, bias=False, group_size=group_size, bits=bits, mode=mode)
    for name in names:
        setattr(fused, name, mx.concatenate([layer[name] for layer in layers], axis=0))
    return fused


def _fuse(parent: nn.Module, parts: Sequence[str], fused_name: str) -> bool:
    if fused_name in parent or not all(part in parent for part in parts):
        return False
    fused = concatenate_linears([parent[part] for part in parts])
    if fused is None:
        return False
    for part in parts:
        parent.pop(part)
    setattr(parent, fused_name, fused)
    return True


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj` in every layer; return how many
    groups were fused (a layer whose parts differ in bits or group size keeps them apart)."""
    fused = 0
    for layer in model.layers:
        fused += _fuse(layer.self_attn, QKV, "qkv_proj")
        fused += _fuse(layer.mlp, GATE_UP, "gate_up_proj")
    return fused


def is_fused(model: nn.Module) -> bool:
    """Whether any layer of the model runs fused projections."""
    return any(
        "qkv_proj" in layer.self_attn or "gate_up_proj" in layer.mlp for layer in model.layers
    )
