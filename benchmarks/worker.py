"""One measurement in a fresh process: `python -m benchmarks.worker '<json spec>'` prints one JSON line.

A fresh process per measurement keeps peak memory and load time separate per engine, and lets
the runner interleave ours and mlx-lm so background load hits both alike. The spec's `openblas`
flag is applied through QWEN3_MLX_OPENBLAS by the runner before this process starts.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

# qwen3_mlx before anything imports mlx: on Linux it binds MLX's BLAS calls to OpenBLAS unless
# QWEN3_MLX_OPENBLAS=0 (the runner sets it per spec); first-party imports sort after mlx, so
# mlx.core is imported inside the functions here.
import qwen3_mlx  # noqa: F401
from benchmarks import conversation
from benchmarks.engines import Ours, make_engine


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    """Random ordinary-token ids (no special tokens), so every engine gets the same prompt."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 150000) for _ in range(length)]


def decode(engine: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s over spec['tokens'] tokens after a short prompt (eos ignored).

    The rate is taken between the first and the last token, so prompt processing is excluded;
    the prompt is one token because mlx-lm's bf16 CPU path takes seconds per prompt token.
    """
    engine.generate(prompt_ids(1, seed=1), engine.new_cache(), 2)  # warm-up
    times = engine.generate(prompt_ids(1), engine.new_cache(), spec["tokens"])
    return {"tok_s": (len(times) - 1) / (times[-1] - times[0]), "tokens": len(times)}


def prefill(engine: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Prefill tok/s: prompt length / time to the first token, on an empty cache."""
    length = spec["prompt"]
    # Warm-up long enough to take qwen3-mlx's prefill path (8+ rows) when the prompt does.
    engine.generate(prompt_ids(min(17, length), seed=1), engine.new_cache(), 1)
    ttft = engine.generate(prompt_ids(length), engine.new_cache(), 1)[0]
    return {"tok_s": length / ttft, "ttft": ttft, "prompt": length}


def chat(engine: Any, spec: dict[str, Any], path: Path) -> dict[str, Any]:
    """TTFT per turn of the scripted thinking conversation (see benchmarks/conversation.py)."""
    turns = spec.get("turns", 8)
    if spec["engine"].startswith("ours"):
        return {"turns": conversation.run_ours(engine, turns)}
    from qwen3_mlx.tokenizer import load_tokenizer

    # Our tokenizer renders the same template to the same ids; it is used for both engines.
    tokenizer = load_tokenizer(path)
    if spec["mode"] == "stripped":
        measured = spec.get("measured", list(range(1, turns + 1)))
        return {"turns": conversation.run_stripped(engine, tokenizer, turns, measured)}
    dtype = spec.get("dtype", "checkpoint")
    filler = Ours(path, "checkpoint" if dtype in ("checkpoint", "auto") else dtype)
    return {"turns": conversation.run_kept(engine, filler, tokenizer, turns)}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load the engine the spec names, run its task, add load time and peak memory."""
    import mlx.core as mx

    from qwen3_mlx.cpu.blas import openblas_active

    path = Path(spec["path"])
    mx.reset_peak_memory()
    engine = make_engine(spec["engine"], path, spec.get("dtype", "auto"))
    load_memory = mx.get_peak_memory()
    task = spec["task"]
    start = time.perf_counter()
    if task == "decode":
        result = decode(engine, spec)
    elif task == "prefill":
        result = prefill(engine, spec)
    elif task == "chat":
        result = chat(engine, spec, path)
    elif task == "load":
        result = {}
    else:
        raise ValueError(f"unknown task {task!r}")
    result.update(
        load_s=engine.load_seconds,
        load_peak_gb=load_memory / 1e9,
        peak_gb=mx.get_peak_memory() / 1e9,
        task_s=time.perf_counter() - start,
        openblas=openblas_active() is not None,
        compute_dtype=str(_dtype_of(engine)),
    )
    return result


def _dtype_of(engine: Any) -> Any:
    # The final norm: 4-bit scales may stay bf16 under float32 compute (the native kernel's).
    return engine.model.model.norm.weight.dtype


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
