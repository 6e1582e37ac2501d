"""Shared fixtures: tiny random-weight Qwen3 checkpoint folders (builder logic in checkpoints.py)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from checkpoints import FIXTURES
from checkpoints import make_checkpoint as build_checkpoint


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """A factory: make_checkpoint(name="model", seed=0, dtype="bfloat16", shards=1, tokenizer=None,
    **config_overrides) -> a fresh checkpoint folder under tmp_path."""

    def factory(name: str = "model", **kwargs: Any) -> Path:
        return build_checkpoint(tmp_path / name, **kwargs)

    return factory


@pytest.fixture
def tiny_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny checkpoint: bf16, tied, GQA 4/2, 2 layers, vocab 512, single file."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures (real Qwen3 tokenizer, templates, configs; see SOURCES.md)."""
    return FIXTURES


_SPAWNS = re.compile(r"\b(subprocess|pexpect|Popen)\b")


@functools.cache
def _starts_processes(path: Path) -> bool:
    """Whether a test module starts processes (a CLI, a pty, a server, mlx.launch, a build)."""
    return bool(_SPAWNS.search(path.read_text()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of modules that start processes `slow`: `pytest -m "not slow"` skips them."""
    for item in items:
        if _starts_processes(Path(item.path)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def float32_x(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native kernels with float32 x (QWEN3_MLX_NATIVE_INT8=0, QWEN3_MLX_NATIVE_INT8_PREFILL=0):
    for tests that hold them to float32 rounding of MLX's. The int8 default has its own tests
    (test_gemm_int8.py, and the int8 ones in test_native_kernel.py)."""
    monkeypatch.setenv("QWEN3_MLX_NATIVE_INT8", "0")
    monkeypatch.setenv("QWEN3_MLX_NATIVE_INT8_PREFILL", "0")
