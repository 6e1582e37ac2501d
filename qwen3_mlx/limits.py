"""Size facts of the Qwen3 vocabulary that bound work before any tokenizing is done."""

from __future__ import annotations

# The longest token of the Qwen3 tokenizer decodes to 128 bytes (a run of spaces); tests check it
# against the real tokenizer.json. So a text of N bytes is at least N / 128 tokens: a message that
# cannot fit the context is refused by its size alone, without tokenizing megabytes.
MAX_TOKEN_BYTES = 128


def min_tokens(text: str) -> int:
    """A lower bound on the tokens a text becomes, from its UTF-8 size alone."""
    return len(text.encode("utf-8", "surrogatepass")) // MAX_TOKEN_BYTES
