"""`quantize --force` replaces only a model folder or an empty folder; anything else is refused by
name, with exit 1 and nothing deleted (issue 12)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_quantize import cli_app, leftovers
from typer.testing import CliRunner

from qwen3_mlx.quantize import ConversionError, quantize_checkpoint

MakeCheckpoint = Callable[..., Path]
runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder (relative) -> its bytes (None for a folder), to prove nothing changed."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def fake_model_folder(folder: Path) -> Path:
    """A folder that passes the model-folder test on its own (config.json and a .safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"not really")
    return folder


def refused(source: Path, output: str | Path, cwd_note: str = "") -> str:
    """Run `quantize SOURCE OUTPUT --force`, expect exit 1 and one Error line; return that line."""
    result = runner.invoke(cli_app(), ["quantize", str(source), str(output), "--force"])
    assert result.exit_code == 1, (cwd_note, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert "--force replaces only a model folder" in lines[0] and "nothing was deleted" in lines[0]
    return lines[0]


def test_force_refuses_a_folder_of_documents_and_keeps_it_intact(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    documents = tmp_path / "documents"
    (documents / "taxes").mkdir(parents=True)
    (documents / "letter.txt").write_text("dear")
    (documents / "taxes" / "2024.pdf").write_bytes(b"%PDF")
    before = snapshot(documents)
    line = refused(source, documents)
    assert f"{documents}: holds the folder 'taxes'" in line
    (documents / "taxes" / "2024.pdf").unlink()
    (documents / "taxes").rmdir()
    line = refused(source, documents)  # flat, but still not a model folder
    assert f"{documents}: holds 'letter.txt' and is not a model folder" in line
    assert snapshot(documents) == {"letter.txt": before["letter.txt"]}
    assert leftovers(tmp_path) == []


def test_force_refuses_a_file_and_a_symlink(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    assert f"{notes}: is a file, not a folder" in refused(source, notes)
    link = tmp_path / "link"
    link.symlink_to(fake_model_folder(tmp_path / "elsewhere"))
    assert f"{link}: is a symbolic link" in refused(source, link)
    assert notes.read_text() == "precious" and link.is_symlink()
    assert (tmp_path / "elsewhere" / "model.safetensors").read_bytes() == b"not really"


def test_force_refuses_the_current_folder_and_home_even_when_they_look_like_models(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_checkpoint("src")
    here = fake_model_folder(tmp_path / "projects" / "here")
    (tmp_path / "projects" / "config.json").write_text("{}")
    (tmp_path / "projects" / "model.safetensors").write_bytes(b"not really")
    monkeypatch.chdir(here)
    assert f"{here}: is the current folder or holds it" in refused(source, ".")
    line = refused(source, "..")
    assert f"{tmp_path / 'projects'}: is the current folder or holds it" in line
    home = fake_model_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    assert f"{home}: is your home folder" in refused(source, "~")
    for folder in (here, home):
        assert snapshot(folder) == {"config.json": b"{}", "model.safetensors": b"not really"}


def test_force_replaces_a_model_folder_and_an_empty_folder(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("src")
    empty = tmp_path / "empty"
    empty.mkdir()
    model = fake_model_folder(tmp_path / "model")
    for output in (empty, model):
        result = runner.invoke(cli_app(), ["quantize", str(source), str(output), "--force"])
        assert result.exit_code == 0, result.stderr
        assert (output / "model.safetensors").read_bytes() != b"not really"
        assert (output / "config.json").read_text() != "{}"
    assert leftovers(tmp_path) == []


def test_force_checks_again_before_replacing(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder that became something else while converting is still not deleted."""
    import qwen3_mlx.quantize.convert as convert_module

    source = make_checkpoint("src")
    output = fake_model_folder(tmp_path / "out")
    real_write_config = convert_module.write_config

    def write_config_then_change_output(plan, folder):  # noqa: ANN001, ANN202
        (output / "model.safetensors").unlink()
        (output / "thesis.tex").write_text("chapter 1")
        return real_write_config(plan, folder)

    monkeypatch.setattr(convert_module, "write_config", write_config_then_change_output)
    with pytest.raises(ConversionError, match="not a model folder"):
        quantize_checkpoint(source, output, force=True)
    assert (output / "thesis.tex").read_text() == "chapter 1"
    assert leftovers(tmp_path) == []


def test_force_works_from_a_deleted_current_folder(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_checkpoint("src")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # os.getcwd() now raises FileNotFoundError
    output = fake_model_folder(tmp_path / "out")
    quantize_checkpoint(source, output, force=True)
    assert (output / "model.safetensors").read_bytes() != b"not really"


def test_ctrl_c_while_the_old_folder_is_deleted_keeps_the_new_one_and_says_written(
    make_checkpoint: MakeCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 27 (CLI audit): an interrupt after the new folder is in place is not "not written"."""
    import shutil

    import qwen3_mlx.quantize.staging as staging_module

    source = make_checkpoint("src")
    output = fake_model_folder(tmp_path / "out")
    real_rmtree = shutil.rmtree
    interrupted = []

    def rmtree_interrupted_once(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if ".old-" in str(path) and not interrupted:
            interrupted.append(path)
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(staging_module.shutil, "rmtree", rmtree_interrupted_once)
    result = runner.invoke(cli_app(), ["quantize", str(source), str(output), "--force"])
    assert interrupted and result.exit_code == 0, result.stderr
    assert "not written" not in result.stderr
    assert (output / "model.safetensors").read_bytes() != b"not really"
    assert leftovers(tmp_path) == []
