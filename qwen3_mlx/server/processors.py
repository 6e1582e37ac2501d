"""The server's own logits processors: response_format and logprob recording.

(Its frequency penalty is sampling.FrequencyPenalty, beside the engine's presence penalty.)

They go to start_reply as extra_processors and run after the engine's (presence penalty,
tool_choice), one reply each, with the engine's (previous token, logits) call. In a batch they
see their own row only. The recorder runs last, so logprobs describe what was sampled from.
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.thinking import Phase, ThinkParser
from qwen3_mlx.tokenizer import IM_END_ID, THINK_START_ID


class ResponseFormatError(Qwen3Error):
    """A response_format whose schema llguidance cannot compile."""


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


class AnswerConstraint:
    """response_format: the answer (after any think block) follows the grammar."""

    def __init__(self, grammar: AnswerGrammar, phase: Phase):
        self.grammar = grammar
        self.parser = ThinkParser(phase)

    def __call__(self, previous: mx.array | None, logits: mx.array) -> mx.array:
        if previous is not None:
            token = int(previous.reshape(-1)[-1].item())
            was_answering = self.parser.answering
            self.parser.feed(token)
            if was_answering and self.parser.answering:
                self.grammar.matcher.consume_token(token)
        if not self.parser.answering:
            return logits
        keep = self.grammar.mask()
        if keep is None:
            return logits
        if self.parser.phase is Phase.START:  # the model may still open a think block first
            keep[THINK_START_ID] = True
        return mx.where(keep, logits, -mx.inf)


class LogprobRecorder:
    """Records each step's log probabilities and top alternatives, as plain numbers.

    They are read on the consumer's side (another thread than the decoder), so each step is
    evaluated and copied out here; a step's full row is dropped once it has been taken.
    """

    def __init__(self, top: int):
        self.top = top
        self.steps: list[tuple[np.ndarray | None, list[tuple[int, float]]]] = []

    def __call__(self, previous: mx.array | None, logits: mx.array) -> mx.array:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        k = max(self.top, 1)
        top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        values = mx.take_along_axis(logprobs, top, axis=-1)
        mx.eval(logprobs, top, values)
        pairs = sorted(
            zip(top[0].tolist(), values[0].tolist(), strict=True), key=lambda pair: -pair[1]
        )
        self.steps.append((np.array(logprobs[0]), pairs[: self.top]))
        return logits

    def take(self, step: int, token: int) -> tuple[float, list[tuple[int, float]]]:
        """The logprob of `token` at step `step` and the top alternatives, likeliest first
        (once per step: the step's full row is dropped)."""
        row, pairs = self.steps[step]
        assert row is not None, "each step is taken once"
        self.steps[step] = (None, pairs)
        return float(row[token]), pairs
