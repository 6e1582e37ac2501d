"""OpenBLAS preloading (qwen3_mlx.cpu.blas): `import qwen3_mlx` before mlx binds MLX's GEMMs to the system
OpenBLAS on Linux; QWEN3_MLX_OPENBLAS=0 opts out; importing mlx first makes it a no-op; and the
results stay those of the reference BLAS to float32 rounding (dense GEMMs and the 4-bit prefill
path), so the parity tests' guarantees carry over. Each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen3_mlx.cpu.blas import find_openblas

SHAPES = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}

SCRIPT = """
import json, os, sys
{first}
import mlx.core as mx
import numpy as np
from qwen3_mlx.cpu.blas import find_openblas, openblas_active
from qwen3_mlx.cpu.quantized import prefill_gemm_helps
from qwen3_mlx.loading import load_model

model_dir, out = sys.argv[1], sys.argv[2]
ids = mx.array(np.random.default_rng(9).integers(0, 512, (1, 40)))
dense, _ = load_model(model_dir, compute_dtype="float32")
quantized, _ = load_model(model_dir, quantize_on_load=4, compute_dtype="float32")
np.savez(out, dense=np.array(dense(ids)), quantized=np.array(quantized(ids)))
maps = open("/proc/self/maps").read() if sys.platform == "linux" else ""
library = find_openblas()
print(json.dumps({{
    "active": openblas_active(),
    "mapped": library is not None and os.path.realpath(library) in maps,
    "prefill_gemm": prefill_gemm_helps(mx.float32),
}}))
"""


def run_forward(
    model_dir: Path, out: Path, *, opt_out: bool = False, mlx_first: bool = False
) -> dict:
    """Load and run the model in a fresh interpreter; return what it reports."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("LD_PRELOAD", "QWEN3_MLX_OPENBLAS")
    }
    if opt_out:
        env["QWEN3_MLX_OPENBLAS"] = "0"
    first = "import mlx.core\nimport qwen3_mlx" if mlx_first else "import qwen3_mlx"
    code = SCRIPT.format(first=first)
    done = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_opt_out_and_late_import_leave_the_reference_blas(make_checkpoint, tmp_path):
    model_dir = make_checkpoint(dtype="float32", **SHAPES)
    opted_out = run_forward(model_dir, tmp_path / "a.npz", opt_out=True)
    late = run_forward(model_dir, tmp_path / "b.npz", mlx_first=True)
    for report in (opted_out, late):
        assert report["active"] is None and not report["mapped"]
        assert report["prefill_gemm"] is False
    first, second = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(first["dense"], second["dense"])


@pytest.mark.skipif(sys.platform != "linux", reason="OpenBLAS preloading is for Linux")
def test_openblas_gives_the_reference_results(make_checkpoint, tmp_path):
    if find_openblas() is None:
        pytest.skip("no system OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    model_dir = make_checkpoint(dtype="float32", **SHAPES)
    reference = run_forward(model_dir, tmp_path / "reference.npz", opt_out=True)
    fast = run_forward(model_dir, tmp_path / "fast.npz")
    assert reference["active"] is None
    assert fast["active"] == find_openblas() and fast["mapped"]
    assert fast["prefill_gemm"] is True
    expected, actual = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "fast.npz")
    for name in ("dense", "quantized"):
        scale = np.abs(expected[name]).max()
        diff = np.abs(actual[name] - expected[name]).max()
        print(f"\n[openblas] {name}: max abs diff {diff:.3g} (scale {scale:.3g})")
        assert diff <= 1e-5 * scale  # float32 rounding: another summation order, nothing more
        assert (actual[name].argmax(-1) == expected[name].argmax(-1)).all()


def test_explicit_library_path_and_missing_library(monkeypatch, tmp_path):
    fake = tmp_path / "libopenblas.so.0"
    fake.write_bytes(b"")
    monkeypatch.setenv("QWEN3_MLX_OPENBLAS", str(fake))
    assert find_openblas() == str(fake)
    monkeypatch.setenv("QWEN3_MLX_OPENBLAS", str(tmp_path / "missing.so"))
    assert find_openblas() is None
