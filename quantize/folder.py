"""The output folder: written beside OUTPUT under a hidden name, checked, then renamed into place.

A reader never sees a half-written model: OUTPUT either does not exist, is the old folder, or is
the complete new one. Any failure (an error, Ctrl-C, a full disk) removes the hidden folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from quantize.errors import ConversionError
from quantize.plan import Plan
from qwen3_mlx.config import read_config
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.quant import read_quantization
from qwen3_mlx.safetensors_check import read_header

# Tokenizer, chat template, generation config and license travel with the weights; code never does.
SIDE_FILE_PATTERNS = ("*.json", "*.jinja", "merges.txt", "vocab.txt", "LICENSE*", "NOTICE*")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "README.md"}
INDEX_NAME = "model.safetensors.index.json"
_HEADROOM = 16 * 2**20  # config, tokenizer and headers on top of the tensor bytes


def check_destination(output: Path, source_dir: Path, force: bool) -> None:
    """Refuse an existing OUTPUT without force, and an OUTPUT that is, or holds, the source."""
    out, src = output.resolve(), source_dir.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise ConversionError(
            f"{output}: the output must not be the source folder, inside it, or hold it"
        )
    if (output.exists() or output.is_symlink()) and not force:
        raise ConversionError(f"{output}: already exists (use --force to replace it)")


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


@contextmanager
def staging_folder(output: Path, force: bool) -> Iterator[Path]:
    """A hidden folder beside OUTPUT; renamed to OUTPUT when the block succeeds, removed if not."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = output.parent / f".{output.name}.partial-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as error:
        raise ConversionError(
            f"{output.parent}: cannot create the output ({error.strerror})"
        ) from None
    try:
        yield staging
        replace_folder(staging, output, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging: Path, output: Path, force: bool) -> None:
    """Rename staging to output; with force, move the old one aside first and delete it last."""
    try:
        if not (output.exists() or output.is_symlink()):
            os.rename(staging, output)
            return
        if not force:
            raise ConversionError(f"{output}: already exists (use --force to replace it)")
        old = output.parent / f".{output.name}.old-{secrets.token_hex(4)}"
        os.rename(output, old)
        try:
            os.rename(staging, output)
        except BaseException:
            os.rename(old, output)
            raise
    except OSError as error:
        raise ConversionError(
            f"{output}: cannot move the new model into place ({error.strerror})"
        ) from None
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


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


def copy_side_files(source_dir: Path, folder: Path) -> list[str]:
    """Copy tokenizer files, chat template, generation_config and license; return their names."""
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(source_dir.glob(pattern)):
            if path.name in NOT_COPIED or path.name.startswith(".") or not path.is_file():
                continue
            if path.name.endswith(".index.json") or (folder / path.name).exists():
                continue
            try:
                shutil.copyfile(path, folder / path.name)
            except OSError as error:
                raise ConversionError(
                    f"{folder / path.name}: cannot be written ({error.strerror})"
                ) from None
            copied.append(path.name)
    return copied


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
    base_model = f"base_model: {source_label}\n" if _is_repo_id(source_label) else ""
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
        f"| size | {_size_text(size)} ({8 * size / plan.parameters:.2f} bits per weight) |\n\n"
        "Loads in qwen3-mlx, mlx-lm (`mlx_lm.generate --model <folder>`) and LM Studio.\n"
    )
    try:
        (folder / "README.md").write_text(text, encoding="utf-8")
    except OSError as error:
        raise ConversionError(
            f"{folder / 'README.md'}: cannot be written ({error.strerror})"
        ) from None


def _size_text(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count / 1e3:.1f} kB"


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return (
        not name.startswith((".", "/", "~"))
        and len(parts) == 2
        and all(parts)
        and not Path(name).exists()
    )
