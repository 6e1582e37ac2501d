"""A group of processes started by `mlx.launch`: joining it, and loading one model over it.

Joining times out instead of waiting forever for a rank that never comes. Before and after the
load, every rank states a fingerprint of its model files and options (or that it failed), so a
misconfigured group fails on every rank with one line instead of leaving some of them waiting.
How the ranks then run the model together is lockstep.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_mlx.errors import DistributedError

CONNECT_TIMEOUT_ENV = "QWEN3_MLX_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 60.0
SAMPLE_BYTES = 1 << 20  # the fingerprint reads this much of the start and end of each file


def launched() -> bool:
    """Whether this process was started by mlx.launch (or by hand with its variables)."""
    return "MLX_RANK" in os.environ and any(
        name in os.environ for name in ("MLX_HOSTFILE", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")
    )


def _connect_timeout() -> float:
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        return float(text) if text else DEFAULT_CONNECT_TIMEOUT
    except ValueError:
        raise DistributedError(f"{CONNECT_TIMEOUT_ENV} must be a number of seconds") from None


@contextmanager
def _watchdog(seconds: float, message: str) -> Iterator[None]:
    """Kill this process with `message` on stderr unless the block ends within `seconds`.

    mx.distributed.init blocks in C++ without releasing the GIL, so no Python thread or signal
    handler can interrupt it: a forked child waits on a pipe and does it (exit status 137).
    """
    read_end, write_end = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # only os calls here: the parent's threads do not exist in this copy
        os.close(write_end)
        import select

        ready, _, _ = select.select([read_end], [], [], seconds)
        if not ready:
            os.write(2, f"Error: {message}\n".encode())
            os.kill(parent, signal.SIGKILL)
        os._exit(0)
    os.close(read_end)
    try:
        yield
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
        os.waitpid(child, 0)


_group: Any = None


def join_group(backend: str = "any") -> Any:
    """The group mlx.launch set up (made once per process); DistributedError if peers never come."""
    global _group
    if _group is not None:
        return _group
    timeout = _connect_timeout()
    rank = os.environ.get("MLX_RANK", "?")
    message = (
        f"rank {rank} could not connect to the other ranks within {timeout:g} s; check that "
        f"every host in the hostfile runs the same command and can reach the others "
        f"(set {CONNECT_TIMEOUT_ENV} to wait longer)"
    )
    try:
        with _watchdog(timeout, message):
            _group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as error:
        raise DistributedError(f"rank {rank} could not join the group: {error}") from None
    return _group


def current_group() -> Any:
    """The group this process joined, when it has more than one rank; else None."""
    return _group if _group is not None and _group.size() > 1 else None


def checkpoint_fingerprint(model_dir: Path, settings: dict[str, Any]) -> bytes:
    """A digest of config.json, every weight file's size and first and last MiB, and settings.

    Cheap (a few MiB read for a 32B model) and it tells apart two checkpoints with the same shapes.
    """
    from qwen3_mlx.safetensors_check import weight_files

    digest = hashlib.sha256()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in weight_files(Path(model_dir)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(max(0, size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.digest()


def agree(group: Any, fingerprint: bytes | None, step: str = "read the model") -> None:
    """Every rank states its fingerprint (None: it failed); the others raise if any failed or differ.

    A rank that failed still takes part, so the others never wait for it; it returns, and its
    caller raises its own error.
    """
    mine = [1, *fingerprint] if fingerprint is not None else [0] * 33
    everyone = mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=group).tolist()
    failed = [rank for rank, row in enumerate(everyone) if row[0] == 0]
    if fingerprint is None:
        return
    if failed:
        names = ", ".join(map(str, failed))
        raise DistributedError(f"rank {names} could not {step} (its own error says why)")
    prints = [bytes(row[1:]).hex()[:12] for row in everyone]
    if len(set(prints)) > 1:
        listed = ", ".join(f"rank {rank} {value}" for rank, value in enumerate(prints))
        raise DistributedError(
            f"the ranks have different model files or settings ({listed}); give every rank a "
            "copy of the same model folder and the same options"
        )


def load_group_model(
    path_or_repo: str | Path,
    group: Any,
    *,
    rope_scaling: dict[str, Any] | None = None,
    compute_dtype: str | mx.Dtype | None = "auto",
    split_vocabulary: bool = True,
) -> tuple[Any, Path, dict[str, Any]]:
    """This rank's shard of the model, once every rank has checked it holds the same files.

    Returns the sharded model, its folder and config. Every rank takes part in both checks (same
    files before the load, loaded after it) even when its own step failed, so a rank that fails
    makes all of them fail with a one-line error instead of leaving them waiting.
    """
    from qwen3_mlx.loading import resolve_compute_dtype, resolve_model_path
    from qwen3_mlx.parallel.shard_loading import load_rank_model

    settings = {"rope_scaling": rope_scaling, "compute_dtype": str(compute_dtype)}
    model_dir, fingerprint, failure = None, None, None
    try:
        model_dir = resolve_model_path(path_or_repo)
        fingerprint = checkpoint_fingerprint(model_dir, settings)
    except Exception as error:  # reported after the others have heard of it
        failure = error
    agree(group, fingerprint)
    if failure is not None:
        raise failure
    assert model_dir is not None
    try:
        dtype = resolve_compute_dtype(compute_dtype)
        model, config = load_rank_model(
            model_dir,
            group,
            rope_scaling=rope_scaling,
            compute_dtype=dtype,
            split_vocabulary=split_vocabulary,
        )
    except Exception:
        agree(group, None, "load the model")
        raise
    agree(group, fingerprint, "load the model")
    return model, model_dir, config


def load_for_group(
    path_or_repo: str | Path,
    group: Any,
    *,
    rope_scaling: dict[str, Any] | None = None,
    compute_dtype: str | mx.Dtype | None = "auto",
) -> tuple[Any, Any, Any]:
    """loading.load, or with a group of 2+ ranks rank 0's shard wrapped as the LeaderModel.

    Returns (model, tokenizer, generation config); the other ranks call lockstep's follow instead.
    """
    from qwen3_mlx.generation_config import GenerationConfig
    from qwen3_mlx.loading import load, resolve_model_path
    from qwen3_mlx.parallel import shard_loading  # noqa: F401 (imported before the tokenizer's thread)
    from qwen3_mlx.parallel.lockstep import LeaderModel
    from qwen3_mlx.tokenizer import Tokenizer, read_hf_tokenizer_in_background

    if group is None or group.size() < 2:
        return load(path_or_repo, rope_scaling=rope_scaling, compute_dtype=compute_dtype)
    try:  # the tokenizer loads while the shard is read, as in load(); a failure shows below
        hf_tokenizer = read_hf_tokenizer_in_background(resolve_model_path(path_or_repo))
    except Exception:
        hf_tokenizer = None
    model, model_dir, config = load_group_model(
        path_or_repo, group, rope_scaling=rope_scaling, compute_dtype=compute_dtype
    )
    hf_tokenizer = hf_tokenizer or read_hf_tokenizer_in_background(model_dir)
    tokenizer = Tokenizer(hf_tokenizer.result())
    generation_config = GenerationConfig.from_model_dir(model_dir, config)
    return LeaderModel(model, group), tokenizer, generation_config
