"""A scripted fake model for chat-engine tests: its logits force a given reply, token by token.

The fake stores the token ids themselves in the KV cache (as keys) and decides each next token
from the context it reads back from that cache. So a cache that holds the wrong tokens after a
trim, an interrupt or a retry shows up as a wrong context, and the test fails.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np
from checkpoints import write_tokenizer_files

from qwen3_mlx.tokenizer import IM_END_ID, IM_START_ID, Tokenizer, load_tokenizer

VOCAB = 151936
ASSISTANT_ID = 77091  # "assistant"
USER_ID = 872  # "user"
NEWLINE_ID = 198


class ScriptMismatch(AssertionError):
    """The context read back from the cache is not a prefix of the scripted reply."""


class ScriptedModel:
    """A stand-in for Model: `script(user_text)` gives the whole assistant reply (str or ids).

    The reply is written as the template would show it after `<|im_start|>assistant\\n`, so the
    parts a generation prompt already holds (`<think>\\n` for Thinking-2507, the empty block for
    enable_thinking=False) are found in the context and the model continues after them.
    """

    def __init__(
        self,
        tokenizer: Any,
        script: Callable[[str], str | list[int]] | str | list[int],
        *,
        context_length: int = 4096,
        layers: int = 2,
        rope_scaling: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.script = script if callable(script) else (lambda _user: script)
        self.layers = [None] * layers
        self.args = SimpleNamespace(
            context_length=context_length, rope_scaling=rope_scaling, vocab_size=VOCAB
        )
        self.contexts: list[list[int]] = []  # the context after every call
        self.fed: list[int] = []  # how many tokens each call ran (prefill, then one per step)
        self.interrupt_after: int | None = None  # raise KeyboardInterrupt on the next call after

    def __call__(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        if self.interrupt_after is not None and len(self.fed) >= self.interrupt_after:
            raise KeyboardInterrupt
        tokens = inputs.reshape(1, 1, -1, 1).astype(mx.float32)
        for layer_cache in cache:
            layer_cache.update_and_fetch(tokens, tokens)
        self.fed.append(int(inputs.shape[-1]))
        keys, _ = cache[0].keys_and_values()
        context = [int(t) for t in keys.reshape(-1).tolist()]
        for layer_cache in cache[1:]:
            assert layer_cache.offset == cache[0].offset, "layers hold different lengths"
        self.contexts.append(context)
        logits = np.full((1, 1, VOCAB), -1e4, dtype=np.float32)
        # Only a one-token call (a decode step, or the last prompt token) is sampled from.
        if inputs.shape[-1] == 1:
            logits[0, 0, self.next_token(context)] = 0.0
        return mx.array(logits)

    def next_token(self, context: list[int]) -> int:
        """The scripted token that follows this context."""
        start = _reply_start(context)
        if start is None:
            return IM_END_ID  # a prefill call: its logits are never used
        reply = self.script(self.tokenizer.decode(_last_user_ids(context)))
        ids = self.tokenizer.encode(reply) if isinstance(reply, str) else list(reply)
        so_far = context[start:]
        shared = min(len(so_far), len(ids))
        if so_far[:shared] != ids[:shared]:
            raise ScriptMismatch(
                f"context {so_far[:12]}... is not a prefix of the script {ids[:12]}..."
            )
        return ids[len(so_far)] if len(so_far) < len(ids) else IM_END_ID


def _reply_start(context: list[int]) -> int | None:
    for index in range(len(context) - 1, -1, -1):
        if context[index] == IM_START_ID:
            if context[index + 1 : index + 3] == [ASSISTANT_ID, NEWLINE_ID]:
                return index + 3
            return None
    return None


def _last_user_ids(context: list[int]) -> list[int]:
    for index in range(len(context) - 3, -1, -1):
        if context[index] == IM_START_ID and context[index + 1 : index + 3] == [
            USER_ID,
            NEWLINE_ID,
        ]:
            end = context.index(IM_END_ID, index)
            return context[index + 3 : end]
    return []


_FOLDERS = Path(tempfile.mkdtemp(prefix="qwen3-chat-tests-"))
atexit.register(shutil.rmtree, _FOLDERS, ignore_errors=True)


@functools.cache
def fixture_tokenizer_folder(variant: str = "qwen3-4b") -> Path:
    """A folder with the real Qwen3 tokenizer files and one of the three chat templates.

    variant: "qwen3-4b" (current hybrid template), "qwen3-4b-original" (April 2025 template) or
    "qwen3-4b-thinking-2507".
    """
    folder = _FOLDERS / variant
    folder.mkdir()
    write_tokenizer_files(folder, variant)
    return folder


@functools.cache
def load_fixture_tokenizer(variant: str = "qwen3-4b") -> Tokenizer:
    """Our Tokenizer for fixture_tokenizer_folder(variant), loaded once per test session."""
    return load_tokenizer(fixture_tokenizer_folder(variant))
