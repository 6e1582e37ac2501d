"""Turn settings into a sampler (mlx-lm's building blocks) and logits processors (presence penalty)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from qwen3_mlx.generate import LogitsProcessor, Sampler


class PresencePenalty:
    """Subtract a flat penalty from every token already generated in this reply.

    mlx-lm's presence penalty looks back over a 20-token window; Qwen3's recommendation is meant
    for the whole reply, so this keeps a running mask instead: one scatter per token, never a scan
    of the reply, whatever its length.
    """

    def __init__(self, penalty: float):
        self.penalty = float(penalty)
        self.mask: mx.array | None = None

    def __call__(self, last_token: mx.array | None, logits: mx.array) -> mx.array:
        if self.mask is None:
            self.mask = mx.zeros((logits.shape[-1],), dtype=logits.dtype)
        if last_token is not None:
            self.mask[last_token] = self.penalty
        return logits - self.mask


def build_sampler(settings: Mapping[str, Any]) -> Sampler:
    """mlx-lm's sampler for temperature, top_p, top_k and min_p (temperature 0 = arg-max)."""
    return make_sampler(
        temp=float(settings["temperature"]),
        top_p=float(settings["top_p"]),
        min_p=float(settings["min_p"]),
        top_k=int(settings["top_k"]),
    )


def build_logits_processors(settings: Mapping[str, Any]) -> list[LogitsProcessor]:
    """Fresh stateful processors for one reply."""
    penalty = float(settings.get("presence_penalty") or 0.0)
    return [PresencePenalty(penalty)] if penalty else []


def seed_reply(seed: int | None, reply_number: int) -> None:
    """Seed MLX's generator for one reply, so a seeded session replays exactly.

    Each reply (retries included) gets its own derived seed, so a retry gives a new answer while
    the whole session stays reproducible.
    """
    if seed is not None:
        mx.random.seed((int(seed) * 1_000_003 + reply_number) % 2**63)
