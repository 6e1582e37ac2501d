"""Random-weight Qwen3 checkpoints at the real shapes, built once into a cache folder.

Speed does not depend on the weight values, so random weights at the published shapes (configs in
the repository's tests/fixtures) measure what a real checkpoint would, without the weights themselves. The files
are written exactly as the published formats are (bf16 safetensors; MLX affine 4-bit with a
`quantization` block), so mlx-lm and qwen3-mlx load the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen3_mlx.config import ModelArgs
from qwen3_mlx.model import Model
from qwen3_mlx.quant import QuantSpec, cast_floating, quantize_model, write_quantization

# The published configs, tokenizer and template, as the tests use them: a fresh clone needs nothing else.
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
SHAPES = {"0.6b": "qwen3-0.6b", "4b": "qwen3-4b"}
TOKENIZER_FILES = [
    ("tokenizer", "tokenizer.json"),
    ("tokenizer", "merges.txt"),
    ("qwen3-4b", "tokenizer_config.json"),
    ("qwen3-4b", "generation_config.json"),
]


def cache_dir() -> Path:
    """Where built checkpoints live: $QWEN3_MLX_BENCH_CACHE, else the user cache folder."""
    env = os.environ.get("QWEN3_MLX_BENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-mlx-bench"


def checkpoint(shape: str, bits: int | None, root: Path | None = None) -> Path:
    """The folder of a random checkpoint ('0.6b' or '4b'; bits None = bf16), built if missing."""
    name = f"qwen3-{shape}-{'bf16' if bits is None else f'{bits}bit'}-random"
    folder = (root or cache_dir()) / name
    if (folder / "model.safetensors").is_file():
        return folder
    build(FIXTURES / SHAPES[shape], folder, bits)
    return folder


def build(config_dir: Path, folder: Path, bits: int | None, seed: int = 0) -> None:
    """Write config, tokenizer files and random weights (bf16, or `bits`-bit affine) to folder."""
    config = json.loads((config_dir / "config.json").read_text())
    mx.random.seed(seed)
    # Parameters stay lazy until each one is evaluated below, so the float32 initial values of a
    # 4B model never exist all at once.
    model = Model(ModelArgs.from_dict(config))
    if bits is not None:
        block = quantize_model(model, QuantSpec(bits=bits, group_size=64))
        config = write_quantization(config, block)
    cast_floating(model, mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    for value in weights.values():
        mx.eval(value)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "mlx"})
    (partial / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    for source, name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES / source / name, partial / name)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
