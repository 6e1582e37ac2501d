"""qwen3-mlx: run Qwen3 chat models with MLX.

Kept import-light on purpose: `qwen3-mlx --help` must not import mlx or transformers.
"""

__version__ = "0.1.0"

from qwen3_mlx.errors import Qwen3Error

__all__ = ["Qwen3Error", "__version__"]
