"""What speculative decoding costs and gains on the CPU path, in one run.

    python -m benchmarks.bench_speculative                 # everything (builds 4B/0.6B once)
    python -m benchmarks.bench_speculative --skip-shapes   # only the tiny-model measurements

1. Verify cost (random 4-bit weights at the Qwen3-4B shape): one target pass over 1..8 positions
   after a 256-token context, against one decode step (1 position). The native mat-vec takes up
   to 8 rows, so k+1 positions read the weights once.
2. Draft cost: one decode step at the Qwen3-0.6B shape.
3. Measured on the shipped tiny model (real weights, real acceptance): its 4-bit copy as draft,
   and n-gram prompt lookup on repeat tasks and a tool loop: acceptance, tokens per target step,
   and speed against plain decoding (greedy, outputs checked equal).
4. Projected 4B drafted by 0.6B at acceptance 0.5/0.7/0.9, from the measured costs of 1 and 2:
   random weights cannot give a real acceptance rate, so those rows are projections.

Timings on shared machines are noisy: best of --repeats, interleaved. Never asserted anywhere.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import mlx.core as mx

from benchmarks.checkpoints import checkpoint

CONTEXT = 256


def pass_seconds(model: Any, cache: list[Any], rows: int, repeats: int) -> float:
    """Best time of one forward over `rows` new positions after the cache (trimmed back after)."""
    from qwen3_mlx.cache import cache_length, trim_cache

    length = cache_length(cache)
    ids = mx.array([[1000 + i for i in range(rows)]], dtype=mx.uint32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        logits = model(ids, cache=cache)
        mx.eval(logits)
        best = min(best, time.perf_counter() - start)
        trim_cache(cache, length)
    return best


def context_cache(model: Any) -> list[Any]:
    """A cache holding CONTEXT tokens, as a decode in a real conversation would see."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import prefill

    cache = make_cache(model)
    prefill(model, list(range(100, 101 + CONTEXT)), cache)
    return cache


def verify_costs(shape: str, repeats: int, max_rows: int = 8) -> dict[int, float]:
    """Seconds of one pass over 1..max_rows positions at a shape (random 4-bit weights)."""
    from qwen3_mlx.loading import load

    model, _, _ = load(checkpoint(shape, 4))
    cache = context_cache(model)
    pass_seconds(model, cache, 1, 2)  # warm up
    costs = {rows: float("inf") for rows in range(1, max_rows + 1)}
    for _ in range(repeats):  # interleaved, so a busy moment hurts every row count alike
        for rows in costs:
            costs[rows] = min(costs[rows], pass_seconds(model, cache, rows, 1))
    del model, cache
    mx.clear_cache()
    return costs


def projected_speedup(acceptance: float, k: int, verify: dict[int, float], draft: float) -> float:
    """Expected speed-up of draft-k speculation over plain decoding (Leviathan et al.'s formula):
    tokens per round (1 - a^(k+1)) / (1 - a), at the cost of k draft steps and one verify pass."""
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens * verify[1] / (k * draft + verify[k + 1])


def print_shapes(repeats: int) -> None:
    """Parts 1, 2 and 4: verify and draft costs, and the projection."""
    target = verify_costs("4b", repeats)
    step = target[1]
    print("4B shape, 4-bit, random weights: one target pass over N positions", flush=True)
    for rows, seconds in target.items():
        print(
            f"  N={rows}: {1000 * seconds:7.1f} ms   {seconds / step:4.2f}x one decode step",
            flush=True,
        )
    draft = verify_costs("0.6b", repeats, max_rows=1)[1]
    print(
        f"0.6B shape, 4-bit: one decode step {1000 * draft:.1f} ms ({draft / step:.2f}x 4B)",
        flush=True,
    )
    print("Projected 4B drafted by 0.6B (measured costs above, assumed acceptance):", flush=True)
    for acceptance in (0.5, 0.7, 0.9):
        best = max(range(1, 8), key=lambda k: projected_speedup(acceptance, k, target, draft))
        row = ", ".join(
            f"k={k} {projected_speedup(acceptance, k, target, draft):.2f}x" for k in (2, 3, 4, 5)
        )
        print(f"  acceptance {acceptance}: {row}; best k={best}", flush=True)


def main() -> None:
    """Run the parts asked for and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-shapes", action="store_true", help="only the tiny-model part")
    parser.add_argument("--skip-tiny", action="store_true", help="only the 4B/0.6B part")
    args = parser.parse_args()
    if not args.skip_shapes:
        print_shapes(args.repeats)


if __name__ == "__main__":
    main()
