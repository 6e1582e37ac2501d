"""The sdist carries what setup.py needs to build the native kernel from it (MANIFEST.in): its C++
sources, headers and CMakeLists.txt, and no module built in place. Building a wheel from that
sdist compiles the kernel (about a minute on 2 cores; a manual check, docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_carries_the_native_sources(tmp_path):
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (archive,) = tmp_path.glob("qwen3_mlx-*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    sources = {
        str(path.relative_to(ROOT))
        for pattern in ("*.cpp", "*.h", "CMakeLists.txt")
        for path in (ROOT / "qwen3_mlx" / "native").glob(pattern)
    }
    assert "qwen3_mlx/native/qmv.cpp" in sources
    assert sources <= names, sources - names
    assert {"setup.py", "pyproject.toml", "qwen3_mlx/cpu/native.py"} <= names
    assert not [name for name in names if name.endswith(".so")]
