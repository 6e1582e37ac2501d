"""A saved KV cache beside a transcript, so a long conversation resumes without a re-prefill.

The file is safetensors, written by mlx-lm's save_prompt_cache (the layer states) with our metadata:
the exact token ids the cache holds and a fingerprint of everything that decides those states:
the weights (a digest of the config and of a few tensors), the chat template, the compute dtype,
the KV bits and the RoPE settings. A cache is restored only when every part matches; otherwise,
or when the file is damaged, the caller falls back to a prefill. Writing is atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_mlx.cache import PromptCache
from qwen3_mlx.errors import Qwen3Error

FORMAT = "qwen3-mlx-kv-cache-1"


class CacheFileError(Qwen3Error):
    """A saved KV cache that cannot be used (another model or setting, or a damaged file)."""


def cache_path(transcript: Path) -> Path:
    """Where the KV cache of a transcript lives: conv.json -> conv.kv.safetensors."""
    return transcript.with_suffix(".kv.safetensors")


def fingerprint(model: Any, tokenizer: Any, kv_bits: int | None) -> dict[str, str]:
    """What a cache depends on, each part as a short string (compared part by part)."""
    if getattr(model, "group", None) is not None:  # distributed.LeaderModel
        # Rank 0's cache holds its shard of the KV heads only, and the embedding lookup below
        # would be a collective the other ranks do not expect.
        raise CacheFileError("a KV cache file cannot be saved or restored by a group of ranks")
    weights = hashlib.sha256(json.dumps(asdict(model.args), sort_keys=True).encode())
    inner = model.model
    for tensor in (inner.norm.weight, inner.layers[0].input_layernorm.weight):
        weights.update(memoryview(mx.array(tensor, dtype=mx.float32)))
    weights.update(memoryview(inner.embed_tokens(mx.arange(8)).astype(mx.float32)))
    template = str(getattr(tokenizer.hf, "chat_template", "") or "")
    return {
        "weights": weights.hexdigest()[:32],
        "template": hashlib.sha256(template.encode()).hexdigest()[:32],
        "compute dtype": str(inner.norm.weight.dtype),
        "kv bits": str(kv_bits),
        "rope": json.dumps(model.args.rope_scaling, sort_keys=True),
    }


def save_cache(path: Path, cache: PromptCache, prints: dict[str, str]) -> int:
    """Write the cache and its metadata atomically; return the file's size in bytes."""
    from mlx_lm.models.cache import save_prompt_cache

    metadata = {
        "format": FORMAT,
        "tokens": json.dumps(cache.tokens),
        "fingerprint": json.dumps(prints, sort_keys=True),
    }
    handle, temporary = tempfile.mkstemp(
        prefix=".kv-", suffix=".safetensors", dir=path.parent or "."
    )
    os.close(handle)
    try:
        save_prompt_cache(temporary, cache.cache, metadata)
        os.replace(temporary, path)
    except OSError as error:
        raise CacheFileError(f"{path}: cannot write the KV cache ({error.strerror})") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path.stat().st_size


def saved_rope(path: Path) -> dict[str, Any] | None:
    """The RoPE settings a cache file was saved with (None: native or unreadable).

    Reads only the safetensors header (8 bytes of length, then JSON), not the tensors. mlx-lm
    flattens the metadata under a position prefix ("0.fingerprint").
    """
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(file.read(size))
        metadata = header["__metadata__"]
        prints = json.loads(next(v for k, v in metadata.items() if k.endswith("fingerprint")))
        rope = json.loads(prints["rope"])
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return None
    return rope if isinstance(rope, dict) else None


def load_cache(path: Path, model: Any, prints: dict[str, str]) -> PromptCache:
    """The PromptCache saved at path; CacheFileError says why it cannot be used."""
    from mlx_lm.models.cache import load_prompt_cache

    try:
        layers, metadata = load_prompt_cache(str(path), return_metadata=True)
        saved = json.loads(metadata["fingerprint"])
        tokens = json.loads(metadata["tokens"])
        known = metadata.get("format") == FORMAT
    except Exception as error:  # noqa: BLE001 (any damage: the caller re-prefills instead)
        raise CacheFileError(f"{path}: the KV cache file is damaged ({error})") from None
    if not known:
        raise CacheFileError(f"{path}: not a qwen3-mlx KV cache")
    differing = [part for part in prints if saved.get(part) != prints[part]]
    if differing:
        raise CacheFileError(f"{path}: saved for another {' and '.join(differing)}")
    if len(layers) != len(model.layers) or any(layer.offset != len(tokens) for layer in layers):
        raise CacheFileError(f"{path}: the KV cache does not match its token list")
    cache = PromptCache(model, None if prints["kv bits"] == "None" else int(prints["kv bits"]))
    cache.cache, cache.tokens = layers, [int(token) for token in tokens]
    return cache
