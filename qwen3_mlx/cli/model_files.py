"""Where `info` reads a model from: a local folder, the Hugging Face cache, or the Hub's small files.

For a repo that is not in the cache, only the config, tokenizer and template files are fetched
(into a temporary folder, so the cache never holds a snapshot without weights) and the tensor
headers are read from the Hub by HTTP range requests: the weights are never downloaded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import CheckpointError

SMALL_FILE_PATTERNS = ["*.json", "*.jinja", "merges.txt"]

TensorEntries = dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}


def looks_like_repo_id(name: str) -> bool:
    """'owner/name', not a path."""
    parts = name.split("/")
    return not name.startswith((".", "/", "~")) and len(parts) == 2 and all(parts)


@contextmanager
def model_files(path_or_repo: str) -> Iterator[tuple[Path, TensorEntries | None]]:
    """A folder with the model's small files, and its tensor headers when they came from the Hub."""
    from qwen3_mlx.loading import resolve_model_path

    name = str(path_or_repo)
    if Path(name).expanduser().exists() or not looks_like_repo_id(name):
        yield resolve_model_path(name), None
        return
    cached = cached_snapshot(name)
    if cached is not None:
        yield cached, None
        return
    with tempfile.TemporaryDirectory(prefix="qwen3-mlx-info-") as folder:
        yield Path(folder), fetch_small_files(name, Path(folder))


def cached_snapshot(repo_id: str) -> Path | None:
    """The repo's complete snapshot in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    from qwen3_mlx.loading import MODEL_FILE_PATTERNS, weight_files

    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True)
        )
        weight_files(folder)
    except (
        CheckpointError,
        OSError,
        ValueError,
    ):  # not cached (LocalEntryNotFoundError), or partly
        return None
    return folder


def fetch_small_files(repo_id: str, folder: Path) -> TensorEntries:
    """Download the repo's config/tokenizer/template into folder; return its tensor headers."""
    from huggingface_hub import get_safetensors_metadata, snapshot_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    from qwen3_mlx.loading import hub_errors

    with hub_errors(repo_id, "cannot read the repo"):
        try:
            snapshot_download(repo_id, allow_patterns=SMALL_FILE_PATTERNS, local_dir=str(folder))
            metadata = get_safetensors_metadata(repo_id)
        except NotASafetensorsRepoError:
            raise CheckpointError(f"{repo_id}: the repo has no safetensors weights") from None
    return {
        name: {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": list(info.data_offsets),
        }
        for file in metadata.files_metadata.values()
        for name, info in file.tensors.items()
    }
