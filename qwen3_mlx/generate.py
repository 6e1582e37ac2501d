"""The token generator: prefill a prompt into a KV cache, then sample tokens one by one.

It yields token ids with timing and knows nothing of text. The cache is advanced in place: after the
generator stops, `cache_length(cache)` tells how many of prompt + yielded tokens it holds (the step
for the token after the last one yielded may already have run, as generation overlaps one step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from qwen3_mlx.model import CausalLM

# A sampler takes log probabilities [B, V] and an optional random key (None: MLX's global one).
Sampler = Callable[..., mx.array]
# A stateful logits processor sees the token sampled last (None on the first step) and the logits.
LogitsProcessor = Callable[[mx.array | None, mx.array], mx.array]

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class GeneratedToken:
    """One sampled token and the seconds since generation started."""

    token: int
    seconds: float
    # Speculative decoding (speculative.py): whether this token opened a target pass, how many
    # drafted tokens that pass checked (on its first token), and 1 when this token is an accepted
    # draft.
    target_step: bool = True
    drafted: int = 0
    accepted: int = 0


def greedy(logprobs: mx.array, key: mx.array | None = None) -> mx.array:
    """The arg-max sampler (the key is not needed)."""
    return mx.argmax(logprobs, axis=-1)


class SamplingStep:
    """One reply's sampling step: its logits processors, then its sampler with its own random key.

    seed: the reply's random stream, a key split once per token, so a seeded reply draws the same
    tokens whatever else runs (None: MLX's global generator). Generation and batching both sample
    through this, so a token is chosen by the same rule alone or in a batch.
    """

    def __init__(
        self,
        sampler: Sampler = greedy,
        processors: Sequence[LogitsProcessor] = (),
        seed: int | None = None,
        previous: mx.array | None = None,
    ):
        self.sampler = sampler
        self.processors = list(processors)
        self.seed = seed
        self.key: mx.array | None = None  # made at the first token, on the thread that samples
        self.previous = previous  # the token sampled last [1], as the processors see it

    @property
    def plain_greedy(self) -> bool:
        """Arg-max sampling and no logits processors."""
        return self.sampler is greedy and not self.processors

    def __call__(self, logits: mx.array) -> mx.array:
        """The next token [1] from one row's logits [1, V]."""
        if self.plain_greedy:
            # The arg-max of the logits themselves, as batching and speculative verification
            # take it: the log-softmax would not move it, and on MLX's CPU backend its scalar exp
            # over the vocabulary cost ~1.9 ms of CPU per token (a 0.6B step is ~55 ms).
            self.previous = mx.argmax(logits, axis=-1).reshape(1)
            return self.previous
        for processor in self.processors:
            logits = processor(self.previous, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = self.sampler(logprobs, key=self._next_key()).reshape(1)
        self.previous = token
        return token

    def _next_key(self) -> mx.array | None:
        if self.seed is None or self.sampler is greedy:
            return None
        if self.key is None:
            self.key = mx.random.key(self.seed)
        keys = mx.random.split(self.key)
        self.key = keys[0]
        return keys[1]


def prefill(
    model: CausalLM,
    tokens: Sequence[int],
    cache: list[Any],
    chunk: int = PREFILL_CHUNK,
    on_progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Run all tokens but the last through the model in chunks, filling the cache; return the last.

    on_progress(done, total) runs after each chunk (a long prompt shows progress; Ctrl-C lands
    between chunks, and the cache then holds exactly the chunks done).
    """
    ids = mx.array(list(tokens), dtype=mx.uint32)
    total, done = ids.shape[0] - 1, 0
    if on_progress is not None and total > 0:
        on_progress(0, total)  # the start, so a view can time the rate
    while ids.shape[0] > 1:
        take = min(chunk, ids.shape[0] - 1)
        model(ids[None, :take], cache=cache)
        mx.eval([c.state for c in cache])
        ids = ids[take:]
        done += take
        if on_progress is not None:
            on_progress(done, total)
    return ids


def generate_tokens(
    model: CausalLM,
    prompt: Sequence[int],
    cache: list[Any],
    *,
    sampler: Sampler = greedy,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    prefill_chunk: int = PREFILL_CHUNK,
    on_prefill: Callable[[int, int], None] | None = None,
    previous_token: int | None = None,
    seed: int | None = None,
) -> Iterator[GeneratedToken]:
    """Yield up to max_tokens sampled tokens after `prompt` (the part not yet in the cache).

    previous_token: when this continues a reply (its sampled tokens end `prompt`), the last of
    them, so stateful logits processors see it as they would have in one run.
    seed: the reply's own random key (see SamplingStep); None samples from MLX's global one.
    """
    if not prompt:
        raise ValueError("generate_tokens needs at least one new prompt token")
    start = time.perf_counter()
    last = prefill(model, prompt, cache, prefill_chunk, on_prefill)
    previous = None if previous_token is None else mx.array([previous_token], dtype=mx.uint32)
    sample = SamplingStep(sampler, logits_processors, seed, previous)

    def step(inputs: mx.array) -> mx.array:
        return sample(model(inputs[None], cache=cache)[:, -1, :])

    token = step(last)
    mx.async_eval(token)
    for produced in range(max_tokens):
        # Queue the next step before waiting on this one, so compute overlaps our Python work.
        following = step(token) if produced + 1 < max_tokens else None
        if following is not None:
            mx.async_eval(following)
        yield GeneratedToken(int(token.item()), time.perf_counter() - start)
        if following is None:
            return
        token = following
