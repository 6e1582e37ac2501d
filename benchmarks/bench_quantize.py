"""Benchmark `qwen3-mlx quantize` against mlx_lm.convert on a Qwen3-4B-shaped bf16 checkpoint.

    nice -n 10 python -m benchmarks.bench_quantize [--workdir /tmp/qwen3-bench]

Builds (once, cached in WORKDIR/source) a random bf16 checkpoint with the real Qwen3-4B shapes,
sharded in three files like the original, writing it tensor by tensor in bounded memory. Then it
runs both converters, each in its own subprocess with a warm page cache, and reports wall time
and peak RSS (os.wait4's rusage of that child), plus the ratios. Finally it checks that our
output's tensor names equal the real mlx-community Qwen3-4B-4bit index, that its size equals the
index's total_size, and that every tensor equals mlx_lm.convert's (dtype, shape and bytes).
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.model import Model
from qwen3_mlx.quantize.tensor_io import OutputTensor, ShardWriter

ROOT = Path(__file__).resolve().parent.parent

FIXTURES = ROOT / "tests" / "fixtures"
CONFIG = FIXTURES / "qwen3-4b" / "config.json"
REAL_INDEX = FIXTURES / "mlx-community-Qwen3-4B-4bit" / "model.safetensors.index.json"
SIDE_FILES = [
    FIXTURES / "tokenizer" / "tokenizer.json",
    FIXTURES / "tokenizer" / "merges.txt",
    FIXTURES / "qwen3-4b" / "tokenizer_config.json",
    FIXTURES / "qwen3-4b" / "generation_config.json",
]
SOURCE_SHARDS = 3  # Qwen/Qwen3-4B ships model-0000{1,2,3}-of-00003.safetensors
ROWS_PER_STEP = 4096


def source_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full-precision model (lazily built, never evaluated)."""
    from mlx.utils import tree_flatten

    model = Model(ModelArgs.from_dict(config))
    return {name: tuple(v.shape) for name, v in tree_flatten(model.parameters())}


def make_source(folder: Path, config_path: Path) -> Path:
    """A random bf16 checkpoint with the config's shapes, three shards, written a few rows at a time."""
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = json.loads(config_path.read_text())
    shapes = source_shapes(config)
    names = sorted(shapes, key=_layer_order)
    tensors = [OutputTensor(name, "BF16", shapes[name]) for name in names]
    budget = sum(t.nbytes for t in tensors) / SOURCE_SHARDS
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if size + tensor.nbytes > budget * 1.02 and len(shards) < SOURCE_SHARDS:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(folder / name, shard)
        for tensor in shard:
            _write_random(writer, tensor)
            weight_map[tensor.name] = name
        writer.close()
    total = sum(t.nbytes for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    shutil.copy(config_path, folder / "config.json")
    for path in SIDE_FILES:
        shutil.copy(path, folder / path.name)
    (folder / ".complete").touch()
    return folder


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1, name)


def _write_random(writer: ShardWriter, tensor: OutputTensor) -> None:
    if len(tensor.shape) == 1:
        values = (1.0 + 0.1 * mx.random.normal(tensor.shape)).astype(mx.bfloat16)
        mx.eval(values)
        writer.write_rows(tensor.name, 0, values)
        return
    rows, cols = tensor.shape
    std = 0.02 if "embed" in tensor.name else cols**-0.5
    for start in range(0, rows, ROWS_PER_STEP):
        stop = min(rows, start + ROWS_PER_STEP)
        values = (std * mx.random.normal((stop - start, cols))).astype(mx.bfloat16)
        mx.eval(values)
        writer.write_rows(tensor.name, start, values)


def warm_cache(folder: Path) -> None:
    """Read the source once so both converters start with it in the page cache."""
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            while handle.read(64 * 2**20):
                pass


def measure(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * scale / 1e9}


def check_output(ours: Path, reference: Path, real_index: Path) -> list[str]:
    """Names equal the real mlx-community index; every tensor equals mlx_lm.convert's."""
    problems = []
    real = json.loads(real_index.read_text())
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    if set(index["weight_map"]) != set(real["weight_map"]):
        diff = set(index["weight_map"]) ^ set(real["weight_map"])
        problems.append(f"names differ from the mlx-community index: {sorted(diff)[:5]}")
    if index["metadata"]["total_size"] != real["metadata"]["total_size"]:
        problems.append(
            f"total_size {index['metadata']['total_size']} != {real['metadata']['total_size']}"
        )
    mine = _all_tensors(ours)
    theirs = _all_tensors(reference)
    if set(mine) != set(theirs):
        problems.append("tensor names differ from mlx_lm.convert's")
    for name in sorted(set(mine) & set(theirs)):
        a, b = mine[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype} {a.shape} vs mlx_lm {b.dtype} {b.shape}")
        elif not mx.array_equal(a, b).item():
            problems.append(f"{name}: values differ from mlx_lm.convert's")
        mx.clear_cache()
    return problems


def _all_tensors(folder: Path) -> dict[str, mx.array]:
    tensors: dict[str, mx.array] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(mx.load(str(path)))  # lazy: each tensor is read when compared
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qwen3-bench"))
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="model shapes (default: Qwen3-4B)"
    )
    parser.add_argument(
        "--index", type=Path, default=REAL_INDEX, help="the matching mlx-community index"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    source = make_source(args.workdir / "source", args.config)
    print(
        f"source: {source} ({sum(p.stat().st_size for p in source.glob('*.safetensors')) / 1e9:.2f} GB, "
        f"ready in {time.perf_counter() - started:.0f} s)"
    )
    ours, theirs = args.workdir / "ours-4bit", args.workdir / "mlx-lm-4bit"
    for folder in (ours, theirs):
        shutil.rmtree(folder, ignore_errors=True)
    cli = str(Path(sys.executable).parent / "qwen3-mlx")
    runs = {
        "qwen3-mlx quantize": [cli, "quantize", str(source), str(ours)],
        "mlx_lm.convert": [
            sys.executable,
            "-m",
            "mlx_lm",
            "convert",
            "--hf-path",
            str(source),
            "--mlx-path",
            str(theirs),
            "-q",
            "--q-bits",
            "4",
            "--q-group-size",
            "64",
        ],
    }
    results = {}
    for name, command in runs.items():
        warm_cache(source)
        results[name] = measure(command)
        print(
            f"{name:20s} {results[name]['seconds']:7.1f} s   peak RSS {results[name]['peak_rss_gb']:.2f} GB"
        )
    a, b = results["qwen3-mlx quantize"], results["mlx_lm.convert"]
    print(
        f"{'ratio (ours / mlx)':20s} {a['seconds'] / b['seconds']:7.2f} x   peak RSS "
        f"{a['peak_rss_gb'] / b['peak_rss_gb']:.2f} x"
    )
    problems = check_output(ours, theirs, args.index)
    print(
        "output check: "
        + (
            f"names equal {args.index.parent.name}'s index, total_size equal, "
            "every tensor identical to mlx_lm.convert's"
            if not problems
            else "FAILED"
        )
    )
    for problem in problems[:20]:
        print("  " + problem)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
