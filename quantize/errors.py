"""The converter's own error (the rest come from qwen3_mlx.errors)."""

from qwen3_mlx.errors import Qwen3Error


class ConversionError(Qwen3Error):
    """The output cannot be written (exists, no space, permissions) or failed its final check."""
