"""What the server adds to one reply's decode steps: logprobs and response_format constraints.

start_reply builds its own logits processors, so these sit one level lower, in a thin wrapper
around the model: it sees each step's logits before the engine's processors and sampler, and the
token sampled last (the input of the next step). The first `prefill_calls` calls are prefill
chunks and are passed through untouched.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.generate import PREFILL_CHUNK
from qwen3_mlx.thinking import Phase, ThinkParser
from qwen3_mlx.tokenizer import IM_END_ID, THINK_START_ID


class ResponseFormatError(Qwen3Error):
    """A response_format whose schema llguidance cannot compile."""


def prefill_calls(new_tokens: int, chunk: int = PREFILL_CHUNK) -> int:
    """How many model calls generate.prefill makes for `new_tokens` uncached prompt tokens."""
    return max(0, -(-(new_tokens - 1) // chunk))


class AnswerGrammar:
    """An llguidance grammar for the answer: optional newlines, the JSON, then <|im_end|>."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any] | None, vocab: int):
        import llguidance

        from qwen3_mlx.tool_choice import lltokenizer

        self.lltokenizer = lltokenizer(tokenizer, vocab)  # shared with the tool grammars
        body = dict(schema or {"type": "object"})
        # Qwen3's separators and no free whitespace: the model cannot pad forever.
        body["x-guidance"] = {
            "whitespace_flexible": False,
            "key_separator": ": ",
            "item_separator": ", ",
        }
        grammar = f"start: /\\n{{0,2}}/ body <[{IM_END_ID}]>\nbody: %json {json.dumps(body)}"
        self.matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ResponseFormatError(
                f"response_format schema cannot be used: {self.matcher.get_error()}"
            )
        self.vocab = vocab

    def mask(self) -> mx.array | None:
        """Tokens the grammar allows next, or None once it has nothing to say."""
        import llguidance.numpy as llnp

        if self.matcher.is_error() or self.matcher.is_stopped():
            return None
        bits = llnp.allocate_token_bitmask(1, self.lltokenizer.vocab_size)
        llnp.fill_next_token_bitmask(self.matcher, bits, 0)
        keep = np.unpackbits(bits[0].view(np.uint8), bitorder="little")[: self.vocab]
        return mx.array(keep.astype(bool)) if keep.any() else None


class StepHook:
    """The model, wrapped for one reply: records step logprobs, constrains the answer."""

    def __init__(
        self,
        model: Any,
        prefill: int,
        phase: Phase,
        *,
        top_logprobs: int | None = None,
        grammar: AnswerGrammar | None = None,
        frequency_penalty: float = 0.0,
    ):
        self.model = model
        self.frequency_penalty = frequency_penalty
        self.counts: mx.array | None = None  # times each token was generated
        self.calls = 0
        self.prefill = prefill
        self.top = top_logprobs
        self.rows: list[tuple[mx.array, mx.array, mx.array]] = []  # per step: logprobs row data
        self.grammar = grammar
        self.parser = ThinkParser(phase)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        logits = self.model(inputs, cache=cache)
        step = self.calls - self.prefill
        self.calls += 1
        if step < 0:
            return logits
        last = logits[:, -1, :]
        if self.frequency_penalty:
            last = self._penalize(last, inputs if step > 0 else None)
            logits = last[:, None, :]
        if self.grammar is not None:
            if step > 0:
                self._advance(int(inputs.reshape(-1)[-1].item()))
            last = self._constrain(last)
            logits = last[:, None, :]
        if self.top is not None:
            self._record(last)
        return logits

    def _penalize(self, logits: mx.array, previous: mx.array | None) -> mx.array:
        # OpenAI's frequency penalty: the count of each token over the whole output so far.
        if self.counts is None:
            self.counts = mx.zeros((logits.shape[-1],), dtype=logits.dtype)
        if previous is not None:
            self.counts = self.counts.at[previous.reshape(-1)].add(1.0)
        return logits - self.frequency_penalty * self.counts

    def _advance(self, token: int) -> None:
        was_answering = self.parser.answering
        self.parser.feed(token)
        if was_answering and self.parser.answering and self.grammar is not None:
            self.grammar.matcher.consume_token(token)

    def _constrain(self, logits: mx.array) -> mx.array:
        if not self.parser.answering:
            return logits
        keep = self.grammar.mask()  # type: ignore[union-attr]
        if keep is None:
            return logits
        if self.parser.phase is Phase.START:  # the model may still open a think block first
            keep[THINK_START_ID] = True
        return mx.where(keep, logits, -mx.inf)

    def _record(self, logits: mx.array) -> None:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        k = max(self.top or 0, 1)
        top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        self.rows.append((logprobs, top, mx.take_along_axis(logprobs, top, axis=-1)))

    def entry(self, step: int, token: int) -> tuple[float, list[tuple[int, float]]]:
        """The logprob of `token` at step `step` and the top alternatives, likeliest first."""
        logprobs, top, values = self.rows[step]
        chosen = float(logprobs[0, token].item())
        pairs = sorted(
            zip(top[0].tolist(), values[0].tolist(), strict=True), key=lambda pair: -pair[1]
        )
        return chosen, pairs[: self.top or 0]
