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
from qwen3_mlx.server.grammars import GrammarCache
from qwen3_mlx.thinking import Phase, ThinkParser
from qwen3_mlx.tokenizer import IM_END_ID, THINK_START_ID


class ResponseFormatError(Qwen3Error):
    """A response_format whose schema llguidance cannot compile."""


# Compiled answer grammars kept for reuse: a client repeats its schema from request to request.
_ANSWER_GRAMMARS = GrammarCache(max_entries=32)


def answer_template(tokenizer: Any, schema: dict[str, Any] | None, vocab: int) -> Any:
    """The compiled matcher of an answer grammar (kept for reuse); ResponseFormatError when the
    schema does not compile. Call it when the request is read, so a bad schema is a 400."""
    from qwen3_mlx.tool_choice import JSON_STYLE, SchemaError, closed_objects, compile_grammar

    body = dict(closed_objects(schema or {"type": "object"}))
    body["x-guidance"] = JSON_STYLE
    grammar = f"start: /\\n{{0,2}}/ body <[{IM_END_ID}]>\nbody: %json {json.dumps(body)}"
    key = (id(tokenizer), grammar)
    template = _ANSWER_GRAMMARS.get(key)
    if template is not None:
        return template
    try:
        template = compile_grammar(tokenizer, vocab, grammar, "the response_format schema")
    except SchemaError as error:
        raise ResponseFormatError(str(error)) from None
    _ANSWER_GRAMMARS[key] = template
    return template


class AnswerGrammar:
    """An llguidance grammar for the answer: optional newlines, the JSON, then <|im_end|>."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any] | None, vocab: int):
        self.matcher = answer_template(tokenizer, schema, vocab).deep_copy()
        self.tokenizer = tokenizer
        self.vocab = vocab

    def mask(self) -> mx.array | None:
        """Tokens the grammar allows next, or None once it has nothing to say."""
        from qwen3_mlx.tool_choice import allowed_tokens

        if self.matcher.is_stopped():
            return None
        return allowed_tokens(self.tokenizer, self.vocab, self.matcher)


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
