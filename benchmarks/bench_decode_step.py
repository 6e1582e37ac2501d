"""Where one CPU decode step's time goes: the mat-vecs, the small ops, Python and MLX's graph.

    QWEN3_MLX_OPENBLAS=0 python -m benchmarks.bench_decode_step [--shape 0.6b] [--steps 40]
    QWEN3_MLX_OPENBLAS=0 python -m benchmarks.bench_decode_step --compare 10   # fused against separate
    QWEN3_MLX_OPENBLAS=0 python -m benchmarks.bench_decode_step --compare-int8 8   # int8 x against float32

Random 4-bit weights at the real shape (benchmarks/checkpoints.py), float32 compute, a 64-token
context, greedy. It reports:

* the step's graph: nodes per primitive (every node is a Python call, an MLX node to encode and,
  for most, a task for the stream thread);
* the main thread's CPU per step: building the graph (Python) and encoding it (`mx.async_eval`),
  measured with thread CPU time inside the overlapped loop `generate_tokens` runs;
* CPU and wall time of parts run alone on fixed inputs: every mat-vec of a step (the native
  4-bit calls), the native small ops (norms, RoPE, attention, SwiGLU), the sampling;
* the cost per graph node of a chain of 1,000 MLX adds and of 1,000 native RMSNorms (1,024
  floats each), which is nearly all dispatch.

--compare N runs only the decode loop, N rounds alternating in one process: the step as it runs
(two native nodes per decoder layer, qwen3_mlx/cpu/layer.py, and the native token lookup) against
the separate ops it replaced, each round on a fresh cache; it prints the median and best wall time
of each. --compare-int8 N does the same for int8 x in the mat-vecs (the default where AVX-512
VNNI runs) against float32 x (QWEN3_MLX_NATIVE_INT8=0). Alternating in one process keeps a busy
moment of a shared machine from favouring either.

On 2 cores the mat-vec keeps both busy, so every CPU millisecond spent elsewhere, overlapped or
not, costs about half a millisecond of the step: CPU time is the figure that adds up (and the
one that stays readable on a shared, loaded machine). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable

import mlx.core as mx

CONTEXT = 64


def per_step(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(process CPU ms, wall ms) per call of function, after one warm-up call."""
    function()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        function()
    return (
        (time.process_time() - cpu) / repeats * 1e3,
        (time.perf_counter() - wall) / repeats * 1e3,
    )


def graph_nodes(output: mx.array) -> Counter[str]:
    """Nodes of output's graph, by primitive."""
    dot = io.StringIO()
    mx.export_to_dot(dot, output)
    return Counter(label.split()[0] for label in re.findall(r'label ?="([^"]*)"', dot.getvalue()))


def main_thread(model, cache, steps: int) -> dict[str, float]:
    """The loop of generate_tokens with the main thread's CPU split into build and encode."""
    from qwen3_mlx.generate import SamplingStep

    sample = SamplingStep()
    token = sample(model(mx.array([[5]], dtype=mx.uint32), cache=cache)[:, -1, :])
    mx.async_eval(token)
    build = encode = 0.0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        start = time.thread_time()
        following = sample(model(token[None], cache=cache)[:, -1, :])
        built = time.thread_time()
        mx.async_eval(following)
        build, encode = build + built - start, encode + time.thread_time() - built
        token.item()
        token = following
    token.item()
    return {
        "build": build / steps * 1e3,
        "encode": encode / steps * 1e3,
        "process": (time.process_time() - cpu) / steps * 1e3,
        "wall": (time.perf_counter() - wall) / steps * 1e3,
    }


def parts(model, cache, repeats: int) -> dict[str, tuple[float, float]]:
    """(CPU ms, wall ms) of the step's parts, each run alone on fixed, evaluated inputs."""
    from qwen3_mlx.cpu import ops as cpu_ops
    from qwen3_mlx.cpu.kv_attention import float_attention
    from qwen3_mlx.cpu.quantized import project
    from qwen3_mlx.generate import SamplingStep

    args, layers = model.args, model.layers
    heads, kv_heads, head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    x = mx.random.normal((1, 1, args.hidden_size))
    inner = mx.random.normal((1, 1, args.intermediate_size))
    attended = mx.random.normal((1, 1, heads * head_dim))
    q, k = mx.random.normal((1, heads, 1, head_dim)), mx.random.normal((1, kv_heads, 1, head_dim))
    logits = mx.random.normal((1, args.vocab_size))
    keys, values = (part[..., :CONTEXT, :] for part in (cache[0].keys, cache[0].values))
    mx.eval(x, inner, attended, q, k, logits)

    def matvecs() -> None:
        outputs = [model.model.embed_tokens.as_linear(x)]
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            outputs += project(x, attention.q_proj, attention.k_proj, attention.v_proj)
            outputs += project(x, mlp.gate_proj, mlp.up_proj)
            outputs += [attention.o_proj(attended), mlp.down_proj(inner)]
        mx.eval(outputs)

    def small_ops() -> None:
        outputs = []
        for layer in layers:
            attention = layer.self_attn
            outputs += [layer.input_layernorm(x), layer.post_attention_layernorm(x)]
            outputs += [attention.rope(attention.q_norm(q), offset=CONTEXT)]
            outputs += [attention.rope(attention.k_norm(k), offset=CONTEXT)]
            outputs += [float_attention(q, keys, values, attention.scale, None)]
            outputs += [cpu_ops.swiglu(inner, inner)]
        mx.eval(outputs)

    sample = SamplingStep()
    return {
        "mat-vecs alone": per_step(matvecs, repeats),
        "native small ops alone": per_step(small_ops, repeats),
        "sampling alone": per_step(lambda: mx.eval(sample(logits)), repeats),
    }


