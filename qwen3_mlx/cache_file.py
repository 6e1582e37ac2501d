"""A saved KV cache beside a transcript, so a long conversation resumes without a re-prefill.

The file is safetensors: each layer's keys and values cut to the tokens they hold (a quantized
layer's packed words, scales and biases as three tensors), and metadata: the exact token ids the
cache holds and a fingerprint of everything that decides those states: the weights (a digest of the config and of a few tensors), the chat template, the compute dtype,
the KV bits and the RoPE settings. A cache is restored only when every part matches; otherwise,
or when the file is damaged (every array is checked for shape, dtype and finite values), the
caller falls back to a prefill. Writing is atomic.
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

from qwen3_mlx.cache import PromptCache, make_cache
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.model import CausalLM
from qwen3_mlx.rope_auto import RopeAuto, switch

# 2: our own layout (layer.keys.part, cut to the tokens held), bf16 scales in quantized caches.
FORMAT = "qwen3-mlx-kv-cache-2"


class CacheFileError(Qwen3Error):
    """A saved KV cache that cannot be used (another model or setting, or a damaged file)."""


def cache_path(transcript: Path) -> Path:
    """Where the KV cache of a transcript lives: conv.json -> conv.kv.safetensors."""
    return transcript.with_suffix(".kv.safetensors")


def fingerprint(model: CausalLM, tokenizer: Any, kv_bits: int | None) -> dict[str, str]:
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


def _layer_arrays(index: int, layer: Any, length: int) -> dict[str, mx.array]:
    """One layer's keys and values, cut to the tokens it holds (not its 256-token allocation)."""
    if layer.keys is None:
        return {}
    arrays = {}
    for name, held in (("keys", layer.keys), ("values", layer.values)):
        parts = held if isinstance(held, tuple) else (held,)  # quantized: (packed, scales, biases)
        for part_index, part in enumerate(parts):
            arrays[f"{index}.{name}.{part_index}"] = part[..., :length, :]
    return arrays


def save_cache(path: Path, cache: PromptCache, prints: dict[str, str]) -> int:
    """Write the cache and its metadata atomically; return the file's size in bytes."""
    length = len(cache.tokens)
    arrays: dict[str, mx.array] = {}
    for index, layer in enumerate(cache.cache):
        arrays |= _layer_arrays(index, layer, length)
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
        mx.save_safetensors(temporary, arrays, metadata)
        os.replace(temporary, path)
    except OSError as error:
        raise CacheFileError(f"{path}: cannot write the KV cache ({error.strerror})") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path.stat().st_size


def saved_rope(path: Path) -> dict[str, Any] | None:
    """The RoPE settings a cache file was saved with (None: native or unreadable).

    Reads only the safetensors header (8 bytes of length, then JSON), not the tensors. Files of
    format 1 (mlx-lm's save_prompt_cache) hold it under a position prefix ("0.fingerprint").
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


def _expected_parts(model: CausalLM, kv_bits: int | None) -> list[tuple[tuple[int, ...], mx.Dtype]]:
    """(batch, heads, last dimension) and dtype of each part a layer of this cache holds.

    Asked of a fresh cache layer fed one token, so the check is exactly what the cache stores
    (a quantized layer: packed words, then bf16 scales and biases).
    """
    probe = make_cache(model, kv_bits)[0]
    heads, head_dim = model.args.num_key_value_heads, model.args.head_dim
    token = mx.zeros((1, heads, 1, head_dim), dtype=model.model.norm.weight.dtype)
    probe.update_and_fetch(token, token)
    parts = probe.keys if isinstance(probe.keys, tuple) else (probe.keys,)
    return [((part.shape[0], part.shape[1], part.shape[3]), part.dtype) for part in parts]


def _check_arrays(
    arrays: dict[str, mx.array], model: CausalLM, kv_bits: int | None, length: int
) -> str:
    """Why the saved arrays cannot be this model's cache of `length` tokens ('' when they can)."""
    expected = _expected_parts(model, kv_bits)
    layers = len(model.layers) if length else 0
    names = {
        f"{index}.{name}.{part}"
        for index in range(layers)
        for name in ("keys", "values")
        for part in range(len(expected))
    }
    if set(arrays) != names:
        return "its arrays are not the ones this model's cache holds"
    for key, array in arrays.items():
        (batch, heads, last), dtype = expected[int(key.rsplit(".", 1)[1])]
        if array.shape != (batch, heads, length, last) or array.dtype != dtype:
            return (
                f"{key} is {array.dtype} {tuple(array.shape)}, not {dtype} "
                f"{(batch, heads, length, last)}"
            )
    floats = [array for array in arrays.values() if mx.issubdtype(array.dtype, mx.floating)]
    if floats and not mx.stack([mx.isfinite(array).all() for array in floats]).all().item():
        return "it holds values that are not finite (NaN or infinity)"
    return ""


