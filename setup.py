"""Build step for the optional native 4-bit mat-vec (qwen3_mlx/native); the metadata is pyproject.toml.

On Linux x86-64 it compiles qwen3_mlx/native/qmv.cpp with CMake against the mlx wheel of the build
environment (its CMake config, headers and libmlx) and nanobind. The module's name carries that
mlx version (`_qmv_mlx_0_32_4`), so qwen3_mlx only imports a module built for the mlx it runs
with. Elsewhere, with QWEN3_MLX_NATIVE=0, or when the build fails (no compiler, no cmake), the
package installs without it and uses mx.quantized_matmul.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

SOURCE = Path(__file__).resolve().parent / "qwen3_mlx" / "native"


def module_name() -> str | None:
    """`_qmv_mlx_<version>` for the mlx in this (build) environment, or None: skip the build."""
    if os.environ.get("QWEN3_MLX_NATIVE") == "0":
        return None
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # Apple silicon has Metal; other CPUs keep MLX's kernel
    try:
        import mlx.core as mx
    except Exception:
        return None
    return "_qmv_mlx_" + re.sub(r"\W", "_", mx.__version__)


class CMakeBuild(build_ext):
    """Configure and build with CMake; a failure is reported and skipped, never fatal."""

    def build_extension(self, ext: Extension) -> None:
        try:
            self._cmake(ext)
        except (OSError, subprocess.CalledProcessError) as error:
            print(
                f"qwen3-mlx: the native 4-bit kernel was not built ({error}); "
                "mx.quantized_matmul will be used instead",
                file=sys.stderr,
            )
            # A new list (the caller iterates the old one): nothing is then copied or installed.
            self.extensions = [other for other in self.extensions if other is not ext]

    def _cmake(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build = Path(self.build_temp).resolve() / "qmv"
        build.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            str(SOURCE),
            f"-DQMV_MODULE_NAME={ext.name.rsplit('.', 1)[-1]}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={target.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, cwd=build, check=True)
        subprocess.run(
            ["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 1)], cwd=build, check=True
        )


# The converter lives at the repository's top level (quantize/) and installs as qwen3_mlx.quantize.
PACKAGE_DIR = {"qwen3_mlx.quantize": "quantize"}
PACKAGES = find_packages(include=["qwen3_mlx", "qwen3_mlx.*"]) + [
    "qwen3_mlx.quantize" + name.removeprefix("quantize")
    for name in find_packages(include=["quantize", "quantize.*"])
]

name = module_name()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=[Extension(f"qwen3_mlx.{name}", sources=[])] if name else [],
    cmdclass={"build_ext": CMakeBuild},
)
