"""qwen3-mlx: run Qwen3 chat models with MLX.

Kept import-light on purpose: `qwen3-mlx --help` must not import mlx or transformers.
"""

__version__ = "0.1.0"

from qwen3_mlx.cpu.blas import preload_openblas
from qwen3_mlx.errors import Qwen3Error

# Before any module imports mlx: on Linux, MLX's CPU GEMMs then bind to the system OpenBLAS
# (~30x faster float32 prefill) instead of the wheel's reference BLAS. QWEN3_MLX_OPENBLAS=0 opts out.
preload_openblas()

__all__ = ["Qwen3Error", "__version__"]
