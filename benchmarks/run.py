"""Benchmark qwen3-mlx against mlx-lm on the same checkpoints and backend, in one run.

    python -m benchmarks.run            # full suite (0.6B 4-bit and bf16, 4B 4-bit)
    python -m benchmarks.run --quick    # 0.6B 4-bit only, fewer tokens

Each measurement runs in a fresh process; ours and mlx-lm alternate (ours, theirs, ours, theirs)
so background load hits both, and the best repeat of each is kept. Prints a table, writes
results.json, results.md and results.png to --out. Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.checkpoints import cache_dir, checkpoint
from benchmarks.plan import Plan, build_plan

ROOT = Path(__file__).resolve().parents[1]


def run_worker(
    spec: dict[str, Any], timeout: float, module: str = "benchmarks.worker"
) -> dict[str, Any]:
    """One measurement in a fresh process (`python -m module spec`, its last line JSON); an error
    or timeout becomes {'error': ...}. OpenBLAS unless the spec says "openblas": false."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["QWEN3_MLX_OPENBLAS"] = "1" if spec.get("openblas", True) else "0"
    command = [sys.executable, "-m", module, json.dumps(spec)]
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved_order(plan: Plan) -> list[str]:
    """Run ids with each comparison's two sides next to each other (ours, theirs, ...)."""
    order: list[str] = []
    for comparison in plan.comparisons:
        for key in (comparison.ours, comparison.theirs):
            run_id = key.partition("#")[0]
            if run_id not in order:
                order.append(run_id)
    return order


def cli_help_seconds(command: list[str], repeats: int = 5) -> float | None:
    """Median wall time of a --help invocation (None if the command is missing or fails)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if done.returncode != 0:
            return None
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def help_timings() -> dict[str, float | None]:
    """`qwen3-mlx --help` and, for reference, `mlx_lm.generate --help`."""
    bin_dir = Path(sys.executable).parent
    return {
        "qwen3-mlx --help": cli_help_seconds([str(bin_dir / "qwen3-mlx"), "--help"]),
        "mlx_lm.generate --help": cli_help_seconds([str(bin_dir / "mlx_lm.generate"), "--help"]),
    }


def machine() -> dict[str, Any]:
    """The machine, backend and versions the numbers belong to."""
    import mlx.core as mx

    from qwen3_mlx import __version__
    from qwen3_mlx.cpu.blas import find_openblas

    model_name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model_name = names[0] if names else model_name
    memory = (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        if hasattr(os, "sysconf")
        else None
    )
    from importlib.metadata import version

    return {
        "platform": platform.platform(),
        "cpu": model_name,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1) if memory else None,
        "backend": str(mx.default_device()),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": version("mlx-lm"),
        "qwen3_mlx": __version__,
        "openblas": find_openblas(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoints, run the plan interleaved, print and write the results."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="0.6B 4-bit only, fewer tokens and turns"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of each measurement (default 2, quick 1)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated groups: decode,prefill,ttft,threads,openblas,load_s,peak_gb,help",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds per measurement")
    args = parser.parse_args(argv)

    plan = build_plan(args.quick)
    groups = {g for g in args.only.split(",") if g}
    if groups:
        plan.comparisons = [c for c in plan.comparisons if c.group in groups]
    repeats = args.repeats or (1 if args.quick else 2)
    info = machine()
    print(
        f"# {info['cpu']} ({info['cores']} cores, {info['memory_gib']} GiB), {info['backend']}, mlx {info['mlx']}, mlx-lm {info['mlx_lm']}",
        flush=True,
    )
    print(f"# checkpoints in {cache_dir()}", flush=True)
    paths = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    order = interleaved_order(plan)
    for repeat in range(repeats):
        for run_id in order:
            spec = dict(plan.runs[run_id])
            if spec.get("once") and repeat > 0:
                continue  # minutes-long runs (mlx-lm's bf16 CPU path): one long run averages noise
            key = (spec["shape"], spec["bits"])
            if key not in paths:
                paths[key] = str(checkpoint(*key))
            spec["path"] = paths[key]
            start = time.perf_counter()
            result = run_worker(spec, args.timeout)
            runs.setdefault(run_id, []).append(result)
            status = result.get("error") or ", ".join(
                f"{k}={v:.3g}" for k, v in result.items() if isinstance(v, float)
            )
            print(
                f"[{repeat + 1}/{repeats}] {run_id} ({time.perf_counter() - start:.0f} s): {status}",
                flush=True,
            )

    helps = help_timings() if not groups or "help" in groups else {}
    table = report.rows(plan.comparisons, runs)
    text = report.markdown(table)
    if any(run_id in runs for run_id in plan.chats.values()):
        text += (
            "\n\nTime to first token per turn (0.6B 4-bit, float32 both):\n\n"
            + report.chat_table(runs, plan.chats)
        )
    if helps:
        text += "\n\n" + "\n".join(
            f"- `{name}`: {_seconds(value)}" for name, value in helps.items()
        )
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report.write_json(
        args.out / "results.json",
        {
            "date": stamp,
            "machine": info,
            "quick": args.quick,
            "repeats": repeats,
            "table": table,
            "help": helps,
            "runs": runs,
            "specs": plan.runs,
        },
    )
    (args.out / "results.md").write_text(f"{stamp}; {json.dumps(info)}\n\n{text}\n")
    title = f"qwen3-mlx vs mlx-lm, {info['backend']}, {info['cpu']} x{info['cores']}, mlx {info['mlx']}, mlx-lm {info['mlx_lm']}"
    if report.write_chart(args.out / "results.png", table, title):
        print(f"\nwrote {args.out / 'results.json'}, results.md, results.png")
    return 0


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    raise SystemExit(main())
