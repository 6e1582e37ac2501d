"""tool_choice and schema-constrained tool arguments, as logits processors.

- `none`: <tool_call> and </tool_call> are masked everywhere (nothing may close a call that
  cannot open). The prompt (tools included) stays the same, so the KV cache still holds.
- `required`, or a named function: once the think block has closed, the reply must open a call
  (after at most two newline tokens, as Qwen3 writes them); a named choice then has the
  `{"name": "X", "arguments": ` prefix written for it.
- constrained arguments: inside a call, llguidance masks every token that would break the
  tool's JSON schema, the way llama.cpp's lazy grammar does; outside calls nothing is masked.

The processors that follow the reply read each sampled token (one `.item()` per step), which
costs the overlap of one decode step; tool_choice `auto` without constraints adds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from qwen3_mlx.errors import ToolError
from qwen3_mlx.thinking import TOOL_CALL_END_ID, TOOL_CALL_START_ID, Part, Phase, ThinkParser
from qwen3_mlx.tokenizer import IM_END_ID, THINK_START_ID

NEWLINE_IDS = (198, 271)  # "\n" and "\n\n": what Qwen3 writes between </think> and <tool_call>
NEWLINE_CHARS = {198: 1, 271: 2}


def ban_tool_calls(previous: mx.array | None, logits: mx.array) -> mx.array:
    """tool_choice none: neither <tool_call> nor </tool_call> can ever be sampled."""
    return mask_except(logits, None, banned=(TOOL_CALL_START_ID, TOOL_CALL_END_ID))


def mask_except(
    logits: mx.array, allowed: Sequence[int] | None, banned: Sequence[int] = ()
) -> mx.array:
    """Logits with every token outside `allowed` (or inside `banned`) set to -inf."""
    vocab = logits.shape[-1]
    keep = np.zeros(vocab, dtype=bool) if allowed is not None else np.ones(vocab, dtype=bool)
    if allowed is not None:
        keep[list(allowed)] = True
    keep[list(banned)] = False
    return mx.where(mx.array(keep), logits, -mx.inf)


_LLTOKENIZERS: dict[int, Any] = {}  # built once per tokenizer (about a second)


def lltokenizer(tokenizer: Any, vocab: int) -> Any:
    """llguidance's view of our tokenizer, built once and shared by every grammar."""
    try:
        import llguidance.hf
    except ImportError:  # pragma: no cover - a dependency; the message says how to get it
        raise ToolError("constrained decoding needs the llguidance package") from None
    key = id(tokenizer)
    if key not in _LLTOKENIZERS:
        _LLTOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=vocab)
    return _LLTOKENIZERS[key]


# Qwen3's own separators and no free whitespace: constrained JSON is written the way the template
# renders it back (so the cache prefix holds through a tool loop), and the model cannot pad forever.
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
COMPOSITIONS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalItems", "not", "if", "then", "else", "contains")


class SchemaError(ToolError):
    """A JSON schema llguidance cannot compile (one line: what it could not read)."""


def compile_grammar(tokenizer: Any, vocab: int, grammar: str, what: str) -> Any:
    """An llguidance matcher for `grammar`; SchemaError naming `what` when it does not compile."""
    import llguidance

    matcher = llguidance.LLMatcher(lltokenizer(tokenizer, vocab), grammar, log_level=0)
    if matcher.is_error():
        # The error is "at LINE(COL): reason" and then the whole grammar; the reason is enough.
        reason = matcher.get_error().strip().splitlines()[0]
        reason = reason.split(": ", 1)[1] if reason.startswith("at ") else reason
        raise SchemaError(f"{what} is not a usable JSON schema: {reason}")
    return matcher


