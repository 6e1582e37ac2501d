"""Megatron-style tensor parallelism for the Qwen3 model over an mx.distributed group.

Every rank holds 1/N of each layer. q/k/v and gate/up are split by output rows, so each rank
computes its own heads and its own slice of the MLP's hidden units with no communication; o_proj
and down_proj are split by input columns, so each rank's product is a partial sum of the full
output and one `all_sum` per block half restores it (two per layer). With fewer KV heads than
ranks, each KV head is held by N / kv_heads ranks (replicated), so every rank's query heads find
their KV head locally.

The embedding is split by vocabulary rows: a lookup takes the rows a rank holds (zeros for the
others) and an `all_sum` assembles them; the output head computes the logits of a rank's vocabulary
slice and an `all_gather` joins them. Keeping both whole would save that one gather per step but
hold 155M parameters (26 %) of a 0.6B model on every rank.

A plan names, for each module, which slice of the checkpoint tensor a rank keeps. The loader uses
the same plan to read only those bytes from the safetensors files (shard_loading.py), and
`shard_model` uses it to cut a model already in memory. This module imports mlx only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.model import Model


class ShardingError(Qwen3Error):
    """The model cannot be split over this many ranks."""


@dataclass(frozen=True)
class Slice:
    """Part `index` of `count` equal parts along `axis` (0: output rows, 1: input columns)."""

    axis: int
    index: int
    count: int


def check_split(args: ModelArgs, ranks: int) -> None:
    """ShardingError unless every split the plan makes is even for this config and group size."""
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    if heads % ranks:
        raise ShardingError(
            f"{heads} attention heads do not split evenly over {ranks} ranks; use a number of "
            f"ranks that divides {heads}"
        )
    if kv_heads % ranks and ranks % kv_heads:
        raise ShardingError(
            f"{kv_heads} KV heads cannot be split or replicated over {ranks} ranks; use a number "
            f"of ranks that divides {kv_heads} or is a multiple of it"
        )
    if args.intermediate_size % ranks:
        raise ShardingError(
            f"intermediate_size {args.intermediate_size} does not split evenly over {ranks} ranks"
        )


def shard_plan(
    args: ModelArgs, rank: int, ranks: int, split_vocabulary: bool = True
) -> dict[str, Slice]:
    """Module path -> the slice this rank keeps; modules not named (norms) stay whole.

    split_vocabulary=False keeps the embedding and head whole on every rank (as does a vocabulary
    that does not divide evenly).
    """
    check_split(args, ranks)
    rows, columns = Slice(0, rank, ranks), Slice(1, rank, ranks)
    kv_parts = min(args.num_key_value_heads, ranks)
    kv_rows = Slice(0, rank * kv_parts // ranks, kv_parts)  # replicated when kv_parts < ranks
    plan: dict[str, Slice] = {}
    for index in range(args.num_hidden_layers):
        attention, mlp = f"model.layers.{index}.self_attn", f"model.layers.{index}.mlp"
        plan[f"{attention}.q_proj"] = rows
        plan[f"{attention}.k_proj"] = kv_rows
        plan[f"{attention}.v_proj"] = kv_rows
        plan[f"{attention}.o_proj"] = columns
        plan[f"{mlp}.gate_proj"] = rows
        plan[f"{mlp}.up_proj"] = rows
        plan[f"{mlp}.down_proj"] = columns
    if split_vocabulary and args.vocab_size % ranks == 0:
        plan["model.embed_tokens"] = rows
        if not args.tie_word_embeddings:
            plan["lm_head"] = rows
    return plan


def part_bounds(length: int, piece: Slice, what: str) -> tuple[int, int]:
    """[start, stop) of the piece along an axis of `length`; ShardingError when it is uneven."""
    if length % piece.count:
        raise ShardingError(f"{what}: {length} does not split into {piece.count} equal parts")
    size = length // piece.count
    return piece.index * size, (piece.index + 1) * size


def take_part(array: mx.array, piece: Slice, what: str) -> mx.array:
    """The piece of a 2-D parameter (dense, packed 4-bit, scales or biases); 1-D ones stay whole."""
    if array.ndim < 2 and piece.axis == 1:
        return array  # a bias of a column-split layer: added once, after the sum (none in Qwen3)
    start, stop = part_bounds(array.shape[piece.axis], piece, what)
    return array[start:stop] if piece.axis == 0 else array[:, start:stop]


def all_sum(x: mx.array, group: Any) -> mx.array:
    """The sum of x over the group (every rank gets it)."""
    return mx.distributed.all_sum(x, group=group)


def gather_last_axis(x: mx.array, group: Any) -> mx.array:
    """Concatenate every rank's x along the last axis, in rank order."""
    # all_gather joins along axis 0, so the vocabulary axis is moved there and back.
    joined = mx.distributed.all_gather(mx.moveaxis(x, -1, 0), group=group)
    return mx.moveaxis(joined, 0, -1)


