"""Where a model comes from: the one rule telling a local folder from a Hugging Face repo id, and
every call to the Hub (download, cache look-up, the small files `info` reads), with timeouts.

For a repo that is not in the cache, `info` fetches only the config, tokenizer and template files
(into a temporary folder, so the cache never holds a snapshot without weights) and reads the tensor
headers from the Hub by HTTP range requests: the weights are never downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import CheckpointError, ModelNotFoundError

# What a snapshot download fetches: weights, configs, tokenizer and template; never code.
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "merges.txt",
    "LICENSE*",
    "README.md",
]
# What `info` fetches of a repo that is not cached: no weights.
SMALL_FILE_PATTERNS = ["*.json", "*.jinja", "merges.txt"]

TensorEntries = dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}


# The Hub's own grammar for each side of 'owner/name': letters, digits, '_', '-' and '.', not
# beginning or ending with '-' or '.', no '--' or '..', at most 96 characters.
_REPO_PART = re.compile(r"(?!.*(--|\.\.))[\w](?:[\w.-]{0,94}[\w])?")


def is_repo_id(name: str) -> bool:
    """Whether name is spelled like a Hugging Face repo id 'owner/name' (and not like a path)."""
    parts = str(name).split("/")
    return len(parts) == 2 and all(_REPO_PART.fullmatch(part) for part in parts)


def local_folder(name: str | Path) -> Path | None:
    """The local folder name means, None for a repo id; ModelNotFoundError for a path that is not there.

    One rule for every command: an existing path is local; 'owner/name' is a repo id unless
    ./owner exists (then it is a mistyped path, never sent to the Hub); anything else is a
    missing folder.
    """
    path = Path(name).expanduser()
    text = str(name)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{text}: not a folder (give the model's folder)")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelNotFoundError(f"{text}: permission denied (the folder cannot be read)")
        return path
    if not is_repo_id(text):
        raise ModelNotFoundError(
            f"{text}: no such model folder (nor a Hugging Face repo id 'owner/name')"
        )
    if path.parent.is_dir():
        # "models/typo" beside an existing ./models folder is a mistyped path, not a Hub repo.
        raise ModelNotFoundError(
            f"{text}: no such model folder (./{path.parent} exists but holds no {path.name})"
        )
    return None


def hub_timeout() -> float:
    """Seconds to wait for the Hub to answer: HF_HUB_DOWNLOAD_TIMEOUT, else huggingface_hub's 10."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _fill_timeouts(request: Any) -> None:
    # huggingface_hub's shared client has no timeout, and some calls (repo_info) pass None: a
    # stalled proxy then holds them forever. Fill in only the limits a call left open.
    limits = request.extensions.get("timeout")
    if isinstance(limits, dict):
        for key in ("connect", "read", "write", "pool"):
            if limits.get(key) is None:
                limits[key] = hub_timeout()


def _use_timeouts() -> None:
    """Give huggingface_hub's shared HTTP client our timeout hook (once per client)."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks
    if _fill_timeouts not in hooks.get("request", []):
        hooks["request"] = [*hooks.get("request", []), _fill_timeouts]
        get_session().event_hooks = hooks


@contextmanager
def hub_errors(repo_id: str, failed: str) -> Iterator[None]:
    """Turn huggingface_hub's errors about repo_id into one-line ModelNotFoundErrors.

    `failed` names the action for the catch-all ("download failed", "cannot read the repo").
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id}: gated repo; accept its license and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: no such Hugging Face repo (or it is private)"
        ) from None
    except (LocalEntryNotFoundError, httpx2.TimeoutException) as error:
        # snapshot_download turns a timeout into "not in the cache", keeping it as the cause.
        if isinstance(error, httpx2.TimeoutException) or isinstance(
            error.__cause__, httpx2.TimeoutException
        ):
            raise ModelNotFoundError(
                f"{repo_id}: {failed}: the Hugging Face Hub ({constants.ENDPOINT}) did not answer "
                f"within {hub_timeout():g} s (a stalled proxy?); set HF_HUB_DOWNLOAD_TIMEOUT to "
                "wait longer, or HF_HUB_OFFLINE=1 to use the cache only"
            ) from None
        raise ModelNotFoundError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline?)"
            + _shipped_model_hint()
        ) from None
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        raise ModelNotFoundError(f"{repo_id}: {failed} ({type(error).__name__}: {error})") from None


def _shipped_model_hint() -> str:
    """From a checkout, how to try the tiny model it ships (models/qwen3-tiny-chat); else ''."""
    folder = Path(__file__).resolve().parents[1] / "models" / "qwen3-tiny-chat"
    if not (folder / "config.json").is_file():
        return ""  # an installed wheel ships no models
    try:
        shown = folder.relative_to(Path.cwd())
    except ValueError:
        shown = folder
    return f"; to try the tiny model this checkout ships, use --model {shown}"


def _silent_progress_class() -> type:
    """huggingface_hub's tqdm, always disabled (library code never prints).

    snapshot_download drives its bars through the whole tqdm API (total, refresh, set_description,
    thread locks), so a hand-written stand-in breaks downloads; a disabled real bar does not.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    class SilentProgress(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentProgress


def download_model(repo_id: str, *, progress: bool = True) -> Path:
    """Snapshot-download only the files a model needs; the HF cache answers offline."""
    from huggingface_hub import snapshot_download

    cached = cached_snapshot(repo_id, complete=False)
    if cached is not None:
        # The cache first: works offline and avoids a network round trip for a model we have.
        return cached
    _use_timeouts()
    with hub_errors(repo_id, "download failed"):
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=MODEL_FILE_PATTERNS,
                tqdm_class=None if progress else _silent_progress_class(),
                etag_timeout=hub_timeout(),
            )
        )


def cached_snapshot(repo_id: str, *, complete: bool = True) -> Path | None:
    """The repo's snapshot in the Hugging Face cache (complete: with every weight file), or None."""
    from huggingface_hub import snapshot_download

    from qwen3_mlx.safetensors_check import weight_files

    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True)
        )
        if complete:
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

    _use_timeouts()
    with hub_errors(repo_id, "cannot read the repo"):
        try:
            snapshot_download(
                repo_id,
                allow_patterns=SMALL_FILE_PATTERNS,
                local_dir=str(folder),
                etag_timeout=hub_timeout(),
            )
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
