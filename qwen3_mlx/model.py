"""The Qwen3 dense transformer in MLX. Attribute names equal the checkpoint keys."""

from __future__ import annotations

from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.cpu import layer as cpu_layer
from qwen3_mlx.cpu import ops as cpu_ops
from qwen3_mlx.cpu.dense import project
from qwen3_mlx.cpu.kv_attention import float_attention, quantized_attention
from qwen3_mlx.cpu.ops import RMSNorm, swiglu
from qwen3_mlx.rope import RoPE


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE."""

    group: Any = (
        None  # set by parallel.sharding.shard_model: o_proj then holds this rank's input columns
    )

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, head_dim = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(D, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, D, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        offset = cache.offset if cache is not None else 0
        q, k = self._norm_rope(q, k, offset)
        # [B, L, Hkv * head_dim] -> [B, Hkv, L, head_dim]: for one position the same memory, so
        # a reshape alone (each graph node of a decode step costs more than its arithmetic).
        if L == 1:
            v = v.reshape(B, self.n_kv_heads, 1, -1)
        else:
            v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if hasattr(cache, "bits"):
            # A quantized KV cache hands back packed (weights, scales, biases): attention runs on
            # them in place, never dequantizing the whole cache.
            out = quantized_attention(q, k, v, self.scale, mask, cache.group_size, cache.bits)
        else:
            # The fused kernel handles GQA (fewer kv heads) without repeating k and v.
            out = float_attention(q, k, v, self.scale, mask)
        out = self.o_proj((out if L == 1 else out.transpose(0, 2, 1, 3)).reshape(B, L, -1))
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)

    def _norm_rope(self, q: mx.array, k: mx.array, offset: Any) -> tuple[mx.array, mx.array]:
        """q, k [B, L, H * head_dim] -> RoPE(RMSNorm(head)) as [B, H, L, head_dim]."""
        if self.rope.dims == self.head_dim and q.dtype == mx.float32:
            # One native op on the CPU: a decode step's graph has 6 fewer nodes per layer.
            fused = cpu_ops.qk_norm_rope(
                q,
                k,
                (self.q_norm, self.k_norm),
                self.rope.inverse_frequencies(),
                offset,
                self.rope.attention_factor,
            )
            if fused is not None:
                return fused
        B, L, _ = q.shape
        # [B, L, H * head_dim] -> [B, H, L, head_dim]; the norms act per head.
        q = self.q_norm(q.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        return self.rope(q, offset=offset), self.rope(k, offset=offset)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    group: Any = (
        None  # set by parallel.sharding.shard_model: down_proj then holds this rank's input columns
    )

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        out = self.down_proj(swiglu(*project(x, self.gate_proj, self.up_proj)))
        return out if self.group is None else mx.distributed.all_sum(out, group=self.group)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h, delta = self.sublayers(x, self.input_layernorm(x), mask, cache)
        return h + delta

    def sublayers(
        self, x: mx.array, normed: mx.array, mask: Any = None, cache: Any = None
    ) -> tuple[mx.array, mx.array]:
        """(h, mlp(norm(h))) for h = x + attention(normed), normed = input_layernorm(x): the
        block's output is their sum, which Qwen3Model adds together with the next norm."""
        # h and its norm: one native op on the CPU (bit for bit the add and the norm).
        h, normed = cpu_ops.add_rms_norm(
            x, self.self_attn(normed, mask, cache), self.post_attention_layernorm
        )
        return h, self.mlp(normed)


class Qwen3Model(nn.Module):
    """Embedding, the decoder blocks and the final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = causal_mask(h.shape[1], cache[0])
        normed = self.layers[0].input_layernorm(h) if self.layers else h
        # One row of 1 to 8 positions on the CPU (a decode step, a speculative verify pass):
        # two native nodes per layer where they apply (causal among the positions).
        fused = cpu_layer.decode_step(self.layers, self.norm, h, normed, cache)
        if fused is not None:
            return fused
        for index, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            h, delta = layer.sublayers(h, normed, mask, layer_cache)
            # Each block's residual add comes with the next norm (one native op on the CPU).
            following = (
                self.layers[index + 1].input_layernorm
                if index + 1 < len(self.layers)
                else self.norm
            )
            h, normed = cpu_ops.add_rms_norm(h, delta, following)
        return normed if self.layers else self.norm(h)


class CausalLM(Protocol):
    """What the engine asks of a model: Model, and rank 0's LeaderModel under mlx.launch."""

    args: ModelArgs

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array: ...

    @property
    def layers(self) -> list[Any]: ...


class Model(nn.Module):
    """Qwen3ForCausalLM: token ids [B, L] -> logits [B, L, vocab]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        """The decoder blocks (mlx-lm's cache helpers look for this)."""
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop tensors the module tree has no place for (a tied lm_head)."""
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            for suffix in ("scales", "biases"):
                weights.pop(f"lm_head.{suffix}", None)
        return weights


def causal_mask(L: int, cache: Any) -> Any:
    """The attention mask for L new tokens: none for one token, else the fused causal mode."""
    if isinstance(cache, BatchKVCache):
        # Left-padded rows decoded together: each row masks its own padding.
        return cache.make_mask(L)
    if L == 1:
        return None
    # "causal" lets the kernel align the lower-right corner, so it holds with a cache offset too.
    return "causal"
