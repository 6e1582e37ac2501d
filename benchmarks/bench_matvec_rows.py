"""The native 4-bit mat-vec by rows of x, for builds of the extension side by side.

    python -m benchmarks.bench_matvec_rows                  # this checkout's build, best ISA
    python -m benchmarks.bench_matvec_rows --isa avx2 --builds /tmp/before.so qwen3_mlx/_native_mlx_*.so
    python -m benchmarks.bench_matvec_rows --int8     # int8 x (AVX-512 VNNI; without it, float32 x)

CPU time per call of one Qwen3-4B matrix (q by default) on one thread, for 1-8 rows of x (decode
and a speculative verify pass), cycling over copies larger than the L3 so the words come from
DRAM (bench_cpu_kernel's cold cycle). Each build runs in a fresh process, the builds interleaved
round by round so a busy moment hurts each alike; the best round of each is shown, with its ratio
to the first build. Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.bench_cpu_kernel import COLD_BYTES, MATRICES, _layer
from benchmarks.run import ROOT

INT8_SWITCH = "QWEN3_MLX_NATIVE_INT8"


def worker(build: str, matrix: str, rows: list[int], cold_bytes: float, passes: int) -> None:
    """In a fresh process: print {rows: best CPU seconds per call} for one build as JSON."""
    import mlx.core as mx

    from qwen3_mlx.cpu.native import load_build

    module = load_build(build)
    width, height = MATRICES[matrix]
    size = sum(a.nbytes for a in _layer(1, width, mx.bfloat16, 0)) * height
    layers = [
        _layer(height, width, mx.bfloat16, seed) for seed in range(int(cold_bytes // size) + 2)
    ]
    result = {}
    int8 = os.environ.get(INT8_SWITCH) == "1"  # set by --int8
    for count in rows:
        x = mx.random.normal((count, width), key=mx.random.key(count))
        mx.eval([module.quantized_matmul(x, *layer, 64, 1, int8) for layer in layers[:2]])  # warm
        best = float("inf")
        for _ in range(passes):
            start = time.process_time()
            mx.eval([module.quantized_matmul(x, *layer, 64, 1, int8) for layer in layers])
            best = min(best, (time.process_time() - start) / len(layers))
        result[count] = best
    print(json.dumps(result), flush=True)


def main() -> None:
    """Time every build, interleaved, and print ms per call and the ratios to the first build."""
    from qwen3_mlx.cpu.native import module_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = [str(path) for path in (ROOT / "qwen3_mlx").glob(f"{module_name()}.*so")]
    parser.add_argument("--builds", nargs="+", default=here, help="extension .so files")
    parser.add_argument("--isa", choices=["avx512", "avx2", "scalar"], help="force an ISA")
    parser.add_argument("--matrix", choices=list(MATRICES), default="q")
    parser.add_argument("--rows", default="1,2,3,5,8", help="rows of x, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="int8 x (without it: float32 x)")
    parser.add_argument("--cold-mb", type=float, default=COLD_BYTES / 1e6, help="MB of copies")
    args = parser.parse_args()
    if args.isa:
        os.environ["QWEN3_MLX_NATIVE_ISA"] = args.isa  # read per call by the extension
    if args.int8:
        os.environ[INT8_SWITCH] = "1"  # read by the workers
    spec = [args.matrix, args.rows, str(args.cold_mb * 1e6)]
    best: list[dict[str, float]] = [{} for _ in args.builds]
    for _ in range(args.rounds):
        for index, build in enumerate(args.builds):
            command = [sys.executable, "-m", "benchmarks.bench_matvec_rows", "--worker", build]
            done = subprocess.run(
                command + spec, cwd=ROOT, capture_output=True, text=True, check=True
            )
            for count, seconds in json.loads(done.stdout.strip().splitlines()[-1]).items():
                best[index][count] = min(best[index].get(count, float("inf")), seconds)
    width, height = MATRICES[args.matrix]
    print(
        f"{args.matrix} {width}->{height}, bf16 scales, one thread, CPU time per call, "
        f"ISA {args.isa or 'best'}{', int8 x' if args.int8 else ''}; load average {os.getloadavg()[0]:.2f}"
    )
    for index, build in enumerate(args.builds):
        cells = [
            f"{count} rows {1e3 * seconds:6.3f} ms ({seconds / best[0][count]:.2f}x)"
            for count, seconds in best[index].items()
        ]
        print(f"  {build}: " + ", ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        rows = [int(count) for count in sys.argv[4].split(",")]
        worker(sys.argv[2], sys.argv[3], rows, float(sys.argv[5]), passes=3)
    else:
        main()
