"""CPU 4-bit decode: the native kernel beside MLX's own, mlx-lm and llama.cpp, and the memory limit.

    python -m benchmarks.bench_cpu_kernel           # bandwidth, 4B matrices, 0.6B and 4B decode
    python -m benchmarks.bench_cpu_kernel --quick   # bandwidth, matrices, 0.6B decode only
    python -m benchmarks.bench_cpu_kernel --skip-matrices --repeats 3 --engines "ours (native kernel,llama"

In one run it prints:
1. the machine's read bandwidth (AVX2 loads on 1 and 2 threads, numpy sum): the limit;
2. GB/s of weight bytes (packed words + scales + biases) per Qwen3-4B matrix, for the native
   kernel (float32 x, and its int8 variant, the default where the CPU has AVX-512 VNNI) and
   mx.quantized_matmul with float32 and bfloat16 scales. The native kernel cycles over more than
   1.2 GB of copies so every read comes from DRAM, not the (large) L3;
3. decode tok/s of random-weight 0.6B and 4B 4-bit checkpoints (benchmarks/checkpoints.py):
   ours (native kernel, float and int8 x; and with QWEN3_MLX_NATIVE=0, the default before it),
   mlx-lm (checkpoint bf16, and cast to float32) and llama.cpp (llama-cpp-python, GGUF Q4_0 of the same
   weights via benchmarks/gguf_q4.py) when it is installed. Each engine runs in a fresh process,
   once per pass; `--repeats N` makes N passes over the engines and shows the best of each (the
   machine is shared; compare ratios). Timings are never asserted anywhere.
Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import qwen3_mlx  # noqa: F401  (binds OpenBLAS before mlx is imported)
from benchmarks.checkpoints import checkpoint
from benchmarks.run import ROOT, machine, run_worker

# Qwen3-4B (K -> N): the per-layer projections and the tied head
MATRICES = {
    "q": (2560, 4096),
    "k/v": (2560, 1024),
    "o": (4096, 2560),
    "gate/up": (2560, 9728),
    "down": (9728, 2560),
    "head": (2560, 151_936),
}
COLD_BYTES = 1.2e9  # more than the L3 (480 MiB on the study's machine), so reads come from DRAM
THREADS = min(os.cpu_count() or 1, 8)
INT8_ENV = "QWEN3_MLX_NATIVE_INT8"  # "0" or "1": the native mat-vec's x float32 or int8


def bandwidth() -> dict[str, float]:
    """Read bandwidth in GB/s: the native AVX2 loop on 1 and 2 threads, and numpy's sum."""
    import numpy as np

    from qwen3_mlx.cpu.native import native

    result: dict[str, float] = {}
    module = native()
    if module is not None:
        for threads in (1, 2):
            result[f"read, {threads} thread(s)"] = module.read_bandwidth(1 << 30, 3, threads)
    array = np.ones(1 << 28, dtype=np.float32)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        array.sum()
        best = max(best, array.nbytes / (time.perf_counter() - start) / 1e9)
    result["numpy sum, 1 thread"] = best
    return result


