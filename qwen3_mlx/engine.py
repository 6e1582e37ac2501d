"""One reply from a conversation: the prompt step and the generation pipeline every front end shares.

Chat (the REPL and `prompt`) and the server both prepare their messages here (`prepare_prompt`:
size pre-check, render, context check, thinking mode, settings), then start the reply with the
prompt, a PromptCache and its Sampling; `start_reply` wires the stream (think and tool-call split),
the sampler, the logits processors (penalties, tool_choice, schema constraints) and the token
generator into a Reply. Keeping history, or choosing which cache serves a prompt, is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from qwen3_mlx.cache import PromptCache
from qwen3_mlx.errors import ContextOverflowError
from qwen3_mlx.events import TurnResult
from qwen3_mlx.generate import GeneratedToken, generate_tokens
from qwen3_mlx.limits import min_tokens
from qwen3_mlx.model import CausalLM
from qwen3_mlx.reply import Reply
from qwen3_mlx.rope_auto import RopeAuto, switch
from qwen3_mlx.sampling import build_logits_processors, build_sampler, reply_seed
from qwen3_mlx.settings import Sampling, SamplingDefaults
from qwen3_mlx.stream import RepetitionGuard, ReplyStream
from qwen3_mlx.thinking import prompt_phase, thinking_active
from qwen3_mlx.tokenizer import Tokenizer
from qwen3_mlx.tool_choice import tool_processors


@dataclass
class ToolSetup:
    """The tools of a reply and how calls are steered (see tool_choice.py)."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "auto"  # "auto", "none", "required" or a function name
    constrain: bool = False  # schema-constrained arguments (llguidance)
    parallel: bool = True  # False: the reply ends after its first call
    grammars: dict[str, Any] = field(default_factory=dict)  # compiled grammars, kept for reuse

    @property
    def parses_calls(self) -> bool:
        """Whether calls are split out of the reply at all."""
        return bool(self.tools) and self.choice != "none"


@dataclass(frozen=True)
class PreparedPrompt:
    """A conversation made ready for start_reply: its prompt ids and the reply's settings."""

    prompt: list[int]
    thinks: bool  # whether the reply is in thinking mode (its preset is the thinking one)
    sampling: Sampling


def render_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    thinking: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Prompt ids from the model's own template; the hard switch goes only to templates that have it."""
    enable_thinking = thinking if tokenizer.has_thinking_switch else None
    return tokenizer.render(messages, tools=tools, enable_thinking=enable_thinking)


def check_context(prompt_tokens: int, context_limit: int, *, yarn_enabled: bool = False) -> None:
    """ContextOverflowError when a prompt leaves no room for a reply."""
    if prompt_tokens >= context_limit:
        raise ContextOverflowError(prompt_tokens, context_limit, yarn_enabled=yarn_enabled)


def prepare_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    defaults: SamplingDefaults,
    context_limit: int,
    thinking: bool = True,
    tools: list[dict[str, Any]] | None = None,
    explicit: Mapping[str, Any] | None = None,
    yarn_enabled: bool = False,
) -> PreparedPrompt:
    """The prompt and settings of the next reply to `messages`, every front end's one prompt step.

    A conversation too big by its size alone is refused before any tokenizing; then the template
    renders it, the context is checked, and the mode's preset (defaults: the model's
    generation_config) takes the explicit values on top. Raises ContextOverflowError,
    TemplateError or SettingsError before anything runs.
    """
    text = "".join(m["content"] for m in messages if isinstance(m.get("content"), str))
    if min_tokens(text) >= context_limit:  # refused by size: megabytes never tokenized
        raise ContextOverflowError(min_tokens(text), context_limit, at_least=True)
    prompt = render_prompt(tokenizer, messages, thinking=thinking, tools=tools or None)
    check_context(len(prompt), context_limit, yarn_enabled=yarn_enabled)
    thinks = thinking_active(messages, thinking, tokenizer.has_thinking_switch)
    return PreparedPrompt(prompt, thinks, Sampling.for_mode(defaults, thinks, explicit))


