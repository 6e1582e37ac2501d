"""The Qwen3 -> MLX quantized converter behind `qwen3-mlx quantize` (see quantize/README.md).

Imports qwen3_mlx; qwen3_mlx never imports this package at module level.
"""

from qwen3_mlx.quantize.convert import ConversionProgress, ConversionResult, quantize_checkpoint
from qwen3_mlx.quantize.errors import ConversionError
from qwen3_mlx.quantize.plan import parse_size
from qwen3_mlx.quantize.side_files import SkippedSideFileWarning
from qwen3_mlx.quantize.verify import VerifyReport, verify_quantized

__all__ = [
    "ConversionError",
    "ConversionProgress",
    "ConversionResult",
    "SkippedSideFileWarning",
    "VerifyReport",
    "parse_size",
    "quantize_checkpoint",
    "verify_quantized",
]
