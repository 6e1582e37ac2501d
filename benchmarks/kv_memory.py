"""KV bytes per token of each KV setting on the Qwen3-0.6B and Qwen3-4B shapes, ours and mlx-lm's.

Caches of the real configs' shapes are filled with random keys and values (no weights needed) to a
multiple of the 256-token growth step, so no allocated slot is empty; then the nbytes of every array
they hold is counted and compared with qwen3_mlx.cache.kv_bytes_per_token.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import qwen3_mlx  # noqa: F401 (before mlx: OpenBLAS on Linux)
from benchmarks.checkpoints import FIXTURES, SHAPES
from qwen3_mlx.cache import KV_GROUP_SIZE, kv_bytes_per_token, make_cache
from qwen3_mlx.config import ModelArgs

FILL_TOKENS = 512  # a multiple of the 256-token step, so no allocated slot is empty
FILL_CHUNK = 128
# (kv_bits, dtype of the keys and values the model hands the cache)
KV_SETTINGS = [
    (None, "float32"),
    (None, "bfloat16"),
    (8, "float32"),
    (8, "bfloat16"),
    (4, "float32"),
    (4, "bfloat16"),
]
KV_LABELS = {None: "none", 8: "8-bit", 4: "4-bit"}


def shape_args(shape: str) -> ModelArgs:
    """The model arguments of a published Qwen3 config ('0.6b' or '4b')."""
    config = json.loads((FIXTURES / SHAPES[shape] / "config.json").read_text())
    return ModelArgs.from_dict(config)


def fill(cache: list[Any], args: ModelArgs, dtype: Any, tokens: int, quantize: Any = None) -> None:
    """Push random keys and values through every layer's update_and_fetch, chunk by chunk."""
    import mlx.core as mx

    shape = (1, args.num_key_value_heads, FILL_CHUNK, args.head_dim)
    for _ in range(tokens // FILL_CHUNK):
        for layer_cache in cache:
            keys = mx.random.normal(shape).astype(dtype)
            layer_cache.update_and_fetch(keys, mx.random.normal(shape).astype(dtype))
        if quantize is not None:
            quantize(cache)  # mlx-lm converts its cache after each model call
        mx.eval([layer_cache.state for layer_cache in cache])


def cache_bytes(cache: list[Any]) -> int:
    """Bytes of every array the cache holds (what memory it really takes)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arrays = tree_flatten([layer_cache.state for layer_cache in cache])
    return sum(value.nbytes for _, value in arrays if isinstance(value, mx.array))


def measured_per_token(args: ModelArgs, kv_bits: int | None, dtype_name: str, engine: str) -> int:
    """Bytes per token of a filled cache: ours (make_cache) or mlx-lm's (generate's conversion)."""
    import functools

    import mlx.core as mx

    dtype = getattr(mx, dtype_name)
    layers = SimpleNamespace(layers=range(args.num_hidden_layers))
    if engine == "ours":
        cache = make_cache(layers, kv_bits)
        fill(cache, args, dtype, FILL_TOKENS)
    else:
        from mlx_lm.generate import maybe_quantize_kv_cache
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(layers)
        quantize = functools.partial(
            maybe_quantize_kv_cache,
            quantized_kv_start=0,
            kv_group_size=KV_GROUP_SIZE,
            kv_bits=kv_bits,
        )
        fill(cache, args, dtype, FILL_TOKENS, quantize)
    total = cache_bytes(cache)
    del cache
    return total // FILL_TOKENS


def bytes_table() -> list[str]:
    """Markdown rows: KV bytes per token per setting and shape, measured and by formula."""
    lines = [
        "| shape | KV | K/V dtype | ours measured B/token | formula | mlx-lm measured B/token "
        "| GB per 32k tokens | GB per 131k tokens |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = []
    for shape in SHAPES:
        args = shape_args(shape)
        per = {}
        for kv_bits, dtype_name in KV_SETTINGS:
            ours = measured_per_token(args, kv_bits, dtype_name, "ours")
            theirs = measured_per_token(args, kv_bits, dtype_name, "mlx_lm")
            formula = kv_bytes_per_token(args, kv_bits, 4 if dtype_name == "float32" else 2)
            per[(kv_bits, dtype_name)] = ours
            lines.append(
                f"| {shape} | {KV_LABELS[kv_bits]} | {dtype_name} | {ours:,} | {formula:,} "
                f"| {theirs:,} | {ours * 32768 / 1e9:.2f} | {ours * 131072 / 1e9:.2f} |"
            )
        bf16 = per[(None, "bfloat16")]
        ratios.append(
            f"- {shape}: ours, 8-bit / bf16 KV = {per[(8, 'float32')] / bf16:.1%} under the "
            f"float32 CPU policy (bf16 scales), {per[(8, 'bfloat16')] / bf16:.1%} under bf16; "
            f"8-bit / float32 KV = {per[(8, 'float32')] / per[(None, 'float32')]:.1%}; "
            f"4-bit / bf16 = {per[(4, 'float32')] / bf16:.1%}"
        )
    return lines + [""] + ratios


ATTENTION_SETTINGS = ("none", "8-bit", "4-bit", "none mx.fast", "8-bit mlx-lm", "4-bit mlx-lm")


def attention_seconds(args: ModelArgs, context: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of one decode step's attention over every layer at `context` tokens, per KV setting.

    The calls the model makes: qwen3_mlx.cpu.kv_attention on float32 keys and values and on our 8- and
    4-bit caches (bf16 scales; the native kernels when they were built); and, as the peers,
    mx.fast.scaled_dot_product_attention on the float32 cache and mlx-lm's
    quantized_scaled_dot_product_attention on packs with float32 scales (what mlx-lm runs with
    float32 compute). Each layer has its own random cache;
    the settings alternate round by round so background load hits each alike. Round 0 warms up
    and is dropped.
    """
    import time

    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from qwen3_mlx.cpu.kv_attention import float_attention, quantized_attention

    scale = args.head_dim**-0.5
    queries = mx.random.normal((1, args.num_attention_heads, 1, args.head_dim))
    shape = (1, args.num_key_value_heads, context, args.head_dim)
    layers: dict[str, list[Any]] = {setting: [] for setting in ATTENTION_SETTINGS}
    for _ in range(args.num_hidden_layers):
        keys, values = mx.random.normal(shape), mx.random.normal(shape)
        layers["none"].append((keys, values))
        layers["none mx.fast"].append((keys, values))
        for bits in (8, 4):
            ours = make_cache(SimpleNamespace(layers=[0]), bits)[0]
            layers[f"{bits}-bit"].append(ours.update_and_fetch(keys, values))
            pack = tuple(
                mx.quantize(a, group_size=KV_GROUP_SIZE, bits=bits) for a in (keys, values)
            )
            layers[f"{bits}-bit mlx-lm"].append(pack)
        mx.eval([layers[setting][-1] for setting in ATTENTION_SETTINGS])

    def step(setting: str) -> list[Any]:
        if setting == "none":
            return [float_attention(queries, k, v, scale, None) for k, v in layers[setting]]
        if setting == "none mx.fast":
            attend = mx.fast.scaled_dot_product_attention
            return [attend(queries, k, v, scale=scale) for k, v in layers[setting]]
        bits = int(setting[0])
        if setting.endswith("mlx-lm"):
            return [
                quantized_scaled_dot_product_attention(
                    mx.array(queries),
                    k,
                    v,
                    scale=scale,
                    mask=None,
                    group_size=KV_GROUP_SIZE,
                    bits=bits,
                )
                for k, v in layers[setting]
            ]
        return [
            quantized_attention(queries, k, v, scale, None, KV_GROUP_SIZE, bits)
            for k, v in layers[setting]
        ]

    seconds: dict[str, list[float]] = {setting: [] for setting in layers}
    for round_index in range(rounds + 1):
        for setting in layers:
            start = time.perf_counter()
            mx.eval(step(setting))
            if round_index:
                seconds[setting].append(time.perf_counter() - start)
    return seconds


def attention_table(shape: str, context: int, rounds: int) -> list[str]:
    """Markdown rows: decode-step attention time per KV setting (float32 queries, our CPU policy)."""
    import statistics

    seconds = attention_seconds(shape_args(shape), context, rounds)
    base = statistics.median(seconds["none"])
    lines = [
        "| shape | KV | attention ms per decode step (all layers, median) | range | vs unquantized |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for setting, values in seconds.items():
        median = statistics.median(values)
        lines.append(
            f"| {shape} | {setting} | {median * 1e3:.1f} "
            f"| {min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} | {median / base:.1%} |"
        )
    return lines
