"""The two engines under test behind one small interface: qwen3-mlx and mlx-lm.

Both load the same folder and run on the same backend. Each engine generates with its own public
generator (qwen3_mlx.generate.generate_tokens, mlx_lm.generate.generate_step), greedy, eos ignored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlx.core as mx

FEED_CHUNK = 512


def feed(model: Any, ids: list[int], cache: list[Any]) -> None:
    """Run tokens through a model only to fill its cache (untimed set-up, no sampling)."""
    for start in range(0, len(ids), FEED_CHUNK):
        model(mx.array(ids[start : start + FEED_CHUNK], dtype=mx.uint32)[None], cache=cache)
        mx.eval([c.state for c in cache])


class Ours:
    """qwen3-mlx: qwen3_mlx.load with a compute-dtype policy, generate_tokens."""

    name = "qwen3-mlx"

    def __init__(self, path: Path, dtype: str = "auto", threads: int | None = None):
        start = time.perf_counter()  # imports included: each engine pays for what it imports
        import qwen3_mlx.cpu.quantized
        from qwen3_mlx.loading import load

        if threads is not None:
            qwen3_mlx.cpu.quantized.THREADS = threads

        self.model, self.tokenizer, _ = load(path, compute_dtype=dtype)
        self.load_seconds = time.perf_counter() - start

    def new_cache(self) -> list[Any]:
        """An empty KV cache."""
        from qwen3_mlx.cache import make_cache

        return make_cache(self.model)

    def generate(self, prompt: list[int], cache: list[Any], max_tokens: int) -> list[float]:
        """Seconds from the call to each of max_tokens greedy tokens."""
        from qwen3_mlx.generate import generate_tokens

        start = time.perf_counter()
        times = []
        for _ in generate_tokens(self.model, prompt, cache, max_tokens=max_tokens):
            times.append(time.perf_counter() - start)
        return times


class MlxLm:
    """mlx-lm: mlx_lm.load (checkpoint dtype, or cast to float32 for a same-dtype run), generate_step."""

    name = "mlx-lm"

    def __init__(self, path: Path, dtype: str = "checkpoint"):
        start = time.perf_counter()
        from mlx_lm import load

        self.model, self.tokenizer = load(str(path))
        if dtype not in ("checkpoint", "auto"):
            # set_dtype casts every floating parameter (weights, norms, 4-bit scales and biases),
            # the same set qwen3-mlx's compute dtype covers.
            self.model.set_dtype(getattr(mx, dtype))
            mx.eval(self.model.parameters())
        self.load_seconds = time.perf_counter() - start

    def new_cache(self) -> list[Any]:
        """An empty KV cache."""
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def generate(self, prompt: list[int], cache: list[Any], max_tokens: int) -> list[float]:
        """Seconds from the call to each of max_tokens greedy tokens."""
        from mlx_lm.generate import generate_step

        start = time.perf_counter()
        times = []
        steps = generate_step(
            mx.array(prompt, dtype=mx.uint32), self.model, max_tokens=max_tokens, prompt_cache=cache
        )
        for _ in steps:
            times.append(time.perf_counter() - start)
        return times


def make_engine(engine: str, path: Path, dtype: str) -> Ours | MlxLm:
    """An engine by name ('ours' or 'mlx_lm') with a dtype ('auto'/'checkpoint'/a dtype name)."""
    if engine == "ours":
        return Ours(path, dtype)
    if engine == "ours_1thread":
        return Ours(path, dtype, threads=1)
    if engine == "mlx_lm":
        return MlxLm(path, dtype)
    raise ValueError(f"unknown engine {engine!r}")
