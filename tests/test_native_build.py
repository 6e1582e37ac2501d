"""The native extension is required where it is built: on Linux x86-64 a failed build (setup.py
installs without it) or an op whose load-time self-test failed fails here, instead of the
native tests skipping and the suite staying green. QWEN3_MLX_NATIVE=0 says it is not wanted."""

from __future__ import annotations

import os
import platform
import sys

import pytest

import qwen3_mlx.cpu.native as native_kernel
from qwen3_mlx.cpu import dense, kv_attention, layer, ops

BUILT_HERE = sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
WANTED = BUILT_HERE and os.environ.get(native_kernel.ENV) != "0"


@pytest.mark.skipif(not WANTED, reason="built only on Linux x86-64, unless QWEN3_MLX_NATIVE=0")
def test_the_extension_is_built_and_every_op_passed_its_self_test():
    assert native_kernel.native() is not None, native_kernel.fallback_reason()
    checks = {
        "swiglu": ops.native_ops,
        "quantized_decode_attention": kv_attention.native_attention,
        "decode_attention": kv_attention.native_float_attention,
        "prefill_attention": kv_attention.native_prefill_attention,
        "dense_matmul": dense.native_dense,
        "decode_rest": layer.native_layer,
    }
    for function, check in checks.items():
        assert check() is not None, native_kernel.checked_reason(function)


@pytest.mark.skipif(not WANTED, reason="built only on Linux x86-64, unless QWEN3_MLX_NATIVE=0")
def test_the_old_qmv_settings_still_work(monkeypatch):
    """The extension was called qmv: its QWEN3_MLX_QMV_ISA and _INT8 are aliases of the new names."""
    module = native_kernel.native()
    monkeypatch.delenv("QWEN3_MLX_NATIVE_ISA", raising=False)
    monkeypatch.setenv("QWEN3_MLX_QMV_ISA", "scalar")
    assert module.isa() == "scalar"
    monkeypatch.setenv("QWEN3_MLX_NATIVE_ISA", "avx2")  # the new name wins
    assert module.isa() == ("avx2" if module.detected_isa() != "scalar" else "scalar")
    monkeypatch.delenv(native_kernel.INT8_ENV, raising=False)
    monkeypatch.setenv("QWEN3_MLX_QMV_INT8", "0")
    assert not native_kernel.int8_requested()