def per_node(repeats: int = 5, length: int = 1000) -> dict[str, float]:
    """Wall microseconds per node of a chain of MLX adds and of native RMSNorms (build + eval)."""
    from qwen3_mlx.cpu import ops as cpu_ops

    x, weight = mx.random.normal((1, 1, 1024)), mx.ones((1024,))
    mx.eval(x, weight)
    chains = {
        "MLX add": lambda y: y + 1.0,
        "native rms_norm": lambda y: cpu_ops.rms_norm(y, weight, 1e-6),
    }
    costs = {}
    for name, op in chains.items():
        best = float("inf")
        for _ in range(repeats):
            start, y = time.perf_counter(), x
            for _ in range(length):
                y = op(y)
            mx.eval(y)
            best = min(best, time.perf_counter() - start)
        costs[name] = best / length * 1e6
    return costs


def alternating(
    model, setups: dict[str, Callable[[], None]], rounds: int, steps: int
) -> dict[str, list[dict[str, float]]]:
    """The decode loop after each setup in turn, for `rounds` rounds, each on a fresh cache:
    every round's figures per setup."""
    from qwen3_mlx.cache import make_cache

    results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            setup()
            cache = make_cache(model)
            model(mx.arange(100, 100 + CONTEXT, dtype=mx.uint32)[None], cache=cache)
            mx.eval([c.state for c in cache])
            results[name].append(main_thread(model, cache, steps))
    return results


def fused_against_separate(model, rounds: int, steps: int) -> dict[str, list[dict[str, float]]]:
    """The decode loop with the fused layers and native lookup, and with the separate ops."""
    from qwen3_mlx.cpu import layer, quantized

    fused, rows = layer.decode_step, quantized._native_rows

    def use(step, lookup) -> Callable[[], None]:
        def setup() -> None:
            layer.decode_step, quantized._native_rows = step, lookup

        return setup

    setups = {
        "fused": use(fused, rows),
        "separate ops": use(lambda *args, **kwargs: None, lambda layer: None),
    }
    try:
        return alternating(model, setups, rounds, steps)
    finally:
        layer.decode_step, quantized._native_rows = fused, rows


def int8_against_float32(model, rounds: int, steps: int) -> dict[str, list[dict[str, float]]]:
    """The decode loop with int8 x in the mat-vecs (the default where VNNI runs) and with float32
    x (QWEN3_MLX_NATIVE_INT8=0, read per step)."""
    before = os.environ.get("QWEN3_MLX_NATIVE_INT8")
    setups = {
        f"{name} x": lambda value=value: os.environ.update(QWEN3_MLX_NATIVE_INT8=value)
        for name, value in (("int8", "1"), ("float32", "0"))
    }
    try:
        return alternating(model, setups, rounds, steps)
    finally:
        os.environ.pop("QWEN3_MLX_NATIVE_INT8", None)
        if before is not None:
            os.environ["QWEN3_MLX_NATIVE_INT8"] = before


def main() -> None:
    """Measure one shape and print the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b", choices=["0.6b", "4b"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument(
        "--compare", type=int, default=0, metavar="N", help="fused against separate ops, N rounds"
    )
    parser.add_argument(
        "--compare-int8",
        type=int,
        default=0,
        metavar="N",
        help="int8 against float32 x in the mat-vecs, N rounds",
    )
    args = parser.parse_args()
    os.environ.setdefault("QWEN3_MLX_OPENBLAS", "0")
    from benchmarks.checkpoints import checkpoint
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import greedy
    from qwen3_mlx.loading import load

    model, _, _ = load(checkpoint(args.shape, 4), compute_dtype="auto")
    cache = make_cache(model)
    model(mx.arange(100, 100 + CONTEXT, dtype=mx.uint32)[None], cache=cache)
    mx.eval([c.state for c in cache])
    print(f"{args.shape}, load average {os.getloadavg()[0]:.1f}")
    if args.compare or args.compare_int8:
        pairs = (
            fused_against_separate(model, args.compare, args.steps)
            if args.compare
            else int8_against_float32(model, args.compare_int8, args.steps)
        )
        for name, runs in pairs.items():
            wall = [run["wall"] for run in runs]
            print(
                f"{name}: {statistics.median(wall):.2f} ms a step (median of {len(runs)}), best "
                f"{min(wall):.2f}; main thread {statistics.median([r['build'] + r['encode'] for r in runs]):.2f} ms CPU"
            )
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        return
    nodes = graph_nodes(greedy(model(mx.array([[5]], dtype=mx.uint32), cache=cache)[:, -1, :]))
    for c in cache:
        c.offset = CONTEXT
    common = ", ".join(f"{name} {count}" for name, count in nodes.most_common(8))
    print(f"graph nodes per step: {sum(nodes.values())} ({common}, ...)")
    loop = main_thread(model, cache, args.steps)
    print(
        f"decode loop: {loop['wall']:.1f} ms wall and {loop['process']:.1f} ms CPU per step; main "
        f"thread CPU {loop['build']:.2f} ms building the graph, {loop['encode']:.2f} ms encoding it"
    )
    for c in cache:
        c.offset = CONTEXT
    for name, (cpu, wall) in parts(model, cache, max(args.steps // 2, 5)).items():
        print(f"{name}: {cpu:.2f} ms CPU, {wall:.2f} ms wall")
    costs = per_node()
    print("per graph node (wall): " + ", ".join(f"{k} {v:.1f} us" for k, v in costs.items()))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