def load_cache(path: Path, model: CausalLM, prints: dict[str, str]) -> PromptCache:
    """The PromptCache saved at path; CacheFileError says why it cannot be used.

    Every array is checked against this model and the fingerprint (shape, dtype, finite values)
    before it goes in the cache: a damaged file costs a prefill, never a reply.
    """
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        mx.eval(list(arrays.values()))  # a truncated file fails here, not in the next reply
        known = metadata.get("format") == FORMAT
        saved = json.loads(metadata["fingerprint"]) if known else {}
        tokens = [int(token) for token in json.loads(metadata["tokens"])] if known else []
    except Exception as error:  # noqa: BLE001 (any damage: the caller re-prefills instead)
        raise CacheFileError(f"{path}: the KV cache file is damaged ({error})") from None
    if not known:
        older = any(key.endswith("format") for key in metadata)
        raise CacheFileError(
            f"{path}: " + ("written by an older qwen3-mlx" if older else "not a qwen3-mlx KV cache")
        )
    differing = [
        part for part in prints if not isinstance(saved, dict) or saved.get(part) != prints[part]
    ]
    if differing:
        raise CacheFileError(f"{path}: saved for another {' and '.join(differing)}")
    kv_bits = None if prints["kv bits"] == "None" else int(prints["kv bits"])
    problem = _check_arrays(arrays, model, kv_bits, len(tokens))
    if problem:
        raise CacheFileError(f"{path}: the KV cache does not fit this model ({problem})")
    cache = PromptCache(model, kv_bits)
    count = 3 if kv_bits is not None else 1  # quantized: packed words, scales, biases
    for index, layer in enumerate(cache.cache if tokens else []):
        held = []
        for name in ("keys", "values"):
            parts = [arrays[f"{index}.{name}.{part}"] for part in range(count)]
            held.append(tuple(parts) if count > 1 else parts[0])
        layer.keys, layer.values = held
        layer.offset = len(tokens)
    cache.tokens = tokens
    return cache


def save_beside(transcript: Path, model: CausalLM, tokenizer: Any, cache: PromptCache) -> int:
    """Write a conversation's KV cache beside its transcript; return the file's size in bytes."""
    prints = fingerprint(model, tokenizer, cache.kv_bits)
    return save_cache(cache_path(transcript), cache, prints)


def restore_beside(
    transcript: Path, model: CausalLM, tokenizer: Any, cache: PromptCache, plan: RopeAuto | None
) -> PromptCache:
    """The KV cache saved beside a transcript, for this model; CacheFileError says why not.

    Under `--rope-scaling auto` (plan) the model first takes the RoPE the cache was made with, if
    the plan could have chosen it (the current cache is then dropped); the fingerprint check
    decides the rest.
    """
    saved = cache_path(transcript)
    try:
        if plan is not None:
            scaling = saved_rope(saved)
            factor = None if scaling is None else scaling.get("factor")
            fits = scaling is None or (
                factor in plan.factors
                and scaling.get("original_max_position_embeddings") == plan.original
            )
            if fits and factor != plan.factor:
                switch(model, plan, None if factor is None else float(factor))
                cache.clear()
        return load_cache(saved, model, fingerprint(model, tokenizer, cache.kv_bits))
    except CacheFileError:
        raise
    except Exception as error:  # noqa: BLE001 (whatever the file holds: a note and a prefill)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise CacheFileError(f"{saved}: the KV cache cannot be restored ({reason})") from None