def _layer(rows: int, width: int, dtype: Any, seed: int) -> tuple[Any, Any, Any]:
    import mlx.core as mx

    key = mx.random.key(seed)
    words = mx.random.randint(0, 2**31, (rows, width // 8), key=key).astype(mx.uint32)
    scales = mx.random.uniform(0.001, 0.02, (rows, width // 64), key=key).astype(dtype)
    biases = mx.random.normal((rows, width // 64), key=key).astype(dtype) * 0.05
    mx.eval(words, scales, biases)
    return words, scales, biases


def _gbps(layers: list, call: Any, repeats: int) -> float:
    """Best GB/s of weight bytes over `repeats` passes through every layer (one eval per pass)."""
    import mlx.core as mx

    size = sum(sum(a.nbytes for a in layer) for layer in layers)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval([call(layer) for layer in layers])
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


def matrices() -> list[dict[str, Any]]:
    """GB/s per 4B matrix: native (cold) and mx.quantized_matmul, float32 and bfloat16 scales."""
    import mlx.core as mx

    from qwen3_mlx.cpu.native import native

    module = native()
    rows = []
    for name, (width, height) in MATRICES.items():
        x = mx.random.normal((1, width))
        for dtype in (mx.float32, mx.bfloat16):
            size = sum(a.nbytes for a in _layer(1, width, dtype, 0)) * height
            copies = max(2, int(COLD_BYTES // size) + 1)
            layers = [_layer(height, width, dtype, seed) for seed in range(copies)]
            row = {"matrix": name, "K": width, "N": height, "scales": str(dtype).split(".")[-1]}
            if module is not None:

                def ours(layer: tuple, x: Any = x, int8: bool = False) -> Any:
                    return module.quantized_matmul(x, *layer, 64, THREADS, int8)

                def int8(layer: tuple, x: Any = x) -> Any:
                    return ours(layer, x, True)

                row["native"] = _gbps(layers, ours, 3)
                # The same matrix over and over: cache-resident when it fits (the compute ceiling)
                row["native_hot"] = _gbps([layers[0]] * 8, ours, 3)
                if module.int8_supported():  # the int8 variant, right after
                    row["int8"] = _gbps(layers, int8, 3)
                    row["int8_hot"] = _gbps([layers[0]] * 8, int8, 3)

            def theirs(layer: tuple, x: Any = x) -> Any:
                return mx.quantized_matmul(x, *layer, transpose=True, group_size=64, bits=4)

            # MLX's kernel is compute-bound (far below DRAM speed): two matrices are enough.
            row["mlx"] = _gbps(layers[:2], theirs, 1)
            rows.append(row)
            del layers
    return rows


def _llama_worker(path: str, tokens: int, threads: int) -> None:
    """In a fresh process: llama.cpp decode tok/s, one token per eval after a 1-token prompt."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=256, n_threads=threads, n_batch=8, verbose=False)
    llm.eval([9707])
    times = []
    for index in range(tokens):
        llm.eval([1000 + index])
        times.append(time.perf_counter())
    rate = (len(times) - 1) / (times[-1] - times[0])
    print(json.dumps({"tok_s": rate, "tokens": tokens}), flush=True)


def llama_available() -> str | None:
    """None when llama-cpp-python imports, else why not."""
    done = subprocess.run(
        [sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True
    )
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or ["import failed"])[-1]


def llama_decode(gguf: Path, tokens: int, threads: int, timeout: float) -> dict[str, Any]:
    """One llama.cpp decode measurement in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.bench_cpu_kernel", "--llama-worker", str(gguf)]
    command += [str(tokens), str(threads)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_decode(
    path: Path, engine: str, dtype: str, tokens: int, native: bool = True, int8: bool = False
) -> dict:
    """One decode measurement of ours or mlx-lm (benchmarks/worker.py) in a fresh process."""
    spec = {"engine": engine, "path": str(path), "dtype": dtype, "task": "decode"}
    spec.update(tokens=tokens, openblas=True)
    settings = {"QWEN3_MLX_NATIVE": "1" if native else "0", INT8_ENV: "1" if int8 else "0"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        return run_worker(spec, timeout=900)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def decode(
    shape: str, llama: str | None, only: list[str] | None = None, repeats: int = 1
) -> list[dict[str, Any]]:
    """Decode tok/s of one 4-bit random checkpoint for every engine (slow ones fewer tokens):
    `repeats` passes over the engines, so load at any one minute hits each alike; each row keeps
    every pass's rate (`runs`) and reports the best as `tok_s`."""
    from benchmarks.gguf_q4 import export

    path = checkpoint(shape, 4)
    slow = 3 if shape == "4b" else 6
    runs = [
        (f"ours (native kernel, {THREADS} thr)", lambda: engine_decode(path, "ours", "auto", 24)),
        ("ours (native kernel, 1 thr)", lambda: engine_decode(path, "ours_1thread", "auto", 24)),
        (
            f"ours (native int8, {THREADS} thr)",
            lambda: engine_decode(path, "ours", "auto", 24, int8=True),
        ),
        (
            "ours (native int8, 1 thr)",
            lambda: engine_decode(path, "ours_1thread", "auto", 24, int8=True),
        ),
        ("ours, native off (before)", lambda: engine_decode(path, "ours", "auto", slow, False)),
        ("mlx-lm, float32", lambda: engine_decode(path, "mlx_lm", "float32", slow)),
        ("mlx-lm, default (bf16)", lambda: engine_decode(path, "mlx_lm", "checkpoint", 2)),
    ]
    if llama is None:
        # llama.cpp splits rows evenly and spins at barriers: a core taken by another process
        # stalls it, so it runs with 1 thread as well as with all of them.
        gguf = export(path, path.with_name(path.name + "-q4_0.gguf"))
        runs[2:2] = [
            (f"llama.cpp Q4_0, {THREADS} thr", lambda: llama_decode(gguf, 24, THREADS, 900)),
            ("llama.cpp Q4_0, 1 thr", lambda: llama_decode(gguf, 24, 1, 900)),
        ]
    chosen = [(name, run) for name, run in runs if not only or name.startswith(tuple(only))]
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for name, run in chosen:
            result = run()
            print(f"  {shape} {name}: {result.get('tok_s', result.get('error'))}", flush=True)
            row = rows.setdefault(name, {"shape": shape, "engine": name, "runs": []})
            if "tok_s" in result:
                row["runs"].append(result["tok_s"])
                if result["tok_s"] >= row.get("tok_s", 0.0):
                    row.update(result)
            elif "tok_s" not in row:
                row.update(result)
    return list(rows.values())


def scale_memory(shape: str) -> dict[str, float]:
    """GB of 4-bit scales + biases in the checkpoint's bf16 and after a float32 cast, and the GB
    a decode step reads (every matrix once: packed words + scales + biases) either way."""
    import mlx.core as mx

    path = checkpoint(shape, 4)
    weights = mx.load(str(path / "model.safetensors"))
    count = sum(v.size for k, v in weights.items() if k.endswith((".scales", ".biases")))
    packed = sum(v.nbytes for v in weights.values() if v.dtype == mx.uint32)
    gguf = path.with_name(path.name + "-q4_0.gguf")
    return {
        "bf16_gb": count * 2 / 1e9,
        "float32_gb": count * 4 / 1e9,
        "step_bf16_gb": (packed + count * 2) / 1e9,
        "step_float32_gb": (packed + count * 4) / 1e9,
        "step_q4_0_gb": gguf.stat().st_size / 1e9 if gguf.is_file() else None,
    }


def step_gb(row: dict[str, Any], memory: dict[str, float]) -> float | None:
    """GB one decode step of this engine reads (its 4-bit weights once). The native kernel reads
    the checkpoint's bf16 scales in place; without it `auto` casts them to float32."""
    engine = row["engine"]
    if engine.startswith("llama"):
        return memory["step_q4_0_gb"]
    bf16 = "bf16" in engine or engine.startswith("ours (native")
    return memory["step_bf16_gb" if bf16 else "step_float32_gb"]


def report(results: dict[str, Any]) -> None:
    """Print the tables."""
    limit = max(results["bandwidth"].values())
    print("\nread bandwidth (GB/s):")
    for name, value in results["bandwidth"].items():
        print(f"  {name:24} {value:6.2f}")
    print(f"\nper matrix, 1 row of x, {THREADS} threads (GB/s of weights; limit {limit:.1f}):")
    print(
        f"  {'matrix':8} {'K->N':>13} {'scales':8} {'native':>7} {'hot':>6} {'mlx':>6} "
        f"{'ratio':>6} {'of limit':>8} {'int8':>6} {'hot':>6}"
    )
    nan = float("nan")
    for row in results["matrices"]:
        native, hot = row.get("native", nan), row.get("native_hot", nan)
        print(
            f"  {row['matrix']:8} {row['K']:>6}->{row['N']:<6} {row['scales']:8} {native:7.2f} "
            f"{hot:6.2f} {row['mlx']:6.2f} {native / row['mlx']:5.1f}x {native / limit:7.0%} "
            f"{row.get('int8', nan):6.2f} {row.get('int8_hot', nan):6.2f}"
        )
    print("\ndecode (1-token prompt, greedy): tok/s, GB/s of weights read, fraction of the limit")
    for row in results["decode"]:
        rate = row.get("tok_s")
        if rate is None:
            print(f"  {row['shape']:5} {row['engine']:28} {row.get('error')}")
            continue
        gb = step_gb(row, results["scale_memory"][row["shape"]]) or float("nan")
        runs = row.get("runs", [])
        spread = f"  (runs {min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
        print(
            f"  {row['shape']:5} {row['engine']:28} {rate:7.3f} tok/s {rate * gb:6.2f} GB/s "
            f"{rate * gb / limit:5.0%}{spread}"
        )
    for shape, memory in results["scale_memory"].items():
        saved = memory["float32_gb"] - memory["bf16_gb"]
        print(
            f"{shape}: scales + biases {memory['bf16_gb']:.3f} GB in bf16, "
            f"{memory['float32_gb']:.3f} GB cast to float32 ({saved:.3f} GB more); a step reads "
            f"{memory['step_float32_gb']:.2f} GB (float32 scales), {memory['step_bf16_gb']:.2f} GB "
            f"(bf16), {memory['step_q4_0_gb'] or float('nan'):.2f} GB (Q4_0)"
        )


def main() -> None:
    """Run every section and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.6B decode only")
    parser.add_argument("--skip-decode", action="store_true", help="bandwidth and matrices only")
    parser.add_argument(
        "--skip-matrices", action="store_true", help="bandwidth and decode only (faster)"
    )
    parser.add_argument(
        "--engines", help="decode only the engines whose names start so: 'ours (native,llama'"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="passes over the decode engines (best is shown)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_kernel")
    args = parser.parse_args()
    from qwen3_mlx.cpu.native import fallback_reason, isa

    results: dict[str, Any] = {"machine": machine(), "threads": THREADS}
    results["native"] = {"isa": isa(), "fallback_reason": fallback_reason()}
    print(f"native kernel: {isa() or fallback_reason()}", flush=True)
    results["bandwidth"] = bandwidth()
    results["matrices"] = [] if args.skip_matrices else matrices()
    shapes = [] if args.skip_decode else ["0.6b"] if args.quick else ["0.6b", "4b"]
    llama = llama_available()
    results["llama_cpp"] = llama or "installed"
    if llama:
        print(f"llama.cpp: not measured, llama-cpp-python does not import ({llama})", flush=True)
    only = args.engines.split(",") if args.engines else None
    results["repeats"] = args.repeats
    results["decode"] = [
        row for shape in shapes for row in decode(shape, llama, only, args.repeats)
    ]
    results["scale_memory"] = {shape: scale_memory(shape) for shape in shapes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--llama-worker":
        _llama_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
