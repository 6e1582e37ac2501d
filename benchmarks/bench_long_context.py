"""Long conversations: KV memory per token, a long generation against mlx-lm, and resuming a saved
cache. A benchmark: it prints tables and asserts nothing.

    python -m benchmarks.bench_long_context                  # tiny model, 3,840 + 320 tokens
    python -m benchmarks.bench_long_context --quick          # 3,840 + 256 tokens, one repeat
    python -m benchmarks.bench_long_context --model 0.6b     # random Qwen3-0.6B (bf16), slow on a CPU
    python -m benchmarks.bench_long_context --only bytes     # bytes,attention,generation,decode,resume

1. KV bytes per token of each KV setting, on the Qwen3-0.6B and Qwen3-4B shapes (kv_memory.py):
   caches are filled with random keys and values, then the bytes of their arrays are counted at a
   multiple of the 256-token growth step, and compared with qwen3_mlx.cache.kv_bytes_per_token.
2. A long generation (random prompt, then greedy tokens with stop tokens ignored), ours against
   mlx-lm's stream_generate with the same kv_bits, each run in a fresh process (peak memory, RSS,
   time to first token, decode tok/s at that context). Then decode tok/s at 4,096 tokens of
   context with the KV settings alternating burst by burst in one process, which background load
   on a shared machine disturbs less than separate runs.
3. Resume: a long conversation saved with its KV cache, loaded into a new process and sent one short
   message, against the same transcript loaded without the cache file (a full re-prefill).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import qwen3_mlx  # noqa: F401 (before mlx: OpenBLAS on Linux)
from benchmarks.checkpoints import SHAPES, checkpoint
from benchmarks.kv_memory import FILL_TOKENS, KV_LABELS, attention_table, bytes_table
from benchmarks.run import run_worker
from qwen3_mlx.cache import KV_GROUP_SIZE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "qwen3-tiny-chat"
WORKER = "benchmarks.long_context_worker"


# --- 2. a long generation --------------------------------------------------------------------------


def generation_runs(options: argparse.Namespace, path: Path) -> list[dict[str, Any]]:
    """Every engine and KV setting, interleaved (ours, theirs, ...), best decode rate kept."""
    engines = [("ours", "auto")] + [("mlx_lm", dtype) for dtype in options.mlx_lm_dtypes]
    best: dict[tuple[str, str, Any], dict[str, Any]] = {}
    for _ in range(options.repeats):
        for kv_bits in options.kv:
            for engine, dtype in engines:
                spec = dict(
                    task="generation",
                    engine=engine,
                    dtype=dtype,
                    path=str(path),
                    prompt=options.prompt,
                    tokens=options.tokens,
                    kv_bits=kv_bits,
                )
                result = run_worker(spec, options.timeout, WORKER)
                key = (engine, dtype, kv_bits)
                print(f"  {engine} {dtype} kv={kv_bits}: {result}", file=sys.stderr, flush=True)
                kept = best.get(key)
                if kept is None or result.get("decode_tok_s", 0) > kept.get("decode_tok_s", 0):
                    best[key] = {**spec, **result}
    return list(best.values())


def engine_label(run: dict[str, Any]) -> str:
    """'qwen3-mlx', 'mlx-lm (checkpoint dtype)' or 'mlx-lm (float32)'."""
    if run["engine"] == "ours":
        return "qwen3-mlx"
    return (
        "mlx-lm (checkpoint dtype)" if run["dtype"] == "checkpoint" else f"mlx-lm ({run['dtype']})"
    )


def generation_table(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows per run, and the 8-bit vs unquantized decode ratio per engine."""
    lines = [
        "| engine | KV | K/V dtype | TTFT s | decode tok/s | peak GB | decode peak GB "
        "| active GB at end | max RSS GB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        if "error" in run:
            lines.append(
                f"| {engine_label(run)} | {KV_LABELS[run['kv_bits']]} | error: "
                f"{run['error']} | | | | | | |"
            )
            continue
        lines.append(
            f"| {engine_label(run)} | {KV_LABELS[run['kv_bits']]} | {run['kv_dtype']} "
            f"| {run['ttft_s']:.2f} | {run['decode_tok_s']:.2f} | {run['peak_gb']:.3f} "
            f"| {run['decode_peak_gb']:.3f} | {run['active_gb']:.3f} | {run['rss_gb']:.3f} |"
        )
    lines.append("")
    by_key = {(engine_label(run), run["kv_bits"]): run for run in runs if "error" not in run}
    for (label, kv_bits), run in by_key.items():
        base = by_key.get((label, None))
        if kv_bits is None or base is None:
            continue
        lines.append(
            f"- {label}: {KV_LABELS[kv_bits]} KV decodes at "
            f"{run['decode_tok_s'] / base['decode_tok_s']:.1%} of the unquantized rate; "
            f"decode peak {run['decode_peak_gb'] / base['decode_peak_gb']:.1%} of unquantized"
        )
    return lines


def decode_table(options: argparse.Namespace, path: Path) -> list[str]:
    """Markdown rows: decode tok/s at a fixed context per KV setting, alternating in one process."""
    import statistics

    lines = [
        "| engine | KV | median decode tok/s | range over bursts | vs unquantized (median) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    engines = [("ours", "auto")] + [("mlx_lm", dtype) for dtype in options.mlx_lm_dtypes]
    for engine, dtype in engines:
        spec = dict(
            task="decode_ab",
            engine=engine,
            dtype=dtype,
            path=str(path),
            context=options.context,
            burst=options.burst,
            rounds=options.rounds,
            kv=options.kv,
        )
        result = run_worker(spec, options.timeout, WORKER)
        print(f"  decode {engine} {dtype}: {result}", file=sys.stderr, flush=True)
        label = engine_label(spec)
        if "error" in result:
            lines.append(f"| {label} | | error: {result['error']} | | |")
            continue
        medians = {kv: statistics.median(rates) for kv, rates in result["rates"].items()}
        for kv, rates in result["rates"].items():
            name = KV_LABELS[None if kv == "None" else int(kv)]
            lines.append(
                f"| {label} | {name} | {medians[kv]:.2f} | {min(rates):.2f}-{max(rates):.2f} "
                f"| {medians[kv] / medians['None']:.1%} |"
            )
    return lines


# --- 3. resume from a saved cache ------------------------------------------------------------------

FILLER = (
    "Paragraph {n}. The river runs past the old mill, the bridge and the market square, where "
    "traders sell apples, bread, cheese and wool every morning before the bells ring at nine. "
)


def long_conversation(path: Path, kv_bits: int | None, target: int, folder: Path) -> dict[str, Any]:
    """Build a conversation of about `target` tokens, save it with and without its KV cache."""
    import warnings

    from qwen3_mlx.chat import Chat

    warnings.simplefilter("ignore")
    chat = Chat.from_pretrained(
        path, kv_bits=kv_bits, thinking=False, sampling={"temperature": 0.0, "max_tokens": 16}
    )
    turn = 0
    while chat.context_used + 400 < target:  # each turn adds about 400 tokens
        text = "".join(FILLER.format(n=turn * 10 + n) for n in range(10)) + "Copy: lake bird"
        chat.send(text).text()
        turn += 1
    with_cache = folder / f"kv{kv_bits}.json"
    size = chat.save(with_cache, with_cache=True)
    without = folder / f"kv{kv_bits}-plain.json"
    chat.save(without)
    return {
        "cached": str(with_cache),
        "plain": str(without),
        "file_bytes": size,
        "context": len(chat.cache.tokens),
        "turns": turn,
    }


def resume_table(options: argparse.Namespace, path: Path) -> list[str]:
    """Markdown rows: load + TTFT of the next message with the saved cache and without it."""
    lines = [
        "| KV | context tokens | cache file MB | way | load s | TTFT s | load + TTFT s "
        "| prefilled / prompt tokens |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    folder = Path(tempfile.mkdtemp(prefix="qwen3-mlx-resume-"))
    try:
        for kv_bits in (None, 8):
            saved = long_conversation(path, kv_bits, options.resume_context, folder)
            for way in ("cached", "plain"):
                spec = dict(
                    task="resume",
                    path=str(path),
                    kv_bits=kv_bits,
                    transcript=saved[way],
                    message="Count the words: fish duck egg",
                )
                result = run_worker(spec, options.timeout, WORKER)
                print(f"  resume kv={kv_bits} {way}: {result}", file=sys.stderr, flush=True)
                if "error" in result:
                    lines.append(
                        f"| {KV_LABELS[kv_bits]} | | | {way} | error: {result['error']} | | | |"
                    )
                    continue
                label = "saved cache" if way == "cached" else "re-prefill"
                size = f"{saved['file_bytes'] / 1e6:.1f}" if way == "cached" else "-"
                lines.append(
                    f"| {KV_LABELS[kv_bits]} | {saved['context']:,} | {size} | {label} "
                    f"| {result['load_s']:.2f} | {result['ttft_s']:.2f} "
                    f"| {result['load_s'] + result['ttft_s']:.2f} "
                    f"| {result['prefilled']:,} / {result['prompt_tokens']:,} |"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return lines


# --- the run ---------------------------------------------------------------------------------------


def conditions(options: argparse.Namespace, path: Path) -> str:
    """One line of conditions the numbers belong to."""
    import platform
    from importlib.metadata import version

    import mlx.core as mx

    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, model {path.name}, prompt "
        f"{options.prompt:,} + {options.tokens:,} generated tokens, {options.repeats} repeat(s); "
        f"{platform.machine()}, {os.cpu_count()} cores, {mx.default_device()}, mlx {mx.__version__}, "
        f"mlx-lm {version('mlx-lm')}, Python {platform.python_version()}, load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for and print their tables."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_long_context", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="tiny", help="tiny (default), 0.6b, or a model folder")
    parser.add_argument("--quick", action="store_true", help="3,840 + 256 tokens, one repeat")
    parser.add_argument("--prompt", type=int, default=3840, help="prompt tokens of the generation")
    parser.add_argument("--tokens", type=int, default=None, help="tokens generated (default 320)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each (default 2)")
    parser.add_argument(
        "--mlx-lm-dtypes",
        default=None,
        help="mlx-lm runs: checkpoint and/or float32, or none (default: both on tiny, float32 "
        "otherwise)",
    )
    parser.add_argument("--kv", default="none,8,4", help="KV settings of generation and decode")
    parser.add_argument("--context", type=int, default=4096, help="context of the decode A/B")
    parser.add_argument("--burst", type=int, default=None, help="tokens per decode burst (24)")
    parser.add_argument("--rounds", type=int, default=None, help="decode bursts per setting (5)")
    parser.add_argument("--resume-context", type=int, default=3500, help="tokens of the saved chat")
    parser.add_argument("--only", default="bytes,attention,generation,decode,resume")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    options = parser.parse_args(argv)
    options.tokens = options.tokens or (256 if options.quick else 320)
    options.repeats = options.repeats or (1 if options.quick else 2)
    options.burst = options.burst or (16 if options.quick else 24)
    options.rounds = options.rounds or (3 if options.quick else 5)
    if options.model == "tiny":
        path = TINY
    elif options.model in SHAPES:
        path = checkpoint(options.model, None)
    else:
        path = Path(options.model)
    default_dtypes = "checkpoint,float32" if options.model == "tiny" else "float32"
    dtypes = (options.mlx_lm_dtypes or default_dtypes).split(",")
    options.mlx_lm_dtypes = [dtype for dtype in dtypes if dtype not in ("", "none")]
    options.kv = [None if kv == "none" else int(kv) for kv in options.kv.split(",")]
    parts = options.only.split(",")
    print(conditions(options, path), flush=True)
    if "bytes" in parts:
        print(f"\nKV bytes per token (filled to {FILL_TOKENS:,} tokens, group {KV_GROUP_SIZE})\n")
        print("\n".join(bytes_table()), flush=True)
    if "attention" in parts:
        print(
            f"\nAttention of one decode step at {options.context:,} tokens of context, float32 "
            f"queries, settings alternating ({options.rounds * 4} rounds)\n"
        )
        for shape in SHAPES:
            print(
                "\n".join(attention_table(shape, options.context, options.rounds * 4)), flush=True
            )
    if "generation" in parts:
        runs = generation_runs(options, path)
        context = options.prompt + options.tokens
        print(
            f"\nLong generation: {options.prompt:,}-token prompt + {options.tokens:,} tokens "
            f"(context {context:,}), {path.name}\n"
        )
        print("\n".join(generation_table(runs)), flush=True)
    if "decode" in parts:
        lines = decode_table(options, path)
        print(
            f"\nDecode at {options.context:,} tokens of context, KV settings alternating in one "
            f"process ({options.rounds} bursts of {options.burst} tokens each), {path.name}\n"
        )
        print("\n".join(lines), flush=True)
    if "resume" in parts:
        lines = resume_table(options, path)
        print(f"\nResume a ~{options.resume_context:,}-token conversation, {path.name}\n")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
