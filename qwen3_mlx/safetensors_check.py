"""Cheap structural checks of safetensors files, so a bad file fails with its name and problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024


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
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry for tensor {name!r}") from None
        end = max(end, int(stop))
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"{path}: truncated ({size} of {expected} bytes)")
    return header
