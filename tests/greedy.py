"""Greedy decoding of the tiny model for the native-kernel tests: the tokens and every step's logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from qwen3_mlx.cache import make_cache

PROMPT = "Reverse these words: moon river star lake bird tree"


def greedy_decode(model, tokenizer, bits: int | None, repeats: int = 6, steps: int = 24):
    """`steps` greedy tokens after PROMPT repeated `repeats` times (a KV cache of `bits`, None for
    float), and the logits of each step as one array."""
    prompt = tokenizer.encode(PROMPT) * repeats
    cache = make_cache(model, bits)
    logits = model(mx.array([prompt]), cache=cache)[0, -1]
    tokens, rows = [], []
    for _ in range(steps):
        token = int(mx.argmax(logits).item())
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        rows.append(np.array(logits))
    return tokens, np.stack(rows)
