"""Size facts of the Qwen3 vocabulary that bound work before any tokenizing is done."""

from __future__ import annotations

# The longest token of the Qwen3 tokenizer decodes to 128 bytes (a run of spaces); tests check it
# against the real tokenizer.json. So a text of N bytes is at least N / 128 tokens: a message that
# cannot fit the context is refused by its size alone, without tokenizing megabytes.
MAX_TOKEN_BYTES = 128


def min_tokens(text: str) -> int:
    """A lower bound on the tokens a text becomes, from its UTF-8 size alone."""
    return len(text.encode("utf-8", "surrogatepass")) // MAX_TOKEN_BYTES


def available_memory() -> int | None:
    """Bytes of memory free for more KV cache now, or None where it cannot be told.

    Metal: the recommended working set less what MLX holds; elsewhere the kernel's MemAvailable.
    """
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    working_set = info.get("max_recommended_working_set_size")
    if working_set:
        return max(int(working_set) - mx.get_active_memory(), 0)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
