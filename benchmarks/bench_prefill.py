"""CPU prefill and decode, ours against llama.cpp in one run at the same thread count.

    python -m benchmarks.bench_prefill --llama-bench PATH/llama-bench
    python -m benchmarks.bench_prefill --llama-bench PATH --long --agent --repeats 2
    python -m benchmarks.bench_prefill --llama-bench PATH --weights bf16   # the dense checkpoints

Both engines run the same random weights: our MLX 4-bit checkpoint (benchmarks/checkpoints.py)
and the GGUF Q4_0 that benchmarks/gguf_q4.py makes of it; with --weights bf16, our bf16 checkpoint
and the BF16 GGUF of the same bits (benchmarks/gguf_bf16.py). Ours runs as a fresh install does:
QWEN3_MLX_OPENBLAS=0 (MLX's reference BLAS), the native extension on. llama.cpp is measured with
its own `llama-bench` (built from source: only a benchmark tool, never a dependency), `-p` for
prefill and `-n` for decode, with the same thread count.

Per shape (0.6B and 4B) it reports tok/s of a 512-token prefill (and 4,096 with --long), as a
fresh install runs it: where AVX-512 VNNI runs, the 4-bit kernels round x to int8. --float32 adds
ours with float32 x (QWEN3_MLX_NATIVE_INT8_PREFILL=0 and QWEN3_MLX_NATIVE_INT8=0) as a second
line;
--prefill-only leaves out decode, --decode-only the prefill rows), decode tok/s after a short prompt, the ratio ours / llama.cpp, and the fraction of the machine's limit:
for prefill the FLOP/s of the matmuls and attention against the measured FMA peak, for decode
the GB/s of weights read against the measured read bandwidth; and the peak memory of our load
(for bf16: the checkpoint's bytes, no float32 copy). --agent adds the time to first
token of one agent step at 4B: a 1,500-token prompt (random ids: speed does not depend on them).
Each engine runs in a fresh process, once per pass; --repeats N makes N passes and reports the
best of each. The load average is recorded at the start and the end. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.bench_cpu_kernel import scale_memory
from benchmarks.checkpoints import checkpoint
from benchmarks.run import ROOT, machine, run_worker

THREADS = min(os.cpu_count() or 1, 8)
AGENT_PROMPT = 1500
INT8_SWITCHES = ("QWEN3_MLX_NATIVE_INT8_PREFILL", "QWEN3_MLX_NATIVE_INT8")
VARIANTS = {  # our engines: the switches each sets (unset: a fresh install's defaults)
    "ours": {},
    "ours float32": dict.fromkeys(INT8_SWITCHES, "0"),  # float32 x: within float32 rounding
}


def limits(threads: int) -> dict[str, float]:
    """The machine's bounds on `threads` threads: FMA GFLOP/s and read GB/s (native probes)."""
    from qwen3_mlx.cpu.native import native

    module = native()
    if module is None:
        return {}
    return {
        "fma_gflops": module.fma_peak(threads),
        "read_gbps": module.read_bandwidth(1 << 30, 3, threads),
    }


def flops_per_token(config: dict[str, Any], prompt: int) -> float:
    """FLOPs of one prompt token: every projection (2 per weight) and the causal attention at the
    prompt's mean context (the head is not computed for prompt tokens)."""
    D, inter, layers = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    heads, kv_heads, head = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    weights = D * head * (heads + 2 * kv_heads) + heads * head * D + 3 * D * inter
    attention = 2 * 2 * heads * head * (prompt / 2)  # scores and values, mean context P/2
    return layers * (2 * weights + attention)


