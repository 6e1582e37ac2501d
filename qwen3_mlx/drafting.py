"""The two drafters speculative decoding uses: a small draft model, and n-gram prompt lookup.

A draft model shares the target's tokenizer (checked: one clear line when it does not) and keeps
its own KV cache, which it trims to the longest prefix it shares with each context it is given,
so rejected drafts and a changed conversation cost only what differs. Prompt lookup needs no
model: it counts what followed each short n-gram of the prompt and reply so far, and proposes
what followed the longest one ending the context when the counts agree (tool arguments, quoted
results and edited text repeat the context, and cost nothing to draft).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from qwen3_mlx.cache import PromptCache
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.generate import prefill
from qwen3_mlx.model import CausalLM


class DraftError(Qwen3Error):
    """A draft model that cannot draft for this target (another tokenizer or vocabulary)."""


class NgramLookup:
    """Prompt-lookup drafting that drafts only on evidence (after llama.cpp's n-gram cache).

    The earlier occurrences of the context's last two tokens (the latest `window` of them) are
    matched back as far as they agree with the context, up to `min_match` tokens, and those that
    match longest vote with the token that followed them. The draft is built token by token:
    - several longest matches: their most frequent follower, if it has a majority of at least
      `share` (0.6: two matches must agree);
    - one longest match: its follower, only if the match is `min_match` tokens long (6: a short
      phrase that merely recurs, like "the 4 words" or a JSON key, guesses wrong about as often
      as right);
    and the draft stops at the first token without such support, or after a stop id (`ends`).
    No match reaches back across a message's first token (`boundary`, <|im_start|>), and no
    draft starts in a message's header ("<|im_start|>assistant\\n"): the template rewrites past
    replies (Qwen3's drops their thinking), so how they began says little about this one. A
    draft that failed teaches the votes: the token the model emitted instead follows the same
    match, so the same guess is not drafted again without a majority.
    """

    def __init__(
        self,
        min_match: int = 6,
        share: float = 0.6,
        window: int = 64,
        ends: Iterable[int] = (),
        boundary: int | None = None,
    ):
        if min_match < 2 or not 0.5 < share <= 1 or window < 1:
            raise ValueError("NgramLookup needs min_match >= 2, 0.5 < share <= 1, window >= 1")
        self.min_match, self.share, self.window = min_match, share, window
        self.ends = frozenset(ends)  # stop ids: nothing after one is worth drafting
        self.boundary = boundary  # a message's first token
        self.pairs: dict[tuple[int, int], list[int]] = {}  # a pair -> where its followers stand
        self.tokens: list[int] = []  # the context indexed so far

    def begin(self, context: Sequence[int]) -> None:
        """Index the context of a new reply."""
        self.pairs, self.tokens = {}, []
        self._extend(context)

    def _extend(self, context: Sequence[int]) -> None:
        tokens, pairs = self.tokens, self.pairs
        start = len(tokens)
        tokens.extend(context[start:])
        for position in range(max(start, 2), len(tokens)):
            pairs.setdefault((tokens[position - 2], tokens[position - 1]), []).append(position)

    def _matched(self, text: Sequence[int], position: int) -> int:
        """How many tokens before `position` in the context equal the end of `text`."""
        length = 0
        while (
            length < self.min_match
            and length < position
            and length < len(text)
            and self.tokens[position - 1 - length] == text[-1 - length]
            and text[-1 - length] != self.boundary
        ):
            length += 1
        return length

    def next_token(self, text: Sequence[int]) -> int | None:
        """The token the context supports after `text` (None: no guess worth drafting)."""
        positions = self.pairs.get((text[-2], text[-1])) if len(text) >= 2 else None
        longest, votes = 2, {}
        for position in positions[-self.window :] if positions else ():
            length = self._matched(text, position)
            if length > longest:
                longest, votes = length, {}
            if length == longest:
                follower = self.tokens[position]
                votes[follower] = votes.get(follower, 0) + 1
        if not votes:
            return None
        token, count = max(votes.items(), key=lambda item: item[1])
        total = sum(votes.values())
        if total == 1:
            return token if longest >= self.min_match else None
        return token if count >= self.share * total else None

    def propose(self, context: Sequence[int], count: int) -> list[int]:
        """Up to `count` tokens, each supported by the context; none when the evidence is weak."""
        seen = max(0, len(self.tokens) - 16)
        if (
            len(context) < len(self.tokens)
            or context[seen : len(self.tokens)] != self.tokens[seen:]
        ):
            self.begin(context)  # not the context it indexed, grown: a reply it did not begin
        else:
            self._extend(context)
        text = list(context[-self.min_match :])
        if self.boundary in text[-3:]:
            return []  # a message's header: see the class docstring
        draft: list[int] = []
        while len(draft) < count:
            token = self.next_token(text)
            if token is None:
                break
            draft.append(token)
            if token in self.ends:
                break
            text.append(token)
        return draft


# The most tokens the first draft step takes with it (a pass over 4 positions costs about 1.1
# decode steps on the CPU path; benchmarks/bench_speculative.py).
FIRST_PASS = 4


class DraftModel:
    """A small model of the same family drafting greedily from its own KV cache."""

    def __init__(self, model: CausalLM, kv_bits: int | None = None):
        self.model = model
        self.cache = PromptCache(model, kv_bits)

    def begin(self, context: Sequence[int]) -> None:
        """Nothing to do: propose() brings the cache to each context it gets."""

    def propose(self, context: Sequence[int], count: int) -> list[int]:
        """`count` greedy tokens after context (the cache keeps context and all but the last)."""
        if count <= 0:
            return []
        kept = self.cache.reuse(context)  # trims rejected drafts and anything that changed
        new = context[kept:]
        # The last few tokens the cache lacks go with the first draft step, in one pass: after a
        # round that kept every draft, the last draft and the model's next token, which cost two
        # steps fed apart (the native mat-vec reads the weights once for up to 8 positions).
        head, tail = new[:-FIRST_PASS], new[-FIRST_PASS:]
        if head:
            prefill(self.model, [*head, tail[0]], self.cache.cache)  # runs all of head
        inputs = mx.array(tail, dtype=mx.uint32)
        drafted = []
        for _ in range(count):  # no sync per token: each step computes while the next is built
            logits = self.model(inputs[None], cache=self.cache.cache)[:, -1, :]
            inputs = mx.argmax(logits, axis=-1).astype(mx.uint32)
            mx.async_eval(inputs)
            drafted.append(inputs)
        tokens = mx.concatenate(drafted).tolist()
        self.cache.tokens = [*context, *tokens[:-1]]
        return tokens


def vocabulary_problem(target: Any, target_vocab: int, draft: Any, draft_vocab: int) -> str | None:
    """Why a draft's tokenizer cannot draft for the target's (None: it can); the vocab sizes are
    the models' embedding rows."""
    if draft_vocab != target_vocab:
        return f"its vocabulary has {draft_vocab:,} ids, the target's {target_vocab:,}"
    theirs, ours = draft.hf.get_vocab(), target.hf.get_vocab()
    if theirs != ours:
        differing = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])
        token, _ = differing[0] if differing else ("?", 0)
        return (
            f"its tokenizer differs ({len(theirs):,} tokens against {len(ours):,}; first "
            f"difference at {token!r})"
        )
    return None


