"""The two drafters speculative decoding uses: a small draft model, and n-gram prompt lookup.

A draft model shares the target's tokenizer (checked: one clear line when it does not) and keeps
its own KV cache, which it trims to the longest prefix it shares with each context it is given,
so rejected drafts and a changed conversation cost only what differs. Prompt lookup needs no
model: it finds the latest earlier occurrence of the last few tokens in the prompt and reply so
far and proposes what followed it (tool arguments, quoted results and edited text repeat the
context, and cost nothing to draft).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Prompt-lookup drafting: continue the latest earlier match of the context's last n tokens
    (n from max_n down to min_n), copying what followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ValueError("NgramLookup needs 1 <= min_n <= max_n")
        self.sizes = range(max_n, min_n - 1, -1)
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0

    def begin(self, context: Sequence[int]) -> None:
        """Index the context of a new reply."""
        self.index, self.indexed = {}, 0
        self._extend(context)

    def _extend(self, context: Sequence[int]) -> None:
        # Each n-gram maps to where its latest continuation starts (a position < len(context)),
        # so the context's own last n tokens never match themselves.
        for position in range(max(self.indexed, 1), len(context)):
            for n in self.sizes:
                if position >= n:
                    self.index[tuple(context[position - n : position])] = position
        self.indexed = len(context)

    def propose(self, context: Sequence[int], count: int) -> list[int]:
        """What followed the latest earlier occurrence of the longest matching suffix."""
        self._extend(context)
        for n in self.sizes:
            start = self.index.get(tuple(context[-n:])) if len(context) > n else None
            if start is None:
                continue
            draft: list[int] = []
            for offset in range(count):  # a match near the end repeats itself (short cycles)
                at = start + offset
                draft.append(context[at] if at < len(context) else draft[at - len(context)])
            return draft
        return []


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
        last = prefill(self.model, context[kept:], self.cache.cache)
        drafted = []
        for _ in range(count):  # one lazy graph: evaluated once, no sync per token
            logits = self.model(last[None], cache=self.cache.cache)[:, -1, :]
            last = mx.argmax(logits, axis=-1).astype(mx.uint32)
            drafted.append(last)
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
