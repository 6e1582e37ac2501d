"""The dtype tables, written once: compute dtypes by name, and safetensors' dtype codes."""

from __future__ import annotations

import mlx.core as mx

# What a model may compute in (`--compute-dtype`, `quantize --dtype`).
COMPUTE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Bytes per element of each safetensors dtype code.
SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
SAFETENSORS_FLOATING = {"F64", "F32", "BF16", "F16"}
SAFETENSORS_FP8 = {"F8_E4M3", "F8_E5M2"}


def dtype_name(dtype: mx.Dtype) -> str:
    """'float32' for mx.float32: the name COMPUTE_DTYPES and the CLI use."""
    return str(dtype).rsplit(".", 1)[-1]
