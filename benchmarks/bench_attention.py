"""One decode step's attention over a float32 KV cache: the native kernel beside mx.fast's.

    python -m benchmarks.bench_attention                 # 0.6B and 4B heads, 64/1,024/4,096 tokens
    python -m benchmarks.bench_attention --rounds 15 --contexts 64,1024
    python -m benchmarks.bench_attention --layers 28 --contexts 129,1024,4096   # cold, as a model
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

With --layers N each path cycles through N caches of its own, one per call, and a round's calls
are evaluated together (no sync between them, as a model's layers run), so every call reads a
cache the previous N - 1 calls have pushed out of the CPU's caches (28 for Qwen3-0.6B): the
memory-bound case. Without it the one cache stays in L2 or L3.

With --builds A.so B.so (decode only) each build of the extension is a path of its own, loaded
side by side in this process and called directly (`decode_attention`), so a change to the kernel
is timed against the build before it in alternating rounds:

    python -m benchmarks.bench_attention --layers 28 --calls 28 --rounds 30 --contexts 129,4096 \
        --builds /tmp/before.so qwen3_mlx/_native_mlx_*.so
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import qwen3_mlx  # noqa: F401  (binds OpenBLAS before mlx is imported)

SHAPES = {"0.6b": (16, 8), "4b": (32, 8)}  # query heads, KV heads
HEAD_DIM = 128
GROWTH = 256  # mlx-lm's KVCache grows its allocation in steps of this many tokens


PEER_LIMIT = 1024  # the longest context mx.fast's masked prefill path is timed at


def paths(
    query_heads: int,
    kv_heads: int,
    context: int,
    queries_count: int = 1,
    layers: int = 1,
    builds: dict[str, Any] | None = None,
) -> dict[str, Callable[[], object]]:
    """The attention calls over `layers` random caches of `context` tokens each, one cache per
    call in turn (the last `queries_count` tokens the queries: causal when more than one)."""
    calls = [
        one_cache(query_heads, kv_heads, context, queries_count, builds) for _ in range(layers)
    ]
    rotating = {}
    for name in calls[0]:
        turn = itertools.cycle([layer[name] for layer in calls])
        rotating[name] = lambda turn=turn: next(turn)()
    return rotating


def one_cache(
    query_heads: int,
    kv_heads: int,
    context: int,
    queries_count: int,
    builds: dict[str, Any] | None = None,
) -> dict[str, Callable[[], object]]:
    """The attention calls over one random cache of `context` tokens: the model's path (or each
    build's decode_attention) and mx.fast's."""
    import mlx.core as mx

    from qwen3_mlx.cpu.kv_attention import THREADS, float_attention

    capacity = (context // GROWTH + 1) * GROWTH
    keys = mx.random.normal((1, kv_heads, capacity, HEAD_DIM))
    values = mx.random.normal((1, kv_heads, capacity, HEAD_DIM))
    queries = mx.random.normal((1, query_heads, queries_count, HEAD_DIM))
    mx.eval(keys, values, queries)
    k, v = keys[..., :context, :], values[..., :context, :]
    scale = HEAD_DIM**-0.5
    mask = "causal" if queries_count > 1 else None
    if builds:
        calls: dict[str, Callable[[], object]] = {
            name: lambda module=module: module.decode_attention(queries, k, v, scale, THREADS)
            for name, module in builds.items()
        }
    else:
        calls = {"native": lambda: float_attention(queries, k, v, scale, mask)}
    calls["mx.fast"] = lambda: mx.fast.scaled_dot_product_attention(
        queries, k, v, scale=scale, mask=mask
    )
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


def best_microseconds(
    calls: dict[str, Callable[[], object]], rounds: int, count: int, together: bool = False
) -> dict:
    """Microseconds per call of each path, best of `rounds` alternating rounds (the order
    reversed every other round); together: a round's calls in one mx.eval."""
    import mlx.core as mx

    best = {name: float("inf") for name in calls}
    for round_index in range(rounds):
        order = list(calls.items())
        for name, call in order if round_index % 2 == 0 else order[::-1]:
            mx.eval(call())  # warm: first-use self-test, pool threads, caches
            start = time.perf_counter()
            if together:
                mx.eval([call() for _ in range(count)])
            else:
                for _ in range(count):
                    mx.eval(call())
            best[name] = min(best[name], (time.perf_counter() - start) / count * 1e6)
    return best


def load_builds(paths: list[str]) -> dict[str, Any]:
    """Each extension build at `paths`, loaded as a module of its own: "build 1", "build 2", ..."""
    from qwen3_mlx.cpu.native import load_build

    modules = {}
    for index, path in enumerate(paths, 1):
        modules[f"build {index}"] = load_build(path)
        print(f"build {index}: {path}")
    return modules


def main(argv: list[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="64,1024,4096")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--prefill", type=int, default=0, help="a causal chunk of N queries")
    parser.add_argument("--verify", type=int, default=0, help="a verify pass of N positions")
    parser.add_argument("--layers", type=int, default=1, help="cycle through N caches (cold)")
    parser.add_argument("--builds", nargs="+", default=[], help="extension .so files (decode)")
    options = parser.parse_args(argv)
    if options.builds and (options.prefill or options.verify):
        parser.error("--builds times the decode attention only (no --prefill or --verify)")
    if options.verify:
        print_verify(options)
        return

    from qwen3_mlx.cpu.kv_attention import THREADS, native_float_attention

    module = native_float_attention()
    where = f"ISA {module.isa()}, {THREADS} thread(s)" if module else "native kernel unavailable"
    what = f"causal {options.prefill}-token chunk" if options.prefill else "decode"
    layers = "one layer" if options.layers == 1 else f"{options.layers} layers in turn (cold)"
    print(f"float32 {what} attention, {layers}, {where}, load average {os.getloadavg()[0]:.1f}")
    builds = load_builds(options.builds) if options.builds else None
    natives = list(builds) if builds else ["native"]
    print(
        f"| shape | tokens | {' | '.join(f'{name} us' for name in natives)} | mx.fast us "
        f"| mx.fast / {natives[-1]} |"
    )
    print("| --- | ---: |" + " ---: |" * (len(natives) + 2))
    for shape, (query_heads, kv_heads) in SHAPES.items():
        for context in map(int, options.contexts.split(",")):
            calls = paths(
                query_heads, kv_heads, context, max(1, options.prefill), options.layers, builds
            )
            best = best_microseconds(calls, options.rounds, options.calls, options.layers > 1)
            peer = best.get("mx.fast")
            ratio = "" if peer is None else f"{peer / best[natives[-1]]:.1f}x"
            cells = " | ".join(f"{best[name]:.0f}" for name in natives)
            print(
                f"| {shape} | {context:,} | {cells} "
                f"| {'not run' if peer is None else f'{peer:.0f}'} | {ratio} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
