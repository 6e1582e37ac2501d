"""Tensor parallelism on one machine: decode speed and per-rank memory at 1 and 2 ranks.

    nice -n 10 python -m benchmarks.bench_distributed [--shape 0.6b] [--bits 4] [--tokens 64]

Builds (once, cached) a random checkpoint with the real Qwen3 shapes (benchmarks/checkpoints.py),
then runs the same worker as one process and as 2 ranks under `mlx.launch --backend ring` over
loopback. Each run reports its load time, MLX peak memory and peak RSS after loading (per rank),
and greedy decode tok/s after a 64-token prompt. The 2-rank run also times a bare `all_sum` of
one token's hidden state, the collective each layer runs twice per token.

Two ranks on one machine share its cores and memory bandwidth, so this does not speed up: the
difference per token is the price of the collectives (2 per layer + embedding + head gather) and
of the lockstep with the follower. docs/distributed.md turns the numbers into the cost for N Macs.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPT = list(range(1000, 1064))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _all_sum_seconds(group, hidden: int, repeats: int = 200) -> float:
    """Seconds per all_sum of one token's hidden state (float32), averaged over repeats."""
    import mlx.core as mx

    x = mx.ones((1, 1, hidden))
    mx.eval(mx.distributed.all_sum(x, group=group))
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(mx.distributed.all_sum(x, group=group))
    return (time.perf_counter() - start) / repeats


def worker(out: Path, model_dir: Path, tokens: int, split_vocabulary: bool = True) -> None:
    """Load the model (whole, or this rank's shard), decode `tokens` greedy tokens, write JSON."""
    import mlx.core as mx

    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import generate_tokens
    from qwen3_mlx.loading import load_model
    from qwen3_mlx.parallel.distributed import join_group, launched, load_group_model
    from qwen3_mlx.parallel.lockstep import LeaderModel, follow

    group = join_group() if launched() else None
    start = time.perf_counter()
    if group is None:
        model, _ = load_model(model_dir)
    else:
        model, _, _ = load_group_model(model_dir, group, split_vocabulary=split_vocabulary)
    result = {
        "ranks": 1 if group is None else group.size(),
        "rank": 0 if group is None else group.rank(),
        "load_s": time.perf_counter() - start,
        "load_peak_gb": mx.get_peak_memory() / 1e9,
        "load_peak_rss_gb": _peak_rss_gb(),
        "weights_gb": mx.get_active_memory() / 1e9,
    }
    if group is not None:
        result["all_sum_ms"] = 1e3 * _all_sum_seconds(group, model.args.hidden_size)
    if group is not None and group.rank() != 0:
        follow(model, group)
    else:
        runner = model if group is None else LeaderModel(model, group)
        produced = list(generate_tokens(runner, PROMPT, make_cache(model), max_tokens=tokens))
        first = produced[0].seconds
        result["prefill_s"] = first
        result["decode_tok_s"] = (len(produced) - 1) / (produced[-1].seconds - first)
        if group is not None:
            runner.stop()
    result["peak_gb"] = mx.get_peak_memory() / 1e9
    result["peak_rss_gb"] = _peak_rss_gb()
    Path(f"{out}.{result['rank']}.json").write_text(json.dumps(result))


def free_port() -> int:
    """A port nothing listens on now (the ring takes it and the next one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(model_dir: Path, ranks: int, tokens: int, workdir: Path, whole: bool = False) -> list[dict]:
    """Run the worker as one process or as `ranks` ranks; every rank's result."""
    out = workdir / f"ranks{ranks}{'-whole' if whole else ''}"
    worker_args = [__file__, "--worker", str(out), str(model_dir), str(tokens)]
    worker_args += ["--whole-vocabulary"] if whole else []
    command = [sys.executable, *worker_args]
    if ranks > 1:
        launcher = Path(sys.executable).with_name("mlx.launch")
        command = [str(launcher), "-n", str(ranks), "--backend", "ring"]
        command += ["-p", str(free_port()), sys.executable, *worker_args]
    subprocess.run(command, check=True, timeout=1800)
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(ranks)]


def report(single: dict, ranks: list[dict], model_dir: Path) -> None:
    """Print the comparison."""
    print(f"model: {model_dir.name}")
    print(f"{'':28}{'1 process':>12}{'2 ranks (rank 0 / 1)':>26}")
    lead, follower = ranks
    rows = [
        ("load (s)", "load_s", "{:.1f}"),
        ("MLX peak after load (GB)", "load_peak_gb", "{:.2f}"),
        ("RSS peak after load (GB)", "load_peak_rss_gb", "{:.2f}"),
        ("MLX peak, whole run (GB)", "peak_gb", "{:.2f}"),
        ("RSS peak, whole run (GB)", "peak_rss_gb", "{:.2f}"),
    ]
    for label, key, form in rows:
        both = f"{form.format(lead[key])} / {form.format(follower[key])}"
        print(f"{label:28}{form.format(single[key]):>12}{both:>26}")
    print(f"{'decode (tok/s)':28}{single['decode_tok_s']:>12.2f}{lead['decode_tok_s']:>26.2f}")
    per_token = 1e3 / lead["decode_tok_s"] - 1e3 / single["decode_tok_s"]
    print(f"extra time per token at 2 ranks: {per_token:.1f} ms")
    print(f"all_sum of one hidden state (loopback): {lead['all_sum_ms']:.3f} ms")
    for key in ("load_peak_gb", "peak_gb", "peak_rss_gb"):
        ratio = max(lead[key], follower[key]) / single[key]
        print(f"per-rank / single-process {key}: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=3, metavar=("OUT", "MODEL", "TOKENS"))
    parser.add_argument("--shape", default="0.6b", choices=("0.6b", "4b"))
    parser.add_argument("--bits", type=int, default=None, help="4 for a 4-bit checkpoint")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--whole-vocabulary",
        action="store_true",
        help="keep the embedding and head whole on every rank (default: split by vocabulary)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3-bench-distributed"))
    args = parser.parse_args()
    if args.worker:
        out, model_dir, tokens = args.worker
        worker(Path(out), Path(model_dir), int(tokens), not args.whole_vocabulary)
        return
    from benchmarks.checkpoints import checkpoint

    model_dir = checkpoint(args.shape, args.bits)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (single,) = run(model_dir, 1, args.tokens, args.workdir)
    ranks = run(model_dir, 2, args.tokens, args.workdir, args.whole_vocabulary)
    report(single, ranks, model_dir)


if __name__ == "__main__":
    main()
