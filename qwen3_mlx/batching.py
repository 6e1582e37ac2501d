"""Continuous batching: many replies decoded together, one batched forward pass per step.

Each reply is a BatchRow. A newcomer is prefilled alone in its own KV cache (one chunk per loop, so
running rows keep decoding between a long prompt's chunks), samples its first token there, and is
then merged into the batch's left-padded cache (mlx-lm's BatchKVCache: per-row offsets, so RoPE
positions and the padding mask are right for every row). A row leaves between two steps, on a stop
id, at max_tokens or when its consumer closes it; its part of the batch cache is copied back into
its own cache, so the prefix cache keeps it.

Sampling is per row: its own processors, sampler and random key (split once per token), so a seeded
reply draws the same tokens whatever else is in the batch. The decoder is driven by one thread; a
row's consumer (any thread) reads GeneratedTokens from the row as from generate_tokens.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from qwen3_mlx.cache_ops import cache_ops
from qwen3_mlx.generate import (
    PREFILL_CHUNK,
    GeneratedToken,
    LogitsProcessor,
    Sampler,
    SamplingStep,
    greedy,
)
from qwen3_mlx.model import CausalLM

_END = object()


class BatchRow:
    """One reply in a BatchDecoder; iterate it (from any thread) for its GeneratedTokens."""

    def __init__(
        self,
        prompt: Sequence[int],
        cache: list[Any],
        *,
        sampler: Sampler = greedy,
        processors: Sequence[LogitsProcessor] = (),
        max_tokens: int,
        seed: int | None = None,
        on_prefill: Callable[[int, int], None] | None = None,
    ):
        if not prompt:
            raise ValueError("a batch row needs at least one new prompt token")
        self.pending = list(prompt)  # prompt tokens not in the cache yet
        self.total = len(prompt) - 1
        self.cache = cache
        # A row always has its own key (random when no seed is given): its draws never depend on
        # its company in the batch.
        self.sample = SamplingStep(
            sampler, processors, secrets.randbits(63) if seed is None else seed
        )
        self.max_tokens = max_tokens
        self.on_prefill = on_prefill
        self.produced = 0
        self.start = time.perf_counter()
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = threading.Event()  # the consumer stopped reading
        self.released = threading.Event()  # the decoder no longer touches the row's cache

    def __iter__(self) -> BatchRow:
        return self

    def __next__(self) -> GeneratedToken:
        item = self.items.get()
        if item is _END:
            self.items.put(_END)
            raise StopIteration
        if isinstance(item, BaseException):
            self.items.put(_END)
            raise item
        return item

    def close(self) -> None:
        """Leave the batch; returns once the row's cache holds everything it was fed."""
        self.closed.set()
        self.released.wait()

    def emit(self, token: int) -> None:
        """Hand a token to the consumer."""
        self.produced += 1
        self.items.put(GeneratedToken(token, time.perf_counter() - self.start))

    def end(self, error: BaseException | None = None) -> None:
        """No more tokens (an error, if given, is raised to the consumer)."""
        if error is not None:
            self.items.put(error)
        self.items.put(_END)
        self.released.set()


