"""Running one model over several processes started by `mlx.launch`: rank 0 leads, the rest follow.

Rank 0 runs the engine exactly as a single process does (Chat, the server, the sampler); only its
model is wrapped. Each call of the wrapped model first sends a small header to every rank (which
cache, how many tokens it holds, the input shape), then the input token ids, both as `all_sum`s
to which the other ranks add zeros. The followers run the same forward pass on their shard with
their own copy of the cache, so every collective of the pass is matched. Sampled tokens reach the
followers as the next call's input, so all ranks always hold the same tokens; only rank 0 samples.

Every collective of one call hangs on one chain of data (header -> tokens -> layers -> logits),
so both sides run them in the same order, and rank 0 queues the whole pass at once
(`mx.async_eval`) so none is left half done. A call returns the logits of the last position only:
the vocabulary-split head then gathers one row, and a 512-token prefill chunk costs no head.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_mlx.errors import Qwen3Error

CONNECT_TIMEOUT_ENV = "QWEN3_MLX_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 60.0
SAMPLE_BYTES = 1 << 20  # the fingerprint reads this much of the start and end of each file

# The header: op, cache key, tokens the cache holds, batch, length, kv bits, a cache to drop, code.
HEADER_SIZE = 8
FORWARD, STOP = 1, 2


class DistributedError(Qwen3Error):
    """The group of ranks is misconfigured or broke apart."""


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
    from qwen3_mlx.shard_loading import load_rank_model

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


def _last_logits(model: Any, tokens: mx.array, cache: Any) -> mx.array:
    """The logits of the last position only: [B, 1, vocab]."""
    h = model.model(tokens, cache)[:, -1:, :]
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _broadcast(values: mx.array, group: Any, leads: bool) -> mx.array:
    """Rank 0's values on every rank (the others add zeros)."""
    return mx.distributed.all_sum(values if leads else mx.zeros_like(values), group=group)


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back until a call's collectives are all queued (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


_leaders: list[LeaderModel] = []


def stop_followers(code: int = 0) -> None:
    """Stop the followers of every model this process leads (the CLI calls it on the way out)."""
    while _leaders:
        _leaders.pop().stop(code)


class LeaderModel:
    """Rank 0's model: each call is announced to the followers, which run it on their shards."""

    def __init__(self, model: Any, group: Any):
        self.inner = model
        self.group = group
        self.lock = threading.Lock()  # the server's worker thread and the main thread's stop()
        self._keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._dropped: list[int] = []
        self._next_key = 1
        self.stopped = False
        _leaders.append(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _key(self, cache: Any) -> int:
        first = cache[0]
        if first not in self._keys:
            self._keys[first] = key = self._next_key
            self._next_key += 1
            weakref.finalize(first, self._dropped.append, key)
        return self._keys[first]

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        if cache and type(cache[0]).__name__ not in ("KVCache", "QuantizedKVCache"):
            raise DistributedError(
                f"a {type(cache[0]).__name__} (batched decoding) cannot be used by a group of ranks"
            )
        B, L = inputs.shape
        key = self._key(cache) if cache else 0
        offset = cache[0].offset if cache else 0
        kv_bits = getattr(cache[0], "bits", 0) if cache else 0
        drop = self._dropped.pop() if self._dropped else 0
        with self.lock, _uninterrupted():
            header = mx.array([FORWARD, key, offset, B, L, kv_bits, drop, 0], dtype=mx.int32)
            header = _broadcast(header, self.group, True)
            # The token ids depend on the header, so the two collectives keep their order.
            tokens = _broadcast(inputs.astype(mx.int32) + 0 * header[0], self.group, True)
            logits = _last_logits(self.inner, tokens, cache)
            mx.async_eval(logits)
        return logits

    def stop(self, code: int = 0) -> None:
        """Tell the followers to exit with `code` (once; after everything queued has run)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            header = mx.array([STOP, 0, 0, 0, 0, 0, 0, code], dtype=mx.int32)
            mx.eval(_broadcast(header, self.group, True))


def follow(model: Any, group: Any) -> int:
    """Run rank 0's model calls on this rank's shard until it stops; return its exit code."""
    from qwen3_mlx.cache import make_cache, trim_cache  # (mlx-lm: kept out of join_group's path)

    caches: dict[int, list[Any]] = {}
    empty = mx.zeros((HEADER_SIZE,), dtype=mx.int32)
    while True:
        header = _broadcast(empty, group, False).tolist()
        op, key, offset, B, L, kv_bits, drop, code = header
        caches.pop(drop, None)
        if op == STOP:
            return code
        if op != FORWARD:
            raise DistributedError(f"rank {group.rank()} got an unknown message {header}")
        cache = None
        if key:
            cache = caches.setdefault(key, make_cache(model, kv_bits or None))
            held = cache[0].offset
            if held < offset:
                raise DistributedError(
                    f"rank {group.rank()} holds {held} tokens of a cache rank 0 says holds "
                    f"{offset}: a KV cache restored from a file cannot be used by a group"
                )
            trim_cache(cache, offset)
        tokens = _broadcast(mx.zeros((B, L), dtype=mx.int32), group, False)
        mx.eval(_last_logits(model, tokens, cache))


def ignore_interrupts() -> None:
    """Followers leave Ctrl-C to rank 0 (on one machine the terminal sends it to every rank)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def lost_connection(error: BaseException) -> DistributedError:
    """The one-line error for a collective that failed because a rank went away."""
    return DistributedError(f"lost the connection to another rank ({error})")