def _matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for a dense or quantized layer (the CPU kernels of cpu_quantized on the CPU)."""
    if "scales" not in layer:
        from qwen3_mlx.cpu.dense import matmul  # a bf16 weight read in place for float32 x

        return matmul(x, layer["weight"])
    if mx.default_device() == mx.cpu:
        from qwen3_mlx.cpu.quantized import quantized_matmul

        return quantized_matmul(layer, x)
    return mx.quantized_matmul(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class VocabShard(nn.Module):
    """Rows [start, start + rows) of a (possibly quantized) [vocab, hidden] matrix."""

    # The model's compute dtype where a bf16 table stays bf16 (the loader's choice): lookups are
    # widened to it.
    compute_dtype: mx.Dtype | None = None

    def __init__(self, layer: nn.Module, piece: Slice, group: Any, what: str):
        super().__init__()
        for name in ("weight", "scales", "biases"):
            if name in layer:
                setattr(self, name, take_part(layer[name], piece, what))
        self.rows = self["weight"].shape[0]
        self.start = piece.index * self.rows
        self.group = group
        self.group_size = getattr(layer, "group_size", None)
        self.bits = getattr(layer, "bits", None)
        self.mode = getattr(layer, "mode", "affine")

    def _logits(self, x: mx.array) -> mx.array:
        return gather_last_axis(_matmul(self, x), self.group)


class ShardedEmbedding(VocabShard):
    """An embedding split by vocabulary rows: lookup + all_sum; as_linear = local logits + gather."""

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids.astype(mx.int32) - self.start
        inside = (local >= 0) & (local < self.rows)
        local = mx.where(inside, local, 0)
        if "scales" in self:
            rows = mx.dequantize(
                self["weight"][local],
                self["scales"][local],
                self["biases"][local] if "biases" in self else None,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        else:
            rows = self["weight"][local]
            if self.compute_dtype is not None:
                rows = rows.astype(self.compute_dtype)
        # Exactly one rank holds each id, so the sum adds zeros to the one real row: exact.
        return all_sum(mx.where(inside[..., None], rows, 0), self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        """The logits for hidden states x (the embedding used as the output layer)."""
        return self._logits(x)


class ShardedHead(VocabShard):
    """An untied output head split by vocabulary rows: local logits, then a gather."""

    def __call__(self, x: mx.array) -> mx.array:
        return self._logits(x)


def shard_model(model: Model, group: Any, split_vocabulary: bool = True) -> dict[str, Slice]:
    """Split a Qwen3 Model in place over group (its parameters may be lazy); return the plan."""
    ranks, rank = group.size(), group.rank()
    plan = shard_plan(model.args, rank, ranks, split_vocabulary)
    if ranks == 1:
        return plan
    modules = dict(model.named_modules())
    for path, piece in plan.items():
        if path in ("model.embed_tokens", "lm_head"):
            continue
        layer = modules[path]
        for name in ("weight", "scales", "biases"):
            if name in layer:
                setattr(layer, name, take_part(layer[name], piece, path))
    kv_parts = min(model.args.num_key_value_heads, ranks)
    for block in model.layers:
        block.self_attn.n_heads //= ranks
        block.self_attn.n_kv_heads //= kv_parts
        block.self_attn.group = group
        block.mlp.group = group
    if "model.embed_tokens" in plan:
        embedding = model.model.embed_tokens
        model.model.embed_tokens = ShardedEmbedding(
            embedding, plan["model.embed_tokens"], group, "model.embed_tokens"
        )
    if "lm_head" in plan:
        model.lm_head = ShardedHead(model.lm_head, plan["lm_head"], group, "lm_head")
    return plan
