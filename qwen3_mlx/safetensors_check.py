"""Cheap structural checks of safetensors files and their index, so a bad file fails with its name
and problem before any tensor is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path, PurePosixPath
from typing import Any

from qwen3_mlx.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"

TensorEntries = dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(handle.read(header_len))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape = [int(size) for size in info["shape"]]
            if not isinstance(info["dtype"], str) or min(shape, default=0) < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
        end = max(end, int(stop))
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"{path}: truncated ({size} of {expected} bytes)")
    return header


def _shard_name(index: Path, tensor: Any, name: Any) -> str:
    """A weight_map value checked to be a file name inside the model folder."""
    if not isinstance(name, str) or not isinstance(tensor, str):
        raise CheckpointError(
            f"{index}: weight_map must map tensor names to file names, got {tensor!r}: {name!r}"
        )
    parts = PurePosixPath(name).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name or "\0" in name:
        # Security: an index must never make us read a file outside the model folder.
        raise CheckpointError(f"{index}: weight_map names {name!r}, outside the model folder")
    return name


def index_files(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json names, each checked."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index}: cannot be read as JSON ({error})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: weight_map must be an object mapping tensor names to file names, "
            f"got {json.dumps(weight_map)[:60]}"
        )
    return sorted({_shard_name(index, tensor, name) for tensor, name in weight_map.items()})


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        files = [model_dir / name for name in index_files(index)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{model_dir}: no *.safetensors weights (pickle .bin files are never loaded)"
        )
    return files


def tensor_headers(files: list[Path]) -> TensorEntries:
    """Every tensor's header entry (dtype, shape, data_offsets) across the shards."""
    entries: TensorEntries = {}
    for path in files:
        entries.update({k: v for k, v in read_header(path).items() if k != "__metadata__"})
    return entries
