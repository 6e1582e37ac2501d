"""What goes into the output folder: config, index, model card, and the final check of it all.

The folder itself (hidden staging name, atomic rename, --force) is staging.py's job; which side
files are copied is side_files.py's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_mlx.config import read_config
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.hub import is_repo_id
from qwen3_mlx.quant import read_quantization
from qwen3_mlx.quantize.errors import ConversionError
from qwen3_mlx.quantize.plan import Plan
from qwen3_mlx.safetensors_check import read_header
from qwen3_mlx.sizes import format_size

INDEX_NAME = "model.safetensors.index.json"
_HEADROOM = 16 * 2**20  # config, tokenizer and headers on top of the tensor bytes


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse up front when the disk cannot hold the output."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed + _HEADROOM:
        raise ConversionError(
            f"{existing}: no space left on device for the output ({needed / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free)"
        )


def write_index(plan: Plan, folder: Path) -> None:
    """model.safetensors.index.json as mlx-lm writes it (names sorted)."""
    weight_map = {out.name: plan.shard_names[job.shard] for job in plan.jobs for out in job.outputs}
    index = {
        "metadata": {"total_size": plan.total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(folder / INDEX_NAME, index)


def write_config(plan: Plan, folder: Path) -> None:
    """config.json with the quantization block, keys sorted as mlx-lm writes them."""
    config = {key: value for key, value in plan.config.items() if key != "_name_or_path"}
    _write_json(folder / "config.json", dict(sorted(config.items())))


def check_output(plan: Plan, folder: Path) -> None:
    """Re-open the written index, every shard header and the config; all must match the plan."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        total_size = index["metadata"]["total_size"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ConversionError(
            f"{folder / INDEX_NAME}: unreadable after writing ({error})"
        ) from None
    planned = {
        out.name: (out, plan.shard_names[job.shard]) for job in plan.jobs for out in job.outputs
    }
    if set(weight_map) != set(planned) or total_size != plan.total_size:
        raise ConversionError(f"{folder / INDEX_NAME}: does not list the planned tensors")
    for shard, name in enumerate(plan.shard_names):
        path = folder / name
        header = read_header(path)
        tensors = plan.shard_tensors(shard)
        if set(header) - {"__metadata__"} != {t.name for t in tensors}:
            raise ConversionError(f"{path}: holds other tensors than planned")
        for tensor in tensors:
            entry = header[tensor.name]
            if entry["dtype"] != tensor.dtype or tuple(entry["shape"]) != tensor.shape:
                raise ConversionError(
                    f"{path}: {tensor.name} is {entry['dtype']} {entry['shape']}, planned {tensor}"
                )
            if weight_map[tensor.name] != name:
                raise ConversionError(
                    f"{folder / INDEX_NAME}: maps {tensor.name} to the wrong shard"
                )
        try:
            mx.load(str(path))  # lazy: parses the header as every MLX loader will, reads no data
        except Exception as error:  # mlx raises RuntimeError/ValueError with a C++ message
            raise ConversionError(f"{path}: MLX cannot open it ({error})") from None
    try:
        read_quantization(read_config(folder), str(folder / "config.json"))
    except Qwen3Error as error:
        raise ConversionError(f"written config is invalid: {error}") from None


def _write_json(path: Path, data: Any) -> None:
    try:
        path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    except OSError as error:
        raise ConversionError(f"{path}: cannot be written ({error.strerror})") from None


def write_model_card(
    plan: Plan, folder: Path, title: str, source_label: str, tool_version: str
) -> None:
    """A short README.md saying how the folder was made."""
    spec = plan.spec
    title, source_label = readable(title), readable(source_label)
    is_repo = is_repo_id(source_label) and not Path(source_label).exists()
    base_model = f"base_model: {source_label}\n" if is_repo else ""
    if spec.recipe == "mixed_4_6":
        bits = "4, with 6 for v_proj and down_proj in the first and last eighth of the layers and for the output embedding"
    else:
        bits = str(spec.bits)
    size = plan.total_size
    text = (
        f"---\nlibrary_name: mlx\npipeline_tag: text-generation\n{base_model}tags:\n- mlx\n- qwen3\n---\n\n"
        f"# {title}\n\n"
        f"MLX quantized conversion of `{source_label}`, made with `qwen3-mlx quantize` "
        f"(qwen3-mlx {tool_version}, mlx {mx.__version__}).\n\n"
        f"| setting | value |\n| --- | --- |\n"
        f"| quantization | affine, group-wise |\n"
        f"| bits | {bits} |\n| group size | {spec.group_size} |\n| recipe | {spec.recipe} |\n"
        f"| scales, biases and norms | {plan.dtype_name} |\n"
        f"| size | {format_size(size)} ({8 * size / plan.parameters:.2f} bits per weight) |\n\n"
        "Loads in qwen3-mlx, mlx-lm (`mlx_lm.generate --model <folder>`) and LM Studio.\n"
    )
    try:
        (folder / "README.md").write_text(text, encoding="utf-8")
    except OSError as error:
        raise ConversionError(
            f"{folder / 'README.md'}: cannot be written ({error.strerror})"
        ) from None


def readable(name: str | Path) -> str:
    """A path or name as valid UTF-8 text: bytes a folder name may hold that are not become U+FFFD."""
    # Linux file names are bytes; Python keeps undecodable ones as lone surrogates, which cannot be
    # written to a UTF-8 file or handed to MLX.
    return os.fsencode(name).decode("utf-8", errors="replace")
