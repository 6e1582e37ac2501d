"""A random-weight bf16 Qwen3 checkpoint (benchmarks/checkpoints.py) re-written as a BF16 GGUF,
for llama.cpp: the same bits in every matrix (bf16 stays bf16), norms as float32.

The tensors are streamed to the file one at a time (their infos first), so a 4B checkpoint's 8 GB
is never held in memory at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.gguf_q4 import gguf_name, model_writer


def _array(weight: mx.array) -> np.ndarray:
    """The tensor as GGUF takes it: a bf16 matrix as its raw 16-bit words, anything else float32."""
    if weight.dtype == mx.bfloat16 and weight.ndim == 2:
        return np.array(weight.view(mx.uint16))
    return np.array(weight.astype(mx.float32))


def export(folder: Path, out: Path) -> Path:
    """Write folder's bf16 checkpoint to `out` as a BF16 GGUF (once; kept for later runs)."""
    import gguf

    if out.is_file():
        return out
    config = json.loads((folder / "config.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    keys = sorted(name for name in weights if name.endswith(".weight"))
    partial = out.with_suffix(".partial")
    writer = model_writer(partial, config, gguf.LlamaFileType.MOSTLY_BF16)
    for key in keys:
        weight = weights[key]
        bf16 = weight.dtype == mx.bfloat16 and weight.ndim == 2
        raw = gguf.GGMLQuantizationType.BF16 if bf16 else None
        dtype = np.dtype(np.uint16 if bf16 else np.float32)
        writer.add_tensor_info(
            f"{gguf_name(key.removesuffix('.weight'))}.weight",
            weight.shape,
            dtype,
            weight.size * dtype.itemsize,
            raw_dtype=raw,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key in keys:
        writer.write_tensor_data(_array(weights[key]))
        del weights[key]  # frees the tensor once written
    writer.close()
    partial.rename(out)
    return out
