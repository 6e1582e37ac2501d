"""One decode step's attention over a float32 KV cache: the native kernel beside mx.fast's.

    python -m benchmarks.bench_attention                 # 0.6B and 4B heads, 64/1,024/4,096 tokens
    python -m benchmarks.bench_attention --rounds 15 --contexts 64,1024
    python -m benchmarks.bench_attention --prefill 512 --contexts 512,4096,16384 --rounds 2 --calls 1
    python -m benchmarks.bench_attention --verify 5 --contexts 133,4096 --calls 5

With --verify N it times a speculative verify pass's attention: N query positions, causal, at the
end of the context. What the model runs (the decode kernels take up to
`kv_attention.DECODE_POSITIONS` positions) beside the native prefill kernel, which took such
chunks before; over a float32 cache and an 8-bit one (whose prefill path dequantizes the layer
first).

With --prefill N it times the causal attention of an N-token prompt chunk instead (the queries at
the end of the context, as a chunked prefill runs them): the native prefill kernel, and mx.fast's
masked path only up to 1,024 tokens (on a fresh install it runs through MLX's reference BLAS and
takes minutes beyond).

One layer's attention for one query position (head_dim 128, float32) over a cache of T tokens
held as mlx-lm's KVCache holds it: a view of a larger allocation, sliced along T. Each round
times `--calls` calls of each path, one `mx.eval` per call, the two paths alternating so
background load hits both alike; the table shows microseconds per call, best round. The native
path is `qwen3_mlx.cpu.kv_attention.float_attention` (what the model calls, with its thread count);
the peer is `mx.fast.scaled_dot_product_attention`. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import qwen3_mlx  # noqa: F401  (binds OpenBLAS before mlx is imported)

SHAPES = {"0.6b": (16, 8), "4b": (32, 8)}  # query heads, KV heads
HEAD_DIM = 128
GROWTH = 256  # mlx-lm's KVCache grows its allocation in steps of this many tokens


PEER_LIMIT = 1024  # the longest context mx.fast's masked prefill path is timed at


def paths(
    query_heads: int, kv_heads: int, context: int, queries_count: int = 1
) -> dict[str, Callable[[], object]]:
    """The two attention calls over one random cache of `context` tokens (the last
    `queries_count` of them the queries: causal when more than one)."""
    import mlx.core as mx

    from qwen3_mlx.cpu.kv_attention import float_attention

    capacity = (context // GROWTH + 1) * GROWTH
    keys = mx.random.normal((1, kv_heads, capacity, HEAD_DIM))
    values = mx.random.normal((1, kv_heads, capacity, HEAD_DIM))
    queries = mx.random.normal((1, query_heads, queries_count, HEAD_DIM))
    mx.eval(keys, values, queries)
    k, v = keys[..., :context, :], values[..., :context, :]
    scale = HEAD_DIM**-0.5
    mask = "causal" if queries_count > 1 else None
    calls = {
        "native": lambda: float_attention(queries, k, v, scale, mask),
        "mx.fast": lambda: mx.fast.scaled_dot_product_attention(
            queries, k, v, scale=scale, mask=mask
        ),
    }
    if queries_count > 1 and context > PEER_LIMIT:
        del calls["mx.fast"]
    return calls


def verify_paths(query_heads: int, kv_heads: int, context: int, positions: int) -> dict:
    """A verify pass's attention over float32 and 8-bit caches: the model's path and the native
    prefill kernel."""
    import mlx.core as mx

    from qwen3_mlx.cpu import kv_attention

    prefill = kv_attention.native_prefill_attention()
    keys = mx.random.normal((1, kv_heads, context, HEAD_DIM))
    values = mx.random.normal((1, kv_heads, context, HEAD_DIM))
    queries = mx.random.normal((1, query_heads, positions, HEAD_DIM))
    packed = [mx.quantize(a, group_size=64, bits=8) for a in (keys, values)]
    mx.eval(keys, values, queries, packed)
    scale = HEAD_DIM**-0.5

    def dequantized_prefill():
        k, v = (kv_attention._dequantized(p, mx.float32, 64, 8) for p in packed)
        return prefill.prefill_attention(queries, k, v, scale, kv_attention.THREADS)

    return {
        "float32": lambda: kv_attention.float_attention(queries, keys, values, scale, "causal"),
        "float32, prefill kernel": lambda: prefill.prefill_attention(
            queries, keys, values, scale, kv_attention.THREADS
        ),
        "8-bit": lambda: kv_attention.quantized_attention(queries, *packed, scale, "causal", 64, 8),
        "8-bit, dequantized + prefill kernel": dequantized_prefill,
    }


def print_verify(options: argparse.Namespace) -> None:
    """--verify N: the table of a verify pass's attention."""
    print(
        f"{options.verify}-position causal attention (a verify pass), one layer, "
        f"load average {os.getloadavg()[0]:.1f}; microseconds per call, best of {options.rounds}"
    )
    print("| shape | tokens | float32 | its prefill kernel | 8-bit | dequantized + prefill |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for shape, (query_heads, kv_heads) in SHAPES.items():
        for context in map(int, options.contexts.split(",")):
            calls = verify_paths(query_heads, kv_heads, context, options.verify)
            best = best_microseconds(calls, options.rounds, options.calls)
            cells = " | ".join(f"{value:.0f}" for value in best.values())
            print(f"| {shape} | {context:,} | {cells} |", flush=True)


def best_microseconds(calls: dict[str, Callable[[], object]], rounds: int, count: int) -> dict:
    """Microseconds per call of each path, best of `rounds` alternating rounds."""
    import mlx.core as mx

    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            mx.eval(call())  # warm: first-use self-test, pool threads, caches
            start = time.perf_counter()
            for _ in range(count):
                mx.eval(call())
            best[name] = min(best[name], (time.perf_counter() - start) / count * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="64,1024,4096")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--prefill", type=int, default=0, help="a causal chunk of N queries")
    parser.add_argument("--verify", type=int, default=0, help="a verify pass of N positions")
    options = parser.parse_args(argv)
    if options.verify:
        print_verify(options)
        return

    from qwen3_mlx.cpu.kv_attention import THREADS, native_float_attention

    module = native_float_attention()
    where = f"ISA {module.isa()}, {THREADS} thread(s)" if module else "native kernel unavailable"
    what = f"causal {options.prefill}-token chunk" if options.prefill else "decode"
    print(f"float32 {what} attention, one layer, {where}, load average {os.getloadavg()[0]:.1f}")
    print("| shape | tokens | native us | mx.fast us | mx.fast / native |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape, (query_heads, kv_heads) in SHAPES.items():
        for context in map(int, options.contexts.split(",")):
            calls = paths(query_heads, kv_heads, context, max(1, options.prefill))
            best = best_microseconds(calls, options.rounds, options.calls)
            peer = best.get("mx.fast")
            ratio = "" if peer is None else f"{peer / best['native']:.1f}x"
            print(
                f"| {shape} | {context:,} | {best['native']:.0f} "
                f"| {'not run' if peer is None else f'{peer:.0f}'} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
