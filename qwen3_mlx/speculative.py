"""Speculative decoding: a drafter proposes tokens, the target checks them all in one pass.

The acceptance rule is mlx-lm's: position i of the verify pass is sampled from the target's own
distribution exactly as plain decoding would sample it (same logits processors, same sampler,
same random draws in the same order), and the draft token is kept only when that sample equals
it. The first mismatch ends the round with the target's sample in its place. Every token emitted
is therefore the target's own sample: greedy output is token for token plain decoding's, and
seeded sampled output draws the same numbers in the same order. The standard rejection rule
(Leviathan et al.) accepts more often when sampling, but it needs the draft's and the target's
full distributions after top-k/top-p/min_p and every processor, and a residual distribution to
resample from; this rule needs neither, so any sampler and processor stays exact as it is.

Processors see each verified position in order with the token before it, and never a position
past the first mismatch, so their state (penalty tallies, tool_choice and grammar guides) is
exactly what plain decoding leaves. Rejected positions are trimmed from the target's cache
before the next round; the draft's cache trims itself to the context it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx

from qwen3_mlx.batching import BatchRow
from qwen3_mlx.cache import cache_length, trim_cache
from qwen3_mlx.generate import (
    PREFILL_CHUNK,
    GeneratedToken,
    LogitsProcessor,
    Sampler,
    SamplingStep,
    greedy,
    prefill,
)
from qwen3_mlx.model import CausalLM

# The native mat-vec takes up to 8 rows: k drafted tokens + the last one verify in one weight read.
MAX_DRAFT_TOKENS = 7
# The most tokens drafted per round unless told (DraftLength adapts below it). On the 2-core
# CPU path a verify pass over 2-4 positions costs 1.0-1.12 decode steps, over 5 about 1.3 and
# over 8 about 1.85 (benchmarks/bench_speculative.py), so drafts of 2-3 pay best there; on a GPU
# the extra positions are nearly free and --draft-tokens 5-7 pays.
DEFAULT_DRAFT_TOKENS = {"model": 3, "ngram": 3}


class Drafter(Protocol):
    """Proposes the tokens that probably follow a context (the whole prompt and reply so far)."""

    def begin(self, context: Sequence[int]) -> None:
        """A reply starts after `context`."""

    def propose(self, context: Sequence[int], count: int) -> list[int]:
        """Up to `count` tokens to follow `context` (fewer, or none, when it has no guess)."""
        ...


class DraftLength:
    """How many tokens to draft next: up to `limit`, one more after a round accepted whole,
    back to one more than were accepted after a miss (a drafter that keeps guessing wrong
    drafts short, so its misses cost little; one on a run drafts long)."""

    def __init__(self, limit: int):
        self.limit = self.current = limit

    def take(self, room: int) -> int:
        """Tokens to draft when `room` more may be generated after the next one."""
        return max(0, min(self.current, room))

    def update(self, drafted: int, accepted: int) -> None:
        """Learn from one round."""
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.limit, self.current + 1)
        else:
            self.current = max(1, accepted + 1)


def verify(
    logits: mx.array, draft: Sequence[int], sample: SamplingStep
) -> tuple[list[int], mx.array]:
    """The tokens a verify pass emits: the accepted drafts, then the target's own next sample.

    logits: [len(draft) + 1, vocab]. Each position is sampled by `sample` (processors, then the
    sampler with the reply's key) exactly as plain decoding would, and none past the first
    position whose sample differs from the draft.
    """
    if sample.plain_greedy:  # no state, no randomness: every row's arg-max at once
        samples = mx.argmax(logits, axis=-1).tolist()
        emitted = []
        for index, token in enumerate(samples):
            emitted.append(int(token))
            if index == len(draft) or token != draft[index]:
                break
        sample.previous = mx.array([emitted[-1]], dtype=mx.uint32)
        return emitted, sample.previous
    emitted = []
    for index in range(len(draft) + 1):
        token = sample(logits[index : index + 1])
        emitted.append(int(token.item()))
        if index == len(draft) or emitted[-1] != draft[index]:
            break
    return emitted, token


def verify_round(
    model: CausalLM,
    cache: list[Any],
    tokens: Sequence[int],
    draft: Sequence[int],
    sample: SamplingStep,
) -> list[int]:
    """One target pass over the last token of `tokens` and the draft; the tokens it emits. The
    cache held all of `tokens` but the last, and afterwards holds them and the accepted drafts."""
    inputs = mx.array([tokens[-1], *draft], dtype=mx.uint32)
    # A group's leader (parallel/lockstep.py) hands back the last position unless asked.
    every = {"every_position": True} if getattr(model, "leads_group", False) else {}
    logits = model(inputs[None], cache=cache, **every)[0]  # [1 + len(draft), vocab]
    emitted, _ = verify(logits, draft, sample)
    trim_cache(cache, cache_length(cache) - (len(draft) - (len(emitted) - 1)))
    return emitted


def speculative_tokens(
    model: CausalLM,
    prompt: Sequence[int],
    cache: list[Any],
    *,
    drafter: Drafter,
    draft_tokens: int,
    context: Sequence[int] = (),
    sampler: Sampler = greedy,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    prefill_chunk: int = PREFILL_CHUNK,
    on_prefill: Callable[[int, int], None] | None = None,
    previous_token: int | None = None,
    seed: int | None = None,
) -> Iterator[GeneratedToken]:
    """generate_tokens with speculation: yield up to max_tokens tokens after `prompt`.

    context: the tokens already in the cache before `prompt` (the drafter sees them all). The
    first token of each target pass carries the pass's drafted and accepted counts.
    """
    if not prompt:
        raise ValueError("speculative_tokens needs at least one new prompt token")
    start = time.perf_counter()
    prefill(model, prompt, cache, prefill_chunk, on_prefill)
    tokens = [*context, *prompt]  # everything so far; the cache holds all but the last
    drafter.begin(tokens)
    previous = None if previous_token is None else mx.array([previous_token], dtype=mx.uint32)
    sample = SamplingStep(sampler, logits_processors, seed, previous)
    length = DraftLength(draft_tokens)
    produced = 0
    while produced < max_tokens:
        room = length.take(max_tokens - produced - 1)
        draft = drafter.propose(tokens, room)[:room] if room > 0 else []
        emitted = verify_round(model, cache, tokens, draft, sample)
        length.update(len(draft), len(emitted) - 1)
        seconds = time.perf_counter() - start
        for index, token in enumerate(emitted):
            tokens.append(token)
            produced += 1
            yield round_token(token, seconds, index, len(draft), len(emitted) - 1)


@dataclass
class Replayed:
    """What a drafter did on a fixed reply: drafted and accepted tokens, target passes, and
    their cost in decode steps."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    tokens: int = 0
    cost: float = 0.0


def replay(
    drafter: Drafter,
    context: Sequence[int],
    reply: Sequence[int],
    draft_tokens: int,
    pass_cost: Callable[[int], float] = lambda positions: 1.0,
) -> Replayed:
    """speculative_tokens' rounds on a reply known in advance (greedy decoding's is fixed), without
    a model: what the drafter would draft and have accepted; pass_cost(positions): one target
    pass's cost in decode steps."""
    tokens, done = list(context), 0
    length, out = DraftLength(draft_tokens), Replayed(tokens=len(reply))
    drafter.begin(tokens)
    while done < len(reply):
        room = length.take(len(reply) - done - 1)
        draft = drafter.propose(tokens, room)[:room] if room > 0 else []
        kept = 0
        while kept < len(draft) and draft[kept] == reply[done + kept]:
            kept += 1
        length.update(len(draft), kept)
        out.drafted += len(draft)
        out.accepted += kept
        out.steps += 1
        out.cost += pass_cost(len(draft) + 1)
        tokens += reply[done : done + kept + 1]
        done += kept + 1
    return out


def round_token(token: int, seconds: float, index: int, drafted: int, accepted: int) -> Any:
    """The GeneratedToken for emitted token `index` of a round: the first carries how many
    tokens the round checked, and each accepted draft counts itself (so a reply cut short by a
    stop token counts only the drafts it kept)."""
    return GeneratedToken(
        token,
        seconds,
        target_step=index == 0,
        drafted=drafted if index == 0 else 0,
        accepted=1 if index < accepted else 0,
    )


class Speculation:
    """A drafter and how many tokens it drafts per round: the token source for chat and server."""

    def __init__(self, drafter: Drafter, draft_tokens: int, name: str = ""):
        if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens must be 1 to {MAX_DRAFT_TOKENS}, not {draft_tokens}")
        self.drafter = drafter
        self.draft_tokens = draft_tokens
        self.name = name  # what drafts, for a view ("ngram", a draft model's folder)

    def source(self, held: Callable[[], Sequence[int]]) -> Callable[..., Iterator[GeneratedToken]]:
        """A `generate=` source for start_reply; held() gives the tokens the cache keeps before
        the prompt part it is handed (a PromptCache's `tokens` once it was reused)."""

        def generate(
            model: CausalLM, prompt: Sequence[int], cache: list[Any], **options: Any
        ) -> Any:
            return speculative_tokens(
                model,
                prompt,
                cache,
                drafter=self.drafter,
                draft_tokens=self.draft_tokens,
                context=list(held()),
                **options,
            )

        return generate


@dataclass(frozen=True)
class DraftSpec:
    """What drafts (a draft model's folder or repo id, or n-gram lookup) and how many tokens."""

    model: str | None = None
    ngram: bool = False
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (not self.ngram):
            raise ValueError("DraftSpec needs a draft model or ngram, not both")

    @property
    def kind(self) -> str:
        """'ngram' or 'model'."""
        return "ngram" if self.ngram else "model"

    @property
    def draft_tokens(self) -> int:
        """Tokens drafted per round."""
        return self.tokens if self.tokens is not None else DEFAULT_DRAFT_TOKENS[self.kind]

    def build(self, target: Any, tokenizer: Any, **policy: Any) -> Speculation:
        """The Speculation for a loaded target; policy: load_draft's keywords (compute dtype,
        RoPE, KV bits), so the draft model loads as the target did."""
        from qwen3_mlx.drafting import NgramLookup, load_draft
        from qwen3_mlx.tokenizer import IM_END_ID, IM_START_ID

        if self.ngram:
            eos = getattr(getattr(tokenizer, "hf", None), "eos_token_id", None)
            ends = {IM_END_ID, eos} - {None}  # a draft ends with the reply
            lookup = NgramLookup(ends=ends, boundary=IM_START_ID)
            return Speculation(lookup, self.draft_tokens, "ngram")
        assert self.model is not None
        drafter = load_draft(self.model, target, tokenizer, **policy)
        return Speculation(drafter, self.draft_tokens, self.model)


class SpeculativeRow(BatchRow):
    """A server's batch row that decodes speculatively while it is the only reply running.

    The BatchDecoder calls round_alone() instead of merging the row into the batch while no other
    row runs or fills; once company arrives, the row joins the batch as a plain row from its next
    token on (its cache holds every token but the last, as a prefilled newcomer's does, and its
    sampling step has seen every emitted token).
    """

    def __init__(
        self,
        prompt: Sequence[int],
        cache: list[Any],
        *,
        speculation: Speculation,
        context: Sequence[int] = (),
        **row: Any,
    ):
        super().__init__(prompt, cache, **row)
        self.speculation = speculation
        self.tokens = [*context, *prompt]
        self.length = DraftLength(speculation.draft_tokens)
        self.begun = False

    def round_alone(self, model: CausalLM, stop_ids: frozenset[int]) -> bool:
        """One speculative round after the prefill; True when it ended the row."""
        drafter = self.speculation.drafter
        if not self.begun:
            drafter.begin(self.tokens)
            self.begun = True
        room = self.length.take(self.max_tokens - self.produced - 1)
        draft = drafter.propose(self.tokens, room)[:room] if room > 0 else []
        emitted = verify_round(model, self.cache, self.tokens, draft, self.sample)
        self.length.update(len(draft), len(emitted) - 1)
        seconds = time.perf_counter() - self.start
        for index, token in enumerate(emitted):
            self.tokens.append(token)
            self.produced += 1
            self.items.put(round_token(token, seconds, index, len(draft), len(emitted) - 1))
            if token in stop_ids or self.produced >= self.max_tokens:
                self.end()
                return True
        self.pending = [emitted[-1]]
        return False
