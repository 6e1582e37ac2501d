"""The shipped model folders under models/ are self-contained: no links, so a copy still works."""

from __future__ import annotations

import shutil
from pathlib import Path

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_no_symlinks_under_models() -> None:
    links = [str(path.relative_to(MODELS)) for path in MODELS.rglob("*") if path.is_symlink()]
    assert links == []


def test_a_copied_model_folder_keeps_every_file(tmp_path: Path) -> None:
    for folder in (path for path in MODELS.iterdir() if path.is_dir()):
        # symlinks=True copies links as links, as `cp -a` and rsync do; a relative one then dangles.
        # Each folder alone, as a user copies one model: nothing beside it to point at.
        copy = shutil.copytree(
            folder, tmp_path / f"alone-{folder.name}" / folder.name, symlinks=True
        )
        names = sorted(path.name for path in copy.iterdir())
        assert "tokenizer.json" in names and "config.json" in names, folder
        assert all((copy / name).is_file() for name in names), folder
    assert (
        tmp_path / "alone-qwen3-tiny-chat-4bit" / "qwen3-tiny-chat-4bit" / "tokenizer.json"
    ).read_bytes() == (MODELS / "qwen3-tiny-chat" / "tokenizer.json").read_bytes()
