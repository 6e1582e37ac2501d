"""Folder names that are not valid UTF-8 (Linux names are bytes): a source converts, an output MLX
could not open is refused before any work, never reported as a crash or a corrupt file (issue 12)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_quantize import cli_app
from typer.testing import CliRunner

import qwen3_mlx.quantize.convert as convert_module
from qwen3_mlx.quantize import quantize_checkpoint

MakeCheckpoint = Callable[..., Path]
runner = CliRunner()


def latin1_path(parent: Path, name: bytes) -> Path:
    """parent/name for a name in Latin-1 bytes (Python holds the bad byte as a lone surrogate)."""
    return Path(os.fsdecode(os.fsencode(parent) + b"/" + name))


def test_a_source_folder_with_a_latin1_name_converts(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = latin1_path(tmp_path, b"caf\xe9")
    os.rename(make_checkpoint("src"), source)  # MLX itself cannot write there
    result = quantize_checkpoint(source, tmp_path / "out")
    card = (result.output / "README.md").read_text(encoding="utf-8")
    assert "caf\ufffd" in card and (result.output / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["name", "parent"])
def test_an_output_path_mlx_cannot_open_is_refused_up_front(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    source = make_checkpoint("src")
    if where == "name":
        output = latin1_path(tmp_path, b"out\xe9")
    else:
        output = latin1_path(tmp_path, b"dir\xe9") / "out"

    def no_work(*args: object) -> None:
        raise AssertionError("conversion started")

    monkeypatch.setattr(convert_module, "write_weights", no_work)
    before = sorted(os.listdir(tmp_path))
    result = runner.invoke(cli_app(), ["quantize", str(source), str(output)])
    assert result.exit_code == 1, result.stderr
    shown = os.fsencode(output).decode("utf-8", errors="replace")
    assert result.stderr.splitlines() == [
        f"Error: {shown}: the path is not valid UTF-8 and MLX cannot open files under it; "
        "choose another OUTPUT"
    ]
    assert sorted(os.listdir(tmp_path)) == before
