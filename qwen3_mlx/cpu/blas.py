"""OpenBLAS for MLX's CPU backend on Linux.

The Linux `mlx[cpu]` wheel links the reference BLAS (plain loops): a float32 GEMM of a 512-token
prefill runs ~30-50x slower there than with OpenBLAS. Loading the system OpenBLAS into the global
symbol scope *before* mlx is imported makes the dynamic linker bind MLX's `cblas_*` calls to it,
the same effect as LD_PRELOAD without re-executing the process. Nothing else changes: MLX's own
kernels (quantized matmul, attention, norms) do not use BLAS. GEMM results can differ from the
reference BLAS in the last bits (another summation order), within the parity tests' tolerances.

Imported by `qwen3_mlx/__init__.py`, so it must stay free of mlx and other heavy imports.
Opt out with QWEN3_MLX_OPENBLAS=0; point QWEN3_MLX_OPENBLAS at a library file to choose one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path

ENV = "QWEN3_MLX_OPENBLAS"

# Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial), then Fedora/RHEL, then Arch-style paths.
_CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-serial/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblaso.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

_loaded: str | None = None


def find_openblas() -> str | None:
    """Path of the system OpenBLAS library, or None (the env var may name one explicitly)."""
    chosen = os.environ.get(ENV, "")
    if chosen and chosen not in ("0", "1"):
        return chosen if Path(chosen).is_file() else None
    arch = platform.machine()
    for pattern in _CANDIDATES:
        path = pattern.format(arch=arch)
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("openblas")


def _preloaded_by_environment() -> str | None:
    for entry in os.environ.get("LD_PRELOAD", "").replace(":", " ").split():
        if "openblas" in Path(entry).name and Path(entry).is_file():
            return entry
    return None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if that is safe and still useful; return the library used, or None.

    Does nothing off Linux, after mlx has been imported (too late to bind), when LD_PRELOAD already
    names OpenBLAS, or when QWEN3_MLX_OPENBLAS=0.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    if sys.platform != "linux" or os.environ.get(ENV) == "0" or "mlx.core" in sys.modules:
        return None
    if _preloaded_by_environment():
        return None
    path = find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    _loaded = path
    return path


def openblas_active() -> str | None:
    """The OpenBLAS library MLX's GEMMs bind to in this process (preloaded here or by LD_PRELOAD)."""
    return _loaded or _preloaded_by_environment()
