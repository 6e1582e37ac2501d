"""The native CPU ops (qwen3_mlx/native: ops.h, bindings.cpp), when built for the running mlx.

`pip install` builds them on Linux x86-64 (setup.py) into `qwen3_mlx/_native_mlx_<mlx version>`.
The module is used only if it exists for exactly this mlx version (it uses MLX's C++ ABI),
imports, and passes a small self-test of its 4-bit matmul against mx.quantized_matmul (one row
and a prefill's many); each other op has its own self-test (`checked`). Otherwise
`fallback_reason()` says why and callers keep MLX's ops. QWEN3_MLX_NATIVE=0 turns it off;
QWEN3_MLX_NATIVE_ISA=avx512|avx2|scalar forces a narrower instruction set (for tests).
Where AVX-512 VNNI runs and the int8 self-test passes, the 4-bit kernels round x to int8 per
block of 32 and sum its products with the weights exactly in int32 (VNNI), as llama.cpp does:
the mat-vec (decode, a speculative verify pass: 8 rows of x or fewer) and the prefill matmul
(more rows). Logits stay within the 4-bit tolerance the tests hold bf16 compute to
(docs/benchmarks.md, "CPU 4-bit kernel", "CPU prefill, second pass" and "Fifth session").
QWEN3_MLX_NATIVE_INT8=0 keeps the mat-vec's x float32 and QWEN3_MLX_NATIVE_INT8_PREFILL=0 the
matmul's: both set, every product is within float32 rounding of MLX's kernel. The extension was
called qmv: QWEN3_MLX_QMV_ISA and QWEN3_MLX_QMV_INT8 still work.

Only float32 x takes it (the CPU default, `compute_dtype="auto"`), with scales and biases in
float32, bfloat16 or float16: half-precision x keeps MLX's kernel, so "checkpoint" compute stays
bit-identical to mlx-lm.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import mlx.core as mx

ENV = "QWEN3_MLX_NATIVE"
INT8_ENV = "QWEN3_MLX_NATIVE_INT8"
INT8_ENV_ALIAS = "QWEN3_MLX_QMV_INT8"  # its name before the extension was renamed
INT8_PREFILL_ENV = "QWEN3_MLX_NATIVE_INT8_PREFILL"
MATVEC_ROWS = 8  # quantized_matmul.cpp's: more rows of x take the prefill matmul
BITS = 4
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (mx.float32, mx.bfloat16, mx.float16)

_loaded: tuple[ModuleType | None, str | None] | None = None
# Per extension function: (the extension if that function passed its self-test, else why not).
_checked: dict[str, tuple[ModuleType | None, str | None]] = {}


def module_name() -> str:
    """The extension's module name for the running mlx: `_native_mlx_0_32_4`."""
    return "_native_mlx_" + re.sub(r"\W", "_", mx.__version__)