class BatchDecoder:
    """The rows being prefilled and the rows decoding together; run_once() advances all of them."""

    def __init__(
        self, model: CausalLM, stop_ids: Iterable[int], prefill_chunk: int = PREFILL_CHUNK
    ) -> None:
        self.model = model
        self.ops = cache_ops(model)  # under a group, rank 0's: the other ranks mirror them
        self.stop_ids = frozenset(stop_ids)
        self.prefill_chunk = prefill_chunk
        self.filling: list[BatchRow] = []
        self.rows: list[BatchRow] = []  # in batch order
        self.cache: list[BatchKVCache] | None = None
        self.inputs: mx.array | None = None  # [B] the token each row feeds next
        self.widest = 0  # the most rows decoded together so far

    def add(self, row: BatchRow) -> None:
        """Take a new row (call from the decoding thread)."""
        if row.max_tokens <= 0:  # nothing to generate (as generate_tokens yields nothing)
            row.end()
            return
        self.filling.append(row)

    @property
    def idle(self) -> bool:
        """Whether there is nothing to run."""
        return not self.filling and not self.rows

    def run_once(self) -> None:
        """Drop closed rows, advance each prefill by one chunk, then one decode step for the batch.

        The step overlaps like generate_tokens: the next forward pass is queued (async) before
        the tokens of the last one are read and handed out, so rows that end there have been
        fed once more (their caches hold that token too; nothing else changes).
        """
        self._drop_closed()
        for row in list(self.filling):
            self._prefill(row)
        if self.rows:
            self._step()

    def fail_all(self, error: BaseException) -> None:
        """End every row with `error` (the decoder cannot go on)."""
        for row in self.filling + self.rows:
            row.end(error)
        self.filling, self.rows, self.cache, self.inputs = [], [], None, None

    def _drop_closed(self) -> None:
        for row in [row for row in self.filling if row.closed.is_set()]:
            self.filling.remove(row)
            row.end()
        closed = [i for i, row in enumerate(self.rows) if row.closed.is_set()]
        if closed:
            self._leave(closed)

    def _prefill(self, row: BatchRow) -> None:
        if len(row.pending) > 1:
            take = min(self.prefill_chunk, len(row.pending) - 1)
            self.model(mx.array(row.pending[:take], dtype=mx.uint32)[None], cache=row.cache)
            mx.eval([layer.state for layer in row.cache])
            row.pending = row.pending[take:]
            if row.on_prefill is not None:
                row.on_prefill(row.total - len(row.pending) + 1, row.total)
            return
        round_alone = getattr(row, "round_alone", None)  # speculative.SpeculativeRow
        if round_alone is not None and not self.rows and self.filling == [row]:
            if round_alone(self.model, self.stop_ids):
                self.filling.remove(row)
            return
        self.filling.remove(row)
        last = mx.array(row.pending, dtype=mx.uint32)[None]
        token = row.sample(self.model(last, cache=row.cache)[:, -1, :])
        mx.async_eval(token)
        self._join(row, token)  # the token is handed out with the batch's, at the next step

    def _join(self, row: BatchRow, token: mx.array) -> None:
        first = self.cache is None
        self.cache = self.ops.merge(self.cache, row.cache)
        self.inputs = token if first else mx.concatenate([self.inputs, token])
        self.rows.append(row)
        self.widest = max(self.widest, len(self.rows))

    def _step(self) -> None:
        fed = self.inputs  # sampled last step, not handed out yet
        assert fed is not None
        self.inputs = self._sample_next(fed)
        mx.async_eval(self.inputs)
        done = []
        for i, (row, token) in enumerate(zip(self.rows, fed.tolist(), strict=True)):
            row.emit(token)
            if token in self.stop_ids or row.produced >= row.max_tokens:
                done.append(i)
        if done:
            self._leave(done)

    def _sample_next(self, fed: mx.array) -> mx.array:
        """The next token of every row [B], from one forward pass over `fed` [B]."""
        logits = self.model(fed[:, None], cache=self.cache)[:, -1, :]  # [B, V]
        plain = [i for i, row in enumerate(self.rows) if row.sample.plain_greedy]
        by_row: dict[int, mx.array] = {}
        if plain:
            # Greedy rows without processors take one arg-max over their logits together: a
            # pass over the vocabulary for the group instead of one per row (and the same rule
            # alone or in a batch, so a row's tokens never depend on its company).
            picked = mx.argmax(logits[mx.array(plain)], axis=-1)
            for n, i in enumerate(plain):
                by_row[i] = self.rows[i].sample.previous = picked[n : n + 1]
        tokens = [
            by_row[i] if i in by_row else row.sample(logits[i : i + 1])
            for i, row in enumerate(self.rows)
        ]
        return mx.concatenate(tokens)

    def _leave(self, indices: list[int]) -> None:
        """Copy the rows' part of the batch cache back into their own caches and drop them."""
        assert self.cache is not None and self.inputs is not None
        leaving = [self.rows[i] for i in indices]
        for i, row in zip(indices, leaving, strict=True):
            self.ops.extract(self.cache, i, row.cache)
            mx.eval([layer.state for layer in row.cache])
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        if keep:
            self.ops.keep(self.cache, keep)
            self.inputs = self.inputs[mx.array(keep)]
        else:
            self.cache, self.inputs = None, None
        self.rows = [self.rows[i] for i in keep]
        for row in leaving:
            row.end()