def allowed_tokens(tokenizer: Any, vocab: int, matcher: Any) -> mx.array | None:
    """The boolean mask of tokens a matcher allows next (None when it allows none or gave up)."""
    import llguidance.numpy as llnp

    if matcher.is_error():
        return None
    bits = llnp.allocate_token_bitmask(1, lltokenizer(tokenizer, vocab).vocab_size)
    llnp.fill_next_token_bitmask(matcher, bits, 0)
    keep = np.unpackbits(bits[0].view(np.uint8), bitorder="little")[:vocab]
    return mx.array(keep.astype(bool)) if keep.any() else None


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties and
    says nothing about others (as llama.cpp's grammars read it), so a constrained object can close.

    An object without `properties` stays open: `{"type": "object"}` means any object.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    if isinstance(closed.get("properties"), dict):
        closed.setdefault("additionalProperties", False)
        closed["properties"] = {k: closed_objects(v) for k, v in closed["properties"].items()}
    for key in ("$defs", "definitions", "patternProperties"):
        if isinstance(closed.get(key), dict):
            closed[key] = {k: closed_objects(v) for k, v in closed[key].items()}
    for key in (*COMPOSITIONS, *SUBSCHEMAS, "additionalProperties"):
        if key in closed and isinstance(closed[key], (dict, list)):
            closed[key] = closed_objects(closed[key])
    return closed


class ArgumentGrammar:
    """The llguidance grammar of one tool call: `\\n{"name": N, "arguments": <schema>}\\n</tool_call>`.

    Hand-written around the library: llguidance compiles the JSON schemas and computes the masks;
    this class only says where the call starts and ends in Qwen3's format.
    """

    def __init__(self, tokenizer: Any, tools: Sequence[dict[str, Any]], vocab: int):
        schema = {"x-guidance": JSON_STYLE, "anyOf": [_call_schema(t["function"]) for t in tools]}
        grammar = (
            f'start: "\\n" call "\\n" <[{TOOL_CALL_END_ID}]>\ncall: %json {json.dumps(schema)}'
        )
        what = (
            "a tool's parameters"
            if len(tools) > 1
            else f"{tools[0]['function']['name']}'s parameters"
        )
        self.template = compile_grammar(tokenizer, vocab, grammar, what)
        self.tokenizer = tokenizer
        self.vocab = vocab

    def matcher(self) -> Any:
        """A fresh matcher for one call."""
        return self.template.deep_copy()

    def allowed(self, matcher: Any) -> mx.array | None:
        """The boolean mask of tokens the schema allows next (None if the matcher gave up)."""
        return allowed_tokens(self.tokenizer, self.vocab, matcher)


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": closed_objects(function.get("parameters") or {"type": "object"}),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def argument_grammar(
    tokenizer: Any,
    tools: Sequence[dict[str, Any]],
    choice: str,
    vocab: int,
    grammar_cache: dict[str, ArgumentGrammar],
) -> ArgumentGrammar:
    """The compiled grammar of the calls a reply may write (the named tool's, or any tool's),
    compiled once per tool set; SchemaError when a schema does not compile."""
    named = [t for t in tools if t["function"]["name"] == choice]
    key = json.dumps([named or tools], sort_keys=True)
    grammar = grammar_cache.get(key)
    if grammar is None:  # (get, then set: a bounded cache may drop it in between)
        grammar = grammar_cache[key] = ArgumentGrammar(tokenizer, named or tools, vocab)
    return grammar


class ToolCallGuide:
    """A logits processor that follows the reply token by token and steers its tool calls.

    force: None (auto), "required", or a function name. prefix: the token ids a named choice
    writes after <tool_call>. grammar: schema constraints for the calls' JSON, or None.
    single: end the reply (<|im_end|>) right after its first call (parallel_tool_calls false).
    """

    def __init__(
        self,
        phase: Phase,
        *,
        force: str | None = None,
        prefix: Sequence[int] = (),
        grammar: ArgumentGrammar | None = None,
        single: bool = False,
    ):
        self.parser = ThinkParser(phase, tools=True)
        self.single = single
        self.force = force
        self.prefix = list(prefix)
        self.grammar = grammar
        self.pending: list[int] = []
        self.matcher: Any = None
        self.newlines = 0

    def __call__(self, previous: mx.array | None, logits: mx.array) -> mx.array:
        if previous is not None:
            self._advance(int(previous.item()))
        if self.pending:
            return mask_except(logits, [self.pending.pop(0)])
        if self.parser.phase is Phase.CALL and self.matcher is not None:
            keep = self.grammar.allowed(self.matcher)  # type: ignore[union-attr]
            return logits if keep is None else mx.where(keep, logits, -mx.inf)
        if self.force is not None and self.parser.calls == 0 and self.parser.answering:
            return mask_except(logits, self._opening())
        if self.single and self.parser.calls and self.parser.answering:
            return mask_except(logits, [IM_END_ID])
        return logits

    def _opening(self) -> list[int]:
        # At most the "\n\n" the template renders after </think>: more would re-render
        # differently and cost the cache prefix on the next step.
        allowed = [TOOL_CALL_START_ID]
        allowed += [t for t, chars in NEWLINE_CHARS.items() if self.newlines + chars <= 2]
        if self.parser.phase is Phase.START:
            allowed.append(THINK_START_ID)  # the model may still think first
        return allowed

    def _advance(self, token: int) -> None:
        part = self.parser.feed(token)
        if part is Part.CALL_OPEN:
            self.matcher = self.grammar.matcher() if self.grammar is not None else None
            if self.force not in (None, "required") and self.parser.calls == 1:
                self.pending = list(self.prefix)
        elif part is Part.CALL and self.matcher is not None:
            self.matcher.consume_token(token)
        elif part is Part.CALL_CLOSE:
            self.matcher = None
        elif part is Part.ANSWER and token in NEWLINE_CHARS:
            self.newlines += NEWLINE_CHARS[token]


def tool_processors(
    tokenizer: Any,
    tools: Sequence[dict[str, Any]],
    choice: str,
    phase: Phase,
    vocab: int,
    *,
    constrain: bool,
    grammar_cache: dict[str, ArgumentGrammar],
    parallel: bool = True,
) -> list[Callable[[mx.array | None, mx.array], mx.array]]:
    """The logits processors for one reply's tool_choice (none for plain `auto`)."""
    if not tools:
        return []
    if choice == "none":
        return [ban_tool_calls]
    named = [t for t in tools if t["function"]["name"] == choice]
    grammar = None
    if constrain:
        grammar = argument_grammar(tokenizer, tools, choice, vocab, grammar_cache)
    if choice == "auto" and grammar is None and parallel:
        return []
    force = None if choice == "auto" else choice
    name = json.dumps(choice, ensure_ascii=False)
    prefix = tokenizer.encode(f'\n{{"name": {name}, "arguments": ') if named else []
    return [ToolCallGuide(phase, force=force, prefix=prefix, grammar=grammar, single=not parallel)]