def load_build(path: str | Path) -> ModuleType:
    """Another build of the extension, from its .so at path, as a module of its own (benchmarks
    time builds side by side; its symbols are hidden, so each runs its own kernels)."""
    spec = importlib.util.spec_from_file_location(module_name(), path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _self_test_inputs() -> tuple[tuple[mx.array, mx.array, mx.array], list[mx.array]]:
    """The self-tests' small 4-bit layer (weights 0-6, 128 -> 40) and x of 1 row (the mat-vec)
    and 13 (the prefill matmul)."""
    layer = mx.quantize(mx.arange(128 * 40, dtype=mx.float32).reshape(40, 128) % 7)
    return layer, [mx.linspace(-1, 1, 128 * rows).reshape(rows, 128) for rows in (1, 13)]


def _self_test(module: ModuleType) -> str | None:
    """None if a small product, by one row (mat-vec) and by 13 (the prefill matmul), matches
    mx.quantized_matmul to float32 rounding, else what failed."""
    (w, scales, biases), xs = _self_test_inputs()
    for x in xs:
        rows = x.shape[0]
        expected = mx.quantized_matmul(
            x, w, scales, biases, transpose=True, group_size=64, bits=BITS
        )
        actual = module.quantized_matmul(x, w, scales, biases, 64, 1)
        if not mx.allclose(actual, expected, rtol=1e-5, atol=1e-4).item():
            return f"its self-test of {rows} row(s) gave results different from mx.quantized_matmul"
    return None


def _load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get(ENV) == "0":
        return None, f"{ENV}=0"
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, "it is built only on Linux x86-64"
    if mx.default_device() != mx.cpu:
        return None, "MLX runs on a GPU here"
    name = module_name()
    try:
        module = importlib.import_module(f"qwen3_mlx.{name}")
    except ImportError as error:
        built = sorted(
            p.name.split(".")[0] for p in Path(__file__).parent.parent.glob("_native_mlx_*")
        )
        if built and name not in built:
            return (
                None,
                f"it was built for another mlx ({', '.join(built)}), this is {mx.__version__}",
            )
        if not built:
            return None, "it was not built (see `pip install -e .` output; needs g++ and cmake)"
        return None, f"it failed to load ({error})"
    if module.MLX_VERSION != mx.__version__.split(".dev")[0]:
        return None, f"it was built for mlx {module.MLX_VERSION}, this is {mx.__version__}"
    try:
        problem = _self_test(module)
    except Exception as error:  # an ABI mismatch shows up as a TypeError or a C++ exception
        problem = f"its self-test failed ({type(error).__name__}: {error})"
    return (None, problem) if problem else (module, None)


def native() -> ModuleType | None:
    """The loaded extension, or None when it cannot be used (see fallback_reason)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded[0]


def fallback_reason() -> str | None:
    """Why the native kernel is not used, or None when it is."""
    native()
    assert _loaded is not None
    return _loaded[1]


def checked(function: str, self_test: Callable[[ModuleType], str | None]) -> ModuleType | None:
    """The extension when it has `function` and `self_test` (None, or what failed) passed once."""
    if function not in _checked:
        module = native()
        if module is None:
            _checked[function] = (None, fallback_reason())
        elif not hasattr(module, function):
            _checked[function] = (None, f"the extension was built without {function}")
        else:
            try:
                problem = self_test(module)
            except Exception as error:  # an ABI mismatch shows up as a TypeError or C++ exception
                problem = f"its {function} self-test failed ({type(error).__name__})"
            _checked[function] = (None, problem) if problem else (module, None)
    return _checked[function][0]


def checked_reason(function: str) -> str | None:
    """Why `checked(function, ...)` gave None (after it was called), or None."""
    return _checked.get(function, (None, "not checked yet"))[1]


def supports_layer(layer_bits: int, group_size: int, mode: str, scales_dtype: mx.Dtype) -> bool:
    """Whether the native kernel computes a layer so quantized for float32 x (4-bit affine, CPU)."""
    return (
        layer_bits == BITS
        and group_size in GROUP_SIZES
        and mode == "affine"
        and scales_dtype in SCALE_DTYPES
        and native() is not None
    )


def supports(x: mx.array, layer_bits: int, group_size: int, mode: str, scales: mx.array) -> bool:
    """Whether the native kernel computes this layer for x (float32 x only)."""
    return x.dtype == mx.float32 and supports_layer(layer_bits, group_size, mode, scales.dtype)


def quantized_matmul(
    x: mx.array,
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    threads: int,
) -> mx.array:
    """x @ dequantize(weight, scales, biases).T with the native kernels, float32 accumulation."""
    module = native()
    assert module is not None, "call supports() first"
    return module.quantized_matmul(x, weight, scales, biases, group_size, threads, _int8_for(x))


def quantized_matmuls(
    x: mx.array,
    layers: list[tuple[mx.array, mx.array, mx.array]],
    group_size: int,
    threads: int,
) -> list[mx.array]:
    """quantized_matmul for several (weight, scales, biases) with one x, in one native call."""
    module = native()
    assert module is not None, "call supports() first"
    ws, scales, biases = (list(part) for part in zip(*layers, strict=True))
    return module.quantized_matmuls(x, ws, scales, biases, group_size, threads, _int8_for(x))


def int8_requested() -> bool:
    """Whether the mat-vec (8 rows of x or fewer) may round x to int8: unless
    QWEN3_MLX_NATIVE_INT8=0 (or its old name; read per call, for tests)."""
    value = os.environ.get(INT8_ENV) or os.environ.get(INT8_ENV_ALIAS)
    return value != "0"


def int8_prefill_requested() -> bool:
    """Whether the prefill matmul may round x to int8: unless QWEN3_MLX_NATIVE_INT8_PREFILL=0
    (read per call, for tests)."""
    return os.environ.get(INT8_PREFILL_ENV) != "0"


def _int8_self_test(module: ModuleType) -> str | None:
    """None if the int8 kernels, the mat-vec (1 row) and the prefill matmul (13 rows), stay
    within their rounding of x (a step of max|x| / 127 per block of 32) of the float32 ones,
    else what failed."""
    (w, scales, biases), xs = _self_test_inputs()
    for x in xs:
        rows = x.shape[0]
        exact = module.quantized_matmul(x, w, scales, biases, 64, 1, False)
        rounded = module.quantized_matmul(x, w, scales, biases, 64, 1, True)
        # Each x moves by at most half a step; the weights here are at most 6 (plus rounding).
        bound = (0.5 * mx.abs(x).max() / 127 * 6.01 * 128).item()
        error = mx.abs(rounded - exact).max().item()
        if not 0 < error <= bound:
            return f"its int8 self-test of {rows} row(s) was off by {error:.3g} (bound {bound:.3g})"
    return None


def _int8_reason(requested: bool, switch: str) -> str | None:
    """Why x stays float32 where `switch` rules, or None when it is rounded to int8."""
    if not requested:
        return f"{switch}=0"
    module = native()
    if module is None:
        return fallback_reason()
    if not module.int8_supported():  # asked each time: tests force a narrower ISA
        return "the int8 kernels need AVX-512 VNNI"
    if checked("int8_supported", _int8_self_test) is None:
        return checked_reason("int8_supported")
    return None


def int8_decode_reason() -> str | None:
    """Why the mat-vec (decode, a verify pass) keeps float32 x, or None when it rounds x to int8."""
    return _int8_reason(int8_requested(), INT8_ENV)


def int8_prefill_reason() -> str | None:
    """Why the prefill matmul keeps float32 x, or None when it rounds x to int8."""
    return _int8_reason(int8_prefill_requested(), INT8_PREFILL_ENV)


def _int8_for(x: mx.array) -> bool:
    """The extension's int8 flag for x: the mat-vec's up to 8 rows, the prefill matmul's above."""
    rows = x.size // x.shape[-1] if x.ndim else 1
    reason = int8_prefill_reason() if rows > MATVEC_ROWS else int8_decode_reason()
    return reason is None


def kernels_text() -> str | None:
    """What computes float32 4-bit layers here, for `info`: the native kernels with their
    instruction set and the precision of x in prefill and decode, MLX's where the extension is
    not in use on Linux x86-64, None elsewhere (the GPU, or a platform it is not built for)."""
    if mx.default_device() != mx.cpu:
        return None
    module = native()
    if module is None:
        built_here = sys.platform == "linux" and platform.machine().lower() in ("x86_64", "amd64")
        return f"MLX's ({fallback_reason()})" if built_here else None
    texts = []
    for name, reason in (("prefill", int8_prefill_reason()), ("decode", int8_decode_reason())):
        texts.append(
            f"{name} x {'rounded to int8 (VNNI)' if reason is None else f'in float32 ({reason})'}"
        )
    return f"native, {module.isa()}: {', '.join(texts)}"


def isa() -> str | None:
    """The instruction set the kernel runs with ('avx512', 'avx2', 'scalar'), or None."""
    module = native()
    return None if module is None else module.isa()
