"""The Qwen3 -> MLX quantized converter behind `qwen3-mlx quantize` (see quantize/README.md).

Imports qwen3_mlx; qwen3_mlx never imports this package at module level.
"""

from quantize.convert import ConversionProgress, ConversionResult, quantize_checkpoint
from quantize.errors import ConversionError
from quantize.plan import parse_size
from quantize.side_files import SkippedSideFileWarning
from quantize.verify import VerifyReport, verify_quantized

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