def draft_compatibility(target_dir: Path, draft: str | Path) -> str | None:
    """Why the model `draft` cannot draft for the folder target_dir (None: it can), from the two
    folders' configs and tokenizers alone (no weights are read)."""
    from qwen3_mlx.config import ModelArgs, read_config
    from qwen3_mlx.loading import resolve_model_path
    from qwen3_mlx.tokenizer import load_tokenizer

    draft_dir = resolve_model_path(draft)
    target_args = ModelArgs.from_dict(read_config(target_dir))
    draft_args = ModelArgs.from_dict(read_config(draft_dir))
    return vocabulary_problem(
        load_tokenizer(target_dir),
        target_args.vocab_size,
        load_tokenizer(draft_dir),
        draft_args.vocab_size,
    )


def load_draft(
    draft: str | Path,
    target: Any,
    target_tokenizer: Any,
    *,
    compute_dtype: str = "auto",
    rope_scaling: dict[str, Any] | None = None,
    kv_bits: int | None = None,
) -> DraftModel:
    """Load a draft model with the target's policy (compute dtype, RoPE, KV bits, the CPU
    kernels); DraftError, before any weight is read, when its tokenizer differs."""
    from qwen3_mlx.config import ModelArgs, read_config
    from qwen3_mlx.loading import load_model, resolve_model_path
    from qwen3_mlx.tokenizer import load_tokenizer

    draft_dir = resolve_model_path(draft)
    args = ModelArgs.from_dict(read_config(draft_dir), str(draft_dir / "config.json"))
    problem = vocabulary_problem(
        target_tokenizer, target.args.vocab_size, load_tokenizer(draft_dir), args.vocab_size
    )
    if problem is not None:
        raise DraftError(f"{draft} cannot draft for this model: {problem}")
    model, _ = load_model(draft_dir, rope_scaling=rope_scaling, compute_dtype=compute_dtype)
    return DraftModel(model, kv_bits)