def start_reply(
    model: CausalLM,
    tokenizer: Tokenizer,
    cache: PromptCache,
    prompt: list[int],
    sampling: Sampling,
    *,
    stop_ids: Iterable[int],
    context_limit: int,
    tools: ToolSetup | None = None,
    repetition_guard: RepetitionGuard | None = None,
    seed_index: int = 0,
    extra_processors: Sequence[Callable[[Any, Any], Any]] = (),
    generate: Callable[..., Iterator[GeneratedToken]] = generate_tokens,
    on_prefill: Callable[[int, int], None] | None = None,
    rope: RopeAuto | None = None,
    on_notice: Callable[[str], None] = lambda line: None,
    on_start: Callable[[], None] = lambda: None,
    on_end: Callable[[TurnResult, bool], None] = lambda result, started: None,
) -> Reply:
    """A Reply for `prompt`; nothing runs until it is iterated.

    on_start runs when generation begins; on_end gets the result (and whether anything ran) when
    the reply ends or is closed, after the cache has been settled to what it really holds.
    extra_processors (a front end's own: a response_format grammar, logprob recording) run after
    the sampling penalties and tool processors, with the same (previous token, logits) call.
    on_prefill(done, total) reports a long prefill chunk by chunk.
    generate: what turns the prompt into tokens, with generate_tokens' arguments (a batching
    server passes one that makes the reply a row of its batch).
    rope (`--rope-scaling auto`): the model's RoPE moves to YaRN when the reply would pass the
    window in use, the cache is prefilled again, and on_notice gets one line saying so.
    """
    tools = tools or ToolSetup()
    phase = prompt_phase(prompt)
    stream = ReplyStream(tokenizer, phase, stop_ids, repetition_guard, tools=tools.parses_calls)
    processors = (
        build_logits_processors(sampling)
        + tool_processors(
            tokenizer,
            tools.tools,
            tools.choice,
            phase,
            model.args.vocab_size,
            constrain=tools.constrain,
            grammar_cache=tools.grammars,
            parallel=tools.parallel,
        )
        + list(extra_processors)
    )
    reused = 0

    def start() -> Any:
        nonlocal reused
        on_start()
        if rope is not None:
            widen(len(prompt) + 1)
        reused = cache.reuse(prompt)
        mx.reset_peak_memory()
        budget = min(sampling.max_tokens, context_limit - len(prompt))
        options = dict(
            sampler=build_sampler(sampling),
            logits_processors=processors,
            on_prefill=on_prefill,
            seed=reply_seed(sampling.seed, seed_index),
        )
        if rope is None:
            return generate(model, prompt[reused:], cache.cache, max_tokens=budget, **options)
        return generate_widening(budget, options)

    def widen(length: int) -> bool:
        """Switch to the RoPE that holds `length` tokens; False when none is wider."""
        nonlocal reused
        factor = rope.factor_for(length)
        if factor == rope.factor:
            return False
        on_notice(rope.describe(factor))
        switch(model, rope, factor)
        rope.switches += 1
        cache.clear()  # its keys were rotated with the old frequencies
        reused = 0
        return True

    def generate_widening(budget: int, options: dict[str, Any]) -> Iterator[GeneratedToken]:
        # Generate in segments, each as long as the RoPE in use allows; between two, widen the
        # RoPE and prefill prompt + reply so far again, then go on from the last token.
        produced: list[int] = []
        pending, previous, elapsed = prompt[reused:], None, 0.0
        seed, segments = options.pop("seed"), 0
        while True:
            # Each segment has its own random stream, derived from the reply's.
            options["seed"] = seed if segments == 0 else reply_seed(seed, segments)
            segments += 1
            # Tokens this RoPE can still produce: the last one fed sits at window - 1.
            room = rope.current_window - len(prompt) - len(produced) + 1
            take = min(budget - len(produced), room)
            segment = generate(
                model, pending, cache.cache, max_tokens=take, previous_token=previous, **options
            )
            for token in segment:
                produced.append(token.token)
                yield replace(token, seconds=elapsed + token.seconds)
            if len(produced) >= budget or not widen(len(prompt) + len(produced) + 1):
                return
            elapsed += token.seconds
            pending, previous = prompt + produced, produced[-1]

    def settle(stream: ReplyStream, started: bool) -> TurnResult:
        if not started:
            result = stream.result(len(prompt), 0)
        else:
            cache.settle(prompt + stream.tokens)
            result = stream.result(len(prompt), len(prompt) - reused)
        on_end(result, started)
        return result

    return Reply(stream, start, settle)