def ours(path: Path, task: str, variant: str = "ours", **spec: Any) -> dict[str, Any]:
    """One measurement of ours in a fresh process, as a fresh install runs (no system OpenBLAS),
    with the switches of `variant` (VARIANTS)."""
    full = {"engine": "ours", "path": str(path), "dtype": "auto", "task": task, "openblas": False}
    before = {name: os.environ.pop(name, None) for name in INT8_SWITCHES}
    os.environ.update(VARIANTS[variant])
    try:
        return run_worker({**full, **spec}, timeout=1800)
    finally:
        for name, value in before.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def llama(binary: Path, gguf: Path, prompt: int, tokens: int, threads: int) -> dict[str, Any]:
    """llama-bench's tok/s for a prompt of `prompt` tokens or `tokens` decoded (one of them 0)."""
    command = [str(binary), "-m", str(gguf), "-p", str(prompt), "-n", str(tokens)]
    command += ["-t", str(threads), "-r", "1", "-o", "json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timeout after 1800 s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    (row,) = json.loads(done.stdout)
    return {"tok_s": row["avg_ts"], "build": row.get("build_commit"), "cpu": row.get("cpu_info")}


def weights_of(shape: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """Our checkpoint of `shape` in --weights (built once) and llama.cpp's GGUF of it."""
    if args.weights == "bf16":
        from benchmarks.gguf_bf16 import export

        path = checkpoint(shape, None)
        return path, export(path, path.with_name(path.name + "-bf16.gguf"))
    from benchmarks.gguf_q4 import export

    path = checkpoint(shape, 4)
    return path, export(path, path.with_name(path.name + "-q4_0.gguf"))


def step_gb(path: Path) -> float:
    """GB a decode step reads: every matrix once (the tied head reads the embedding), in the
    checkpoint's dtypes; the norms are negligible."""
    import mlx.core as mx

    weights = mx.load(str(path / "model.safetensors"))
    return sum(v.nbytes for v in weights.values() if v.ndim == 2) / 1e9


def measurements(shape: str, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(measure, {engine: callable}) for one shape: ours (and its --float32 variant),
    llama.cpp."""
    path, gguf = weights_of(shape, args)
    binary, threads = args.llama_bench, THREADS
    prompts = [512, 4096] if args.long else [512]
    if args.agent and shape == "4b":
        prompts.append(AGENT_PROMPT)
    variants = ["ours"] + ["ours float32"] * (args.float32 and args.weights != "bf16")
    rows = []
    for prompt in [] if args.decode_only else prompts:
        engines = {}
        for variant in variants:
            engines[variant] = lambda v=variant, p=prompt: ours(path, "prefill", v, prompt=p)
        engines["llama.cpp"] = lambda prompt=prompt: llama(binary, gguf, prompt, 0, threads)
        rows.append((f"prefill {prompt}", engines))
    decode = {}
    for variant in variants:
        decode[variant] = lambda v=variant: ours(path, "decode", v, tokens=24)
    decode["llama.cpp"] = lambda: llama(binary, gguf, 0, 32, threads)
    if not args.prefill_only:
        rows.append(("decode", decode))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, `repeats` passes, best of each."""
    results: dict[str, Any] = {"machine": machine(), "threads": THREADS}
    results["load_start"] = os.getloadavg()
    results["limits"] = limits(THREADS)
    print(f"limits on {THREADS} threads: {results['limits']}", flush=True)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    plans = {shape: measurements(shape, args) for shape in args.shapes}
    for _ in range(args.repeats):
        for shape, plan in plans.items():
            for measure, engines in plan:
                for engine, call in engines.items():
                    result = call()
                    print(
                        f"  {shape} {measure} {engine}: {result.get('tok_s', result)}", flush=True
                    )
                    row = rows.setdefault((shape, measure), {"shape": shape, "measure": measure})
                    runs = row.setdefault(f"{engine} runs", [])
                    if "tok_s" in result:
                        runs.append(result["tok_s"])
                        row[engine] = max(runs)
                        if "load_peak_gb" in result and engine == "ours":
                            row["ours load peak GB"] = result["load_peak_gb"]
                    else:
                        row.setdefault(f"{engine} error", result.get("error"))
    results["rows"] = list(rows.values())
    results["load_end"] = os.getloadavg()
    # The probes run for a fraction of a second: on a shared machine the best of the two stands.
    end = limits(THREADS)
    results["limits"] = {key: max(value, end[key]) for key, value in results["limits"].items()}
    results["weights"] = args.weights
    if args.weights == "bf16":
        results["step_gb"] = {shape: step_gb(weights_of(shape, args)[0]) for shape in args.shapes}
    else:
        results["memory"] = {shape: scale_memory(shape) for shape in args.shapes}
        results["step_gb"] = {s: m["step_bf16_gb"] for s, m in results["memory"].items()}
    return results


def report(results: dict[str, Any]) -> None:
    """Print the table: tok/s, ratio, fraction of the limit."""
    limit = results["limits"]
    print(
        f"\n{results['threads']} threads; load average {results['load_start'][0]:.1f} at the "
        f"start, {results['load_end'][0]:.1f} at the end; FMA peak "
        f"{limit.get('fma_gflops', float('nan')):.0f} GFLOP/s, read {limit.get('read_gbps', float('nan')):.1f} GB/s"
    )
    print(
        f"  {'shape':5} {'measure':14} {'ours':>9} {'llama.cpp':>9} {'ratio':>6} {'ours of limit':>13} {'llama of limit':>14}"
    )
    for row in results["rows"]:
        for engine in VARIANTS:
            if engine in row or engine == "ours":
                report_row(results, row, engine)
        if "ours load peak GB" in row:
            print(f"  {'':5} {'':14} ours: {row['ours load peak GB']:.2f} GB at load (peak)")


def report_row(results: dict[str, Any], row: dict[str, Any], engine: str = "ours") -> None:
    """One line of the table: `engine`'s tok/s against llama.cpp's."""
    limit = results["limits"]
    shape, measure = row["shape"], row["measure"]
    mine, theirs = row.get(engine, float("nan")), row.get("llama.cpp", float("nan"))
    bits = None if results.get("weights") == "bf16" else 4
    config = json.loads((checkpoint(shape, bits) / "config.json").read_text())
    if measure.startswith("prefill"):
        prompt = int(measure.split()[1])
        per = flops_per_token(config, prompt) / 1e9 / limit.get("fma_gflops", float("nan"))
    else:
        per = results["step_gb"][shape] / limit.get("read_gbps", float("nan"))
    label = measure if engine == "ours" else f"  {engine.removeprefix('ours ')}"
    print(
        f"  {shape:5} {label:14} {mine:9.2f} {theirs:9.2f} {mine / theirs:5.2f}x "
        f"{mine * per:13.0%} {theirs * per:14.0%}"
    )
    if measure == f"prefill {AGENT_PROMPT}":
        print(
            f"  {'':5} {'agent TTFT':14} {AGENT_PROMPT / mine:8.1f}s {AGENT_PROMPT / theirs:8.1f}s"
        )


def main() -> None:
    """Measure, print, and write results.json to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bench", type=Path, required=True, help="llama.cpp's llama-bench")
    parser.add_argument("--shapes", default="0.6b,4b", type=lambda s: s.split(","))
    parser.add_argument("--long", action="store_true", help="also a 4,096-token prefill")
    parser.add_argument("--agent", action="store_true", help="also the 1,500-token agent step (4B)")
    parser.add_argument(
        "--weights", choices=["4bit", "bf16"], default="4bit", help="the checkpoints to compare"
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="also ours with float32 x (QWEN3_MLX_NATIVE_INT8_PREFILL=0, QWEN3_MLX_NATIVE_INT8=0)",
    )
    parser.add_argument("--prefill-only", action="store_true", help="leave out the decode rows")
    parser.add_argument("--decode-only", action="store_true", help="leave out the prefill rows")
    parser.add_argument("--repeats", type=int, default=1, help="passes (the best is shown)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefill")
    args = parser.parse_args()
    os.environ["QWEN3_MLX_OPENBLAS"] = "0"
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
